"""Child-process hygiene shared by everything that spawns long-lived children."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """A preexec_fn: the child gets SIGTERM when its parent dies, and leaves the
    terminal's process group so Ctrl-C reaches only the parent, which then stops
    children in its own order."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the parent's shutdown path still stops its children
    os.setpgrp()

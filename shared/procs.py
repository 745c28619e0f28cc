"""Child-process hygiene shared by everything that spawns long-lived children, and
the one way a process of gfaas's becomes the handler user (an instance, a deploy's
sandbox: `switch_user`)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
# The exit status of a process that could not switch users, or found it could
# switch back (it must not go on either way).
EXIT_NOT_SWITCHED = 70


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


def switch_user(uid: int, gid: int) -> None:
    """Become `uid`:`gid` for good (from root): supplementary groups dropped, gid then
    uid set (real, effective and saved), no_new_privs (a setuid binary it runs gains
    nothing), all checked. Exits the process, rather than going on, if anything is
    left of root."""
    os.setgroups([])
    os.setgid(gid)  # real, effective and saved, as root may
    os.setuid(uid)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), 0, 0, 0) != 0:
        _abort(f"no_new_privs: {os.strerror(ctypes.get_errno())}")
    same = (
        os.getresuid() == (uid,) * 3
        and os.getresgid() == (gid,) * 3
        and set(os.getgroups()) <= {gid}
    )
    if not same:
        _abort(f"ids after the switch: uid {os.getresuid()}, gid {os.getresgid()}")
    try:
        os.setuid(0)
    except PermissionError:
        return
    _abort("it could switch back to root")


def _abort(why: str) -> None:
    print(f"not switched to the handler user: {why}", file=sys.stderr, flush=True)
    os._exit(EXIT_NOT_SWITCHED)

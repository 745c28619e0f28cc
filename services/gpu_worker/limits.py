"""Limits on an instance process (issue 10: handler code with the least the node
allows): open files, no core dumps (they would hold its tensors), and on a CPU its
memory, so that the instance's memory budget binds the handler too, not only the
device tier's model cache.

The memory cap is RLIMIT_DATA (private writable memory: heap and anonymous maps;
the host tier's shared segments do not count), set to the instance's budget plus
`slack` for the interpreter, torch and gfaas themselves (about 270 MiB of it before
any model here). An allocation past it fails in the handler (torch: "can't allocate
memory"), which answers that call with `handler_error`; the instance lives on. Not on
CUDA: the driver's own mappings would count, and the device memory is capped by
`set_per_process_memory_fraction` instead.

Applied with prlimit(2) by the agent when it assigns the process, so a spare started
before anyone knew its budget gets the right one.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from dataclasses import dataclass

MB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    files: int  # open file descriptors
    data: int | None  # bytes of private writable memory; None: not capped


def instance_limits(device: str, memory_bytes: int, *, files: int, slack_mb: int) -> Limits:
    data = memory_bytes + slack_mb * MB if device == "cpu" and slack_mb >= 0 else None
    return Limits(files=files, data=data)


def apply(pid: int, limits: Limits) -> None:
    """Set `limits` on process `pid` (soft and hard: the handler cannot raise them)."""
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limits.files, limits.files))
    resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))
    if limits.data is not None:
        resource.prlimit(pid, resource.RLIMIT_DATA, (limits.data, limits.data))


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of the process group `pgid` (an instance process, or a
    deploy check's sandbox, leads one of its own): what its handler started and left
    running (a helper, a pool's workers), which would outlive it, its share and its
    budget, and hold its uid for the next one. A group's id is not reused while any
    of its processes lives."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # none left
        os.killpg(pgid, signal.SIGKILL)

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
import ctypes
import os
import resource
import signal
import subprocess
import time
from dataclasses import dataclass

MB = 1024 * 1024
_PR_SET_CHILD_SUBREAPER = 36


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


def become_subreaper() -> bool:
    """Make this process (an instance) the reaper of its descendants' orphans: a
    handler's child that left the process group and session (setsid) and then lost
    its parent (a daemon's double fork) stays in this process's tree, where
    `kill_tree` finds it, instead of going to init. Not inherited by children.
    False where the kernel has no such thing.

    What it does not cover: an instance that ends without running its exit (killed
    from outside, a segfault, a handler's os._exit) leaves its tree to init, and
    `kill_group` then finds only what stayed in its group (a cgroup, or a process
    between the agent and the instance, would hold the rest). An adopted orphan that
    exits before the instance stays a zombie until the instance does (reaping by
    waitpid(-1) would take the exit status of the handler's own children)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def descendants(pid: int) -> list[int]:
    """The live processes under `pid`, from /proc's parent links (zombies, already
    dead, left out; a zombie has no children)."""
    children: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat.rsplit(b")", 1)[-1].split()
        if len(fields) < 2 or fields[0] in (b"Z", b"X"):
            continue
        children.setdefault(int(fields[1]), []).append(int(name))
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            if child != pid:
                found.append(child)
                queue.append(child)
    return found


def kill_tree(pid: int, *, within_s: float = 1.0) -> set[int]:
    """SIGKILL every process under `pid` (not `pid` itself), in rounds until none is
    left alive or `within_s` has passed: under a subreaper `pid` (become_subreaper),
    what a killed one had started comes back under `pid`, and a later round takes
    it, wherever it went (its own session, its own group). The pids killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + within_s
    while True:
        alive = descendants(pid)
        if not alive:
            return killed
        for child in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGKILL)
                killed.add(child)
        if time.monotonic() >= deadline:
            return killed
        time.sleep(0.005)  # SIGKILLed, not yet dead: a moment for them to go


def kill_instance(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL an instance process and every process under it: stopped first (it
    starts nothing more), its tree killed (what a killed one started comes back to
    it meanwhile: it is a subreaper), then it. Reaping it is the caller's."""
    if process.poll() is not None:
        return  # ended (and reaped): its pid may be another's now
    with contextlib.suppress(ProcessLookupError, PermissionError):
        process.send_signal(signal.SIGSTOP)
    kill_tree(process.pid)
    process.kill()


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of the process group `pgid` (an instance process, or a
    deploy check's sandbox, leads one of its own): what its handler started and left
    running (a helper, a pool's workers), which would outlive it, its share and its
    budget, and hold its uid for the next one. A group's id is not reused while any
    of its processes lives."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # none left
        os.killpg(pgid, signal.SIGKILL)

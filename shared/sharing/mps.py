"""Spatial sharing of a GPU through CUDA MPS.

With the MPS control daemon running, an instance process gets a share of the SMs
from CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, read when its CUDA context is created: so it
must be in the environment the process starts with. The daemon is driven through
its command-line tool (`nvidia-cuda-mps-control -d` starts it, `quit` on its stdin
stops it), so nothing here imports CUDA. Without MPS, processes on one GPU are
time-sliced by the driver with no share control: only temporal sharing applies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from shared.sharing import ShareError

CONTROL = "nvidia-cuda-mps-control"
# The daemon's control pipe, in the pipe directory: there while a daemon listens.
CONTROL_PIPE = "control"


class MpsUnavailable(RuntimeError):
    """MPS cannot be used here; the message says why."""


@dataclass(frozen=True, slots=True)
class MpsDirs:
    """Where the daemon and its clients meet (pipes) and where it logs. One daemon
    per pair; every instance process of it must be given the same pair."""

    pipe: Path
    log: Path

    @classmethod
    def under(cls, root: Path) -> MpsDirs:
        return cls(pipe=root / "pipe", log=root / "log")


# NVIDIA's defaults, used when a process is given no directories.
DEFAULT_DIRS = MpsDirs(pipe=Path("/tmp/nvidia-mps"), log=Path("/var/log/nvidia-mps"))


@dataclass(frozen=True, slots=True)
class MpsStatus:
    control: str | None  # the control tool's path, None when not on PATH
    running: bool  # a daemon's control pipe is in the pipe directory
    reason: str  # why spatial shares are off; "" when they are on

    @property
    def usable(self) -> bool:
        return self.running


def probe(dirs: MpsDirs = DEFAULT_DIRS) -> MpsStatus:
    """Whether instances could get SM shares now, and if not, why."""
    control = shutil.which(CONTROL)
    running = (dirs.pipe / CONTROL_PIPE).exists()
    if control is None:
        reason = f"{CONTROL} is not on PATH: no MPS, instances share the GPU by time only"
    elif not running:
        reason = f"no MPS daemon listens in {dirs.pipe}: instances share the GPU by time only"
    else:
        reason = ""
    return MpsStatus(control=control, running=running, reason=reason)


def thread_percentage(share: float) -> int:
    """An SM share (a fraction) as MPS's active thread percentage, at least 1."""
    if not 0.0 < share <= 1.0:
        raise ShareError(f"sm share {share} must be above 0 and at most 1")
    return max(1, round(share * 100))


def client_env(share: float, dirs: MpsDirs = DEFAULT_DIRS) -> dict[str, str]:
    """What to add to an instance process's environment for `share` of the SMs."""
    return {
        "CUDA_MPS_PIPE_DIRECTORY": str(dirs.pipe),
        "CUDA_MPS_LOG_DIRECTORY": str(dirs.log),
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(thread_percentage(share)),
    }


def _daemon_env(dirs: MpsDirs, devices: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["CUDA_MPS_PIPE_DIRECTORY"] = str(dirs.pipe)
    env["CUDA_MPS_LOG_DIRECTORY"] = str(dirs.log)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices  # the GPUs this daemon serves
    return env


def start_daemon(dirs: MpsDirs, *, devices: str | None = None, timeout: float = 10.0) -> MpsStatus:
    """Start a control daemon for `dirs` (for the GPUs in `devices`, CUDA_VISIBLE_DEVICES
    syntax; None: all) and wait until it listens. Blocking: call it from a thread."""
    status = probe(dirs)
    if status.running:
        return status
    if status.control is None:
        raise MpsUnavailable(status.reason)
    dirs.pipe.mkdir(parents=True, exist_ok=True)
    dirs.log.mkdir(parents=True, exist_ok=True)
    # `-d` forks the daemon and returns; the pipe appears once it listens.
    _control(status.control, ["-d"], b"", _daemon_env(dirs, devices), timeout)
    return _wait(dirs, running=True, timeout=timeout)


def stop_daemon(dirs: MpsDirs, *, timeout: float = 10.0) -> None:
    """Stop the daemon of `dirs`, if one runs (instances still on it lose the GPU)."""
    status = probe(dirs)
    if not status.running or status.control is None:
        return
    _control(status.control, [], b"quit\n", _daemon_env(dirs, None), timeout)
    _wait(dirs, running=False, timeout=timeout)


def _control(
    tool: str, args: list[str], commands: bytes, env: dict[str, str], timeout: float
) -> None:
    done = subprocess.run(
        [tool, *args], input=commands, env=env, capture_output=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        what = " ".join([CONTROL, *args, commands.decode().strip()])
        raise MpsUnavailable(
            f"{what} failed ({done.returncode}): {done.stderr.decode(errors='replace')}"
        )


def _wait(dirs: MpsDirs, *, running: bool, timeout: float) -> MpsStatus:
    deadline = time.monotonic() + timeout
    while (status := probe(dirs)).running is not running:
        if time.monotonic() > deadline:
            state = "listen" if running else "stop"
            raise MpsUnavailable(
                f"the MPS daemon of {dirs.pipe} did not {state} within {timeout}s "
                f"(see {dirs.log / 'control.log'})"
            )
        time.sleep(0.05)
    return status

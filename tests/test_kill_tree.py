"""What a handler started goes with its instance, even a daemon in a session (and
process group) of its own whose parent is gone (services/gpu_worker/limits.py:
the instance is a subreaper, and its tree is killed)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.gpu_worker import limits
from tests.platform import REPO

pytestmark = pytest.mark.unit

# An instance in small: a subreaper (as standby.main makes it) that leaves a daemon
# (tests.funcs.daemon_pid), says the daemon's pid and its parent's, then waits.
INSTANCE = """
import os, sys, time
from services.gpu_worker import limits
from tests.funcs import daemon_pid
assert limits.become_subreaper()
pid = daemon_pid()
ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
print(pid, ppid, flush=True)
if sys.argv[1] == "exit":
    limits.kill_tree(os.getpid())  # standby.main's last step
else:
    time.sleep(300)
"""


def alive(pid: int) -> bool:
    """Is `pid` running (a zombie nobody reaps is not)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def start(how: str) -> tuple[subprocess.Popen[bytes], int, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", INSTANCE, how],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout is not None
    with proc.stdout:  # it says nothing more
        daemon, parent = (int(v) for v in proc.stdout.readline().split())
    return proc, daemon, parent


def test_an_instance_exiting_kills_the_daemon_its_handler_left() -> None:
    proc, daemon, parent = start("exit")
    try:
        # Orphaned, it was adopted by the instance, not by init: still in its tree.
        assert parent == proc.pid
        assert proc.wait(timeout=10) == 0
        assert gone_within(daemon, 2.0)
    finally:
        subprocess.run(["kill", "-9", str(daemon)], capture_output=True)


def test_an_instance_its_agent_kills_takes_the_daemon_its_handler_left() -> None:
    """Before, the agent's kill (past its stop grace, its start's timeout, or as the
    agent stops) and its group kill missed a daemon in a group and session of its
    own: it outlived its instance, holding its share and its uid."""
    proc, daemon, _ = start("wait")
    try:
        limits.kill_instance(proc)
        proc.wait(timeout=10)
        limits.kill_group(proc.pid)
        assert gone_within(daemon, 2.0)
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["kill", "-9", str(daemon)], capture_output=True)

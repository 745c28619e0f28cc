"""An instance process on its own (as its agent starts it, no agent here): what it
says and how it exits when its start fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client as NATS

from shared import subjects
from shared.natsd import NatsServer
from shared.registry import Registry
from shared.schema import ErrorCode, FunctionSpec, InstanceFailed, decode
from shared.service import START_FAILED_EXIT
from tests.platform import REPO

pytestmark = [pytest.mark.nats, pytest.mark.anyio]


def instance_env(url: str, state_dir: Path, function: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "GFAAS_NATS_URL": url,
        "GFAAS_NATS_AUTH": "false",
        "GFAAS_STATE_DIR": str(state_dir),
        "GFAAS_DEVICE": "cpu",
        "GFAAS_WORKER_ID": "a0-i1",
        "GFAAS_INSTANCE_FUNCTION": function,
        "GFAAS_INSTANCE_AGENT": "a0",
        "GFAAS_AGENT_ENABLED": "false",
        "GFAAS_METRICS_PORT": "0",
        "GFAAS_HEARTBEAT_S": "0.1",
    }


@pytest.mark.parametrize(
    ("function", "code", "why"),
    [
        # No spec to serve (InstanceStart.prepare).
        ("not-deployed", ErrorCode.UNKNOWN_FUNCTION, "is not deployed"),
        # Its handler cannot be imported (InstanceStart.load, after it subscribed).
        ("no-handler", ErrorCode.HANDLER_ERROR, "no_such_handler"),
    ],
)
async def test_an_instance_that_cannot_start_says_why_and_exits_without_a_traceback(
    nats_server: NatsServer, nc: NATS, tmp_path: Path, function: str, code: ErrorCode, why: str
) -> None:
    """Before, `serve` returned without reporting ready: anyio's start raised
    "Child exited without calling task_status.started()", a traceback on the
    instance's stderr and exit status 1, as from a bug. Its agent hears the real
    reason, and the process exits START_FAILED_EXIT with that reason logged."""
    registry = await Registry.open(nc.jetstream())
    await registry.put(FunctionSpec(name="no-handler", handler="tests.funcs:no_such_handler"))
    notes = await nc.subscribe(subjects.agent("a0", "failed"))
    await nc.flush()

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.gpu_worker"],
            env=instance_env(nats_server.url, tmp_path / "state", function),
            capture_output=True,
            text=True,
            timeout=30,
        )

    done = await anyio.to_thread.run_sync(run)
    note = decode((await notes.next_msg(timeout=5)).data, InstanceFailed)
    assert note.instance_id == "a0-i1"
    assert note.error.code is code, note.error
    assert why in note.error.reason
    assert "Traceback" not in done.stderr, done.stderr
    assert "task_status.started" not in done.stderr, done.stderr
    assert done.returncode == START_FAILED_EXIT, done.stderr
    assert "service.start_failed" in done.stderr + done.stdout

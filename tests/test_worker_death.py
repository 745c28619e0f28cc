"""A worker that dies mid-request: the caller gets worker_lost promptly, service goes on."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import anyio
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from gfaas.client import Client
from services.gpu_worker.app import serve as serve_worker
from shared.natsd import NatsServer
from shared.schema import FunctionSpec
from tests.conftest import platform_at, settings_for, spawn_worker
from tests.helpers import body, deploy_and_wait, request

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

SLEEP = FunctionSpec(name="sleep", handler="tests.funcs:sleep", concurrency=4)
ECHO = FunctionSpec(name="echo", handler="tests.funcs:echo")


async def wait_for_worker(client: Client, worker_id: str) -> None:
    with anyio.fail_after(30):
        while True:
            status = await client.status("scheduler")
            if worker_id in status.details["workers"]:
                return
            await anyio.sleep(0.05)


async def test_killed_worker_answers_its_callers_with_worker_lost(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    # Only the subprocess worker exists at first, so the sleeping request lands there.
    with platform_at(nats_server.url, tmp_path / "s", workers=0, worker_timeout_s=1.0) as p:
        proc = spawn_worker(nats_server.url, "doomed", tmp_path / "w")
        try:
            client = Client(nc)
            await deploy_and_wait(nc, SLEEP, ECHO)
            await wait_for_worker(client, "doomed")
            result: dict[str, object] = {}

            async def call() -> None:
                started = time.monotonic()
                _, reply = await request(nc, "sleep", body(seconds=np.array(30.0)), timeout=20)
                result["reply"], result["elapsed"] = reply, time.monotonic() - started

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                with anyio.fail_after(10):
                    while (await client.status("gpu-worker")).details["inflight"] == 0:
                        await anyio.sleep(0.05)
                proc.send_signal(signal.SIGKILL)
            reply = result["reply"]
            assert isinstance(reply, dict)
            assert reply["error"]["code"] == "worker_lost", reply
            assert "doomed" in reply["error"]["reason"]
            assert isinstance(result["elapsed"], float)
            assert result["elapsed"] < 10
        finally:
            proc.kill()
            proc.wait()

        # The platform keeps serving once a healthy worker is there.
        settings = settings_for(nats_server.url, tmp_path / "s", worker_id="healthy")
        p.start("worker-healthy", serve_worker, settings)
        await wait_for_worker(client, "healthy")
        _, ok = await request(nc, "echo", body(x=np.ones(2, np.float32)))
        assert "error" not in ok, ok
        assert "doomed" not in (await client.status("scheduler")).details["workers"]

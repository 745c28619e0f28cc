"""A worker that dies mid-request: the caller gets worker_lost promptly, service goes on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nats.aio.client import Client as NATS

from gfaas.client import Client
from services.gpu_worker.app import serve as serve_worker
from shared.natsd import NatsServer
from tests.helpers import body, deploy_and_wait, kill_mid_call, request, wait_for_worker
from tests.platform import doomed_platform, settings_for
from tests.specs import ECHO, SLEEP

pytestmark = [pytest.mark.nats, pytest.mark.anyio]


@pytest.mark.slow  # a process killed (chaos): in CI, not the quick run
async def test_killed_worker_answers_its_callers_with_worker_lost(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    # Only the subprocess worker exists at first, so the sleeping request lands there.
    with doomed_platform(nats_server.url, tmp_path) as (p, proc):
        client = Client(nc)
        await deploy_and_wait(nc, SLEEP, ECHO)
        await wait_for_worker(client, "doomed")

        async def running() -> bool:
            return bool((await client.status("gpu-worker")).details["inflight"])

        reply, elapsed = await kill_mid_call(nc, proc, running)
        assert isinstance(reply, dict)
        assert reply["error"]["code"] == "worker_lost", reply
        assert "doomed" in reply["error"]["reason"]
        assert elapsed < 10

        # The platform keeps serving once a healthy worker is there.
        settings = settings_for(nats_server.url, tmp_path / "s", worker_id="healthy")
        p.start("worker-healthy", serve_worker, settings)
        await wait_for_worker(client, "healthy")
        _, ok = await request(nc, "echo", body(x=np.ones(2, np.float32)))
        assert "error" not in ok, ok
        assert "doomed" not in (await client.status("scheduler")).details["workers"]

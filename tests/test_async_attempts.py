"""The async path's attempt counting, against a real JetStream, with the worker played
by the test: what each attempt does to the invocation's record is the test's to say."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import anyio
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from services.ingress.async_path import AsyncInvocations
from shared import jetstream
from shared.bus import BusHealth
from shared.natsd import NatsServer
from shared.results import ResultStore
from shared.schema import H_DEAD_CODE, H_MSG_ID, ErrorCode, InvokeReply, error_reply
from tests.helpers import body
from tests.platform import settings_for

pytestmark = [pytest.mark.nats, pytest.mark.anyio]


async def test_an_invocation_whose_worker_dies_each_time_is_given_up_not_rerun_forever(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    """Each run of this invocation takes its worker down (a poison input: the device
    out of memory, a crash in native code). A lost worker's attempt was run again at
    once within the same delivery, never counted: the invocation ran without end and
    was never dead-lettered."""
    settings = settings_for(
        nats_server.url,
        tmp_path,
        worker_timeout_s=0.3,
        async_max_attempts=3,
        async_backoff_s=0.05,
        async_backoff_max_s=0.1,
    )
    js = nc.jetstream()
    await jetstream.ensure_invocations_stream(js)
    await jetstream.ensure_dead_letter_stream(js)
    results = ResultStore(await jetstream.results_kv(js), max_payload=nc.max_payload)
    runs: list[int] = []

    async def dies_each_time(
        function: str, body: bytes, headers: Mapping[str, str], *, claim: int
    ) -> InvokeReply:
        # A worker claims the attempt, then is gone: it never beats again.
        iid = headers["Gfaas-Invocation-Id"]
        runs.append(claim)
        await results.claim(iid, claim, f"doomed-{len(runs)}")
        return error_reply(iid, ErrorCode.WORKER_LOST, f"worker doomed-{len(runs)} died")

    health = BusHealth(0.05)
    asyncs = AsyncInvocations(
        nc, results, dies_each_time, settings, max_payload=nc.max_payload, health=health
    )
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def bus_up() -> None:  # as the ingress hears its own beats
            while True:
                health.heard_self(time.monotonic())
                await anyio.sleep(0.05)

        tg.start_soon(bus_up)
        tg.start_soon(asyncs.consume, stop)
        await js.publish(
            "gfaas.v1.invoke_async.crasher", body(x=np.array([1.0])), headers={H_MSG_ID: "poison"}
        )
        with anyio.fail_after(15):
            while (await js.stream_info(jetstream.DEAD_LETTER_STREAM)).state.messages < 1:
                await anyio.sleep(0.05)
        await anyio.sleep(1.0)  # no run after the last
        stop.set()
        tg.cancel_scope.cancel()
    assert len(runs) == 3, runs
    dead = await js.get_msg(jetstream.DEAD_LETTER_STREAM, 1)
    assert dead.headers is not None
    assert dead.headers[H_DEAD_CODE] == "worker_lost"
    got = await results.get("poison")
    assert got is not None
    assert got[0].reply is not None
    assert got[0].reply.error is not None
    assert got[0].reply.error.code is ErrorCode.WORKER_LOST
    assert got[0].reply.error.reason.startswith("gave up after 3 attempts")

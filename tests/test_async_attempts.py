"""The async path's attempt counting, against a real JetStream, with the worker played
by the test: what each attempt does to the invocation's record is the test's to say."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import nats.errors
import numpy as np
import pytest
from msgspec.structs import replace
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from services.ingress.async_path import AsyncInvocations, Call
from shared import jetstream
from shared.bus import BusHealth
from shared.config import Settings
from shared.natsd import NatsServer
from shared.results import ResultStore
from shared.schema import (
    H_CALLBACK,
    H_DEAD_CODE,
    H_DEAD_REASON,
    H_DEADLINE,
    H_INVOCATION,
    H_MSG_ID,
    ErrorCode,
    InvokeReply,
    WorkerHeartbeat,
    encode,
    error_reply,
)
from shared.subjects import heartbeat
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
        **FAST_RETRIES,
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


Settled = list[tuple[str, str, float | None]]


async def run_async_path(
    nc: NATS,
    settings: Settings,
    call: Call,
    publish: Callable[[JetStreamContext], Awaitable[object]],
    until: Callable[[], Awaitable[bool]],
    *,
    settle_s: float = 0.5,
) -> Settled:
    """Run the async path with `call` as the worker, `publish` the work, until `until`
    says it is done (and `settle_s` more): what `settled` was told, as (function,
    outcome, seconds)."""
    js = nc.jetstream()
    await jetstream.ensure_invocations_stream(js)
    await jetstream.ensure_dead_letter_stream(js)
    results = ResultStore(await jetstream.results_kv(js), max_payload=nc.max_payload)
    told: Settled = []

    async def settled(
        function: str, headers: Mapping[str, str] | None, reply: InvokeReply, seconds: float | None
    ) -> None:
        told.append((function, "ok" if reply.error is None else str(reply.error.code), seconds))

    health = BusHealth(0.05)
    asyncs = AsyncInvocations(
        nc, results, call, settings, max_payload=nc.max_payload, health=health, settled=settled
    )
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def bus_up() -> None:
            while True:
                health.heard_self(time.monotonic())
                await anyio.sleep(0.05)

        tg.start_soon(bus_up)
        tg.start_soon(asyncs.consume, stop)
        await publish(js)
        with anyio.fail_after(4):
            while not await until():
                await anyio.sleep(0.05)
        await anyio.sleep(settle_s)
        stop.set()
        tg.cancel_scope.cancel()
    return told


# Three attempts, a backoff apart short enough for a test.
FAST_RETRIES: dict[str, Any] = {
    "async_max_attempts": 3,
    "async_backoff_s": 0.05,
    "async_backoff_max_s": 0.1,
}


def dead_lettered(nc: NATS, at_least: int = 1) -> Callable[[], Awaitable[bool]]:
    """Whether the dead-letter stream holds `at_least` messages (run_async_path's end)."""

    async def dead() -> bool:
        info = await nc.jetstream().stream_info(jetstream.DEAD_LETTER_STREAM)
        return info.state.messages >= at_least

    return dead


async def test_an_invocation_given_up_on_is_counted_once_with_its_last_error(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    """Each attempt fails through no fault of the caller's (no scheduler): none of
    them counts, and the invocation, given up on and dead-lettered, counts once as
    `unavailable`. It was never counted at all."""
    settings = settings_for(
        nats_server.url,
        tmp_path,
        **FAST_RETRIES,
    )
    runs: list[int] = []

    async def unavailable(
        function: str, body: bytes, headers: Mapping[str, str], *, claim: int
    ) -> InvokeReply:
        runs.append(claim)
        return error_reply(headers[H_INVOCATION], ErrorCode.UNAVAILABLE, "no scheduler")

    dead = dead_lettered(nc)

    told = await run_async_path(
        nc,
        settings,
        unavailable,
        lambda js: js.publish(
            "gfaas.v1.invoke_async.flaky", body(x=np.array([1.0])), headers={H_MSG_ID: "flaky-1"}
        ),
        dead,
    )
    assert len(runs) == 3, runs
    assert [(f, o) for f, o, _ in told] == [("flaky", "unavailable")]
    seconds = told[0][2]
    assert seconds is not None
    assert 0.0 <= seconds < 10.0


async def test_malformed_and_unidentifiable_messages_are_counted_as_bad_requests(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    """Dead-lettered at once, never run: each is still an invocation that failed
    (the caller's bad request) and counts once; neither was counted."""
    settings = settings_for(nats_server.url, tmp_path)

    async def never(
        function: str, body: bytes, headers: Mapping[str, str], *, claim: int
    ) -> InvokeReply:
        raise AssertionError("a message that can never succeed was run")

    async def publish(js: JetStreamContext) -> None:
        await js.publish("gfaas.v1.invoke_async.f", b"\xc1garbage", headers={H_MSG_ID: "garbled"})
        await js.publish(
            "gfaas.v1.invoke_async.f", body(x=np.array([1.0])), headers={H_MSG_ID: "bad id!"}
        )

    dead = dead_lettered(nc, 2)

    told = await run_async_path(nc, settings, never, publish, dead)
    assert [(f, o) for f, o, _ in told] == [("f", "bad_request"), ("f", "bad_request")]


async def test_a_result_found_done_by_a_second_delivery_is_not_counted_again(
    nats_server: NatsServer, nc: NATS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message is delivered again after its result was stored and counted (its
    ingress's ack never arrived): the redelivery answers from the record, and the
    invocation still counts once."""
    settings = settings_for(nats_server.url, tmp_path)
    runs: list[int] = []

    async def ok(
        function: str, body: bytes, headers: Mapping[str, str], *, claim: int
    ) -> InvokeReply:
        runs.append(claim)
        return InvokeReply(invocation_id=headers[H_INVOCATION])

    acks: list[int] = []
    real_ack = Msg.ack

    async def first_ack_lost(self: Msg) -> None:
        acks.append(self.metadata.num_delivered or 1)
        if len(acks) == 1:
            await self.nak()  # as of an ack that never arrived: delivered again at once
        else:
            await real_ack(self)

    monkeypatch.setattr(Msg, "ack", first_ack_lost)

    async def acked_twice() -> bool:
        return len(acks) >= 2

    told = await run_async_path(
        nc,
        settings,
        ok,
        lambda js: js.publish(
            "gfaas.v1.invoke_async.f", body(x=np.array([1.0])), headers={H_MSG_ID: "twice"}
        ),
        acked_twice,
    )
    assert len(runs) == 1, runs
    assert acks == [1, 2]
    assert [(f, o) for f, o, _ in told] == [("f", "ok")]


async def test_a_delivery_whose_handling_raises_is_retried_then_given_up_on(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    """Handling this message raises each time (a bug on its path): it was left
    unsettled, to come back at every ack wait for good, never dead-lettered and its
    caller never answered. It is now tried again after a backoff and, out of
    attempts, given up on as `internal`: stored, counted and dead-lettered."""
    settings = settings_for(
        nats_server.url,
        tmp_path,
        **FAST_RETRIES,
    )
    runs: list[int] = []

    async def raises(
        function: str, body: bytes, headers: Mapping[str, str], *, claim: int
    ) -> InvokeReply:
        runs.append(claim)
        raise RuntimeError("a bug on this message's path")

    dead = dead_lettered(nc)

    told = await run_async_path(
        nc,
        settings,
        raises,
        lambda js: js.publish(
            "gfaas.v1.invoke_async.buggy", body(x=np.array([1.0])), headers={H_MSG_ID: "buggy"}
        ),
        dead,
    )
    assert len(runs) == 3, runs
    assert [(f, o) for f, o, _ in told] == [("buggy", "internal")]
    js = nc.jetstream()
    letter = await js.get_msg(jetstream.DEAD_LETTER_STREAM, 1)
    assert letter.headers is not None
    assert letter.headers[H_DEAD_CODE] == "internal"
    results = ResultStore(await jetstream.results_kv(js), max_payload=nc.max_payload)
    got = await results.get("buggy")
    assert got is not None
    assert got[0].reply is not None
    assert got[0].reply.error is not None
    assert got[0].reply.error.code is ErrorCode.INTERNAL
    assert "gave up after 3 attempts" in got[0].reply.error.reason
    assert (await js.stream_info(jetstream.INVOCATIONS_STREAM)).state.messages == 0


async def test_a_malformed_message_near_max_payload_is_dead_lettered_without_its_body(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    """Its dead letter, the body with the reason's headers, was a publish past
    max_payload: the server closed ingress's connection, and the message, back on
    the next delivery, did so again, never dead-lettered."""
    settings = settings_for(nats_server.url, tmp_path)

    async def never(
        function: str, body: bytes, headers: Mapping[str, str], *, claim: int
    ) -> InvokeReply:
        raise AssertionError("a malformed message was run")

    garbage = b"\xc1" * (nc.max_payload - 60)

    dead = dead_lettered(nc)

    told = await run_async_path(
        nc,
        settings,
        never,
        lambda js: js.publish("gfaas.v1.invoke_async.f", garbage, headers={H_MSG_ID: "huge"}),
        dead,
        settle_s=0.2,
    )
    assert nc.is_connected
    assert [(f, o) for f, o, _ in told] == [("f", "bad_request")]
    letter = await nc.jetstream().get_msg(jetstream.DEAD_LETTER_STREAM, 1)
    assert letter.headers is not None
    assert letter.headers[H_DEAD_CODE] == "bad_request"
    assert f"its body of {len(garbage)} bytes is dropped" in letter.headers[H_DEAD_REASON]
    assert not letter.data


async def test_a_results_store_outage_does_not_use_up_an_invocations_attempts(
    nats_server: NatsServer, nc: NATS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store is out of reach for its first reads (a stream leader being
    elected). Each was a nak and a redelivery, counted as an attempt: when it came
    back, the invocation had used up its attempts without one run, and its first
    failure (the scheduler not back yet) was final. It is now run again."""
    settings = settings_for(
        nats_server.url,
        tmp_path,
        **FAST_RETRIES,
    )
    outage = [8]
    real_get = ResultStore.get

    async def flaky_get(self: ResultStore, invocation_id: str) -> object:
        if outage[0] > 0:
            outage[0] -= 1
            raise nats.errors.TimeoutError
        return await real_get(self, invocation_id)

    monkeypatch.setattr(ResultStore, "get", flaky_get)
    runs: list[int] = []

    async def unavailable_once(
        function: str, body: bytes, headers: Mapping[str, str], *, claim: int
    ) -> InvokeReply:
        runs.append(claim)
        if len(runs) == 1:
            return error_reply(headers[H_INVOCATION], ErrorCode.UNAVAILABLE, "no scheduler yet")
        return InvokeReply(invocation_id=headers[H_INVOCATION])

    async def done() -> bool:
        return len(runs) >= 2 or (
            (await nc.jetstream().stream_info(jetstream.DEAD_LETTER_STREAM)).state.messages > 0
        )

    told = await run_async_path(
        nc,
        settings,
        unavailable_once,
        lambda js: js.publish(
            "gfaas.v1.invoke_async.f", body(x=np.array([1.0])), headers={H_MSG_ID: "outage"}
        ),
        done,
    )
    assert len(runs) == 2, runs
    assert [(f, o) for f, o, _ in told] == [("f", "ok")]


async def test_an_unidentifiable_message_whose_dead_letter_failed_once_counts_once(
    nats_server: NatsServer, nc: NATS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No record can say it was counted: it was counted before its dead letter, so a
    dead letter that failed (the stream out of reach for a moment) and was tried
    again counted it twice."""
    settings = settings_for(
        nats_server.url, tmp_path, async_backoff_s=0.05, async_backoff_max_s=0.1
    )
    real_dead = AsyncInvocations._dead
    failures = [1]

    async def dead_fails_once(self: AsyncInvocations, *args: Any, **kwargs: Any) -> None:
        if failures[0]:
            failures[0] -= 1
            raise nats.errors.TimeoutError
        await real_dead(self, *args, **kwargs)

    monkeypatch.setattr(AsyncInvocations, "_dead", dead_fails_once)

    async def never(
        function: str, body: bytes, headers: Mapping[str, str], *, claim: int
    ) -> InvokeReply:
        raise AssertionError("a message with no usable id was run")

    dead = dead_lettered(nc)

    told = await run_async_path(
        nc,
        settings,
        never,
        lambda js: js.publish(
            "gfaas.v1.invoke_async.f", body(x=np.array([1.0])), headers={H_MSG_ID: "no good!"}
        ),
        dead,
    )
    assert failures == [0]
    assert [(f, o) for f, o, _ in told] == [("f", "bad_request")]


async def test_a_deadline_already_passed_is_final_at_once_not_retried(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    """An absolute `Gfaas-Deadline-Ms` in the past (or one that passed during an
    attempt) can never be made: each attempt timed out at once, no fault of the
    caller's, and was tried again up to async_max_attempts, a backoff apart. It is
    now final at once: deadline_exceeded, stored, told and counted once, not run."""
    settings = settings_for(
        nats_server.url,
        tmp_path,
        async_max_attempts=3,
        async_backoff_s=2.0,
        async_backoff_max_s=2.0,
    )
    runs: list[str] = []

    async def as_the_dispatcher(
        function: str, body: bytes, headers: Mapping[str, str], *, claim: int
    ) -> InvokeReply:
        # No worker answered by the deadline (as Dispatcher.call says of one).
        iid = headers[H_INVOCATION]
        runs.append(iid)
        await anyio.sleep(max(int(headers[H_DEADLINE]) / 1000.0 - time.time(), 0.0))
        return error_reply(iid, ErrorCode.DEADLINE_EXCEEDED, "no reply within 0.000s")

    heard: list[bytes] = []

    async def on_callback(msg: Msg) -> None:
        heard.append(msg.data)

    await nc.subscribe("late.callback", cb=on_callback)
    js = nc.jetstream()
    results = ResultStore(await jetstream.results_kv(js), max_payload=nc.max_payload)
    started = time.monotonic()
    finished: dict[str, float] = {}

    async def publish(js: JetStreamContext) -> None:
        now_ms = int(time.time() * 1000)
        for iid, deadline_ms in (("past", now_ms - 1000), ("soon", now_ms + 300)):
            await js.publish(
                "gfaas.v1.invoke_async.f",
                body(x=np.array([1.0])),
                headers={
                    H_MSG_ID: iid,
                    H_DEADLINE: str(deadline_ms),
                    H_CALLBACK: "late.callback",
                },
            )

    async def both_done() -> bool:
        for iid in ("past", "soon"):
            got = await results.get(iid)
            if got is not None and got[0].reply is not None and iid not in finished:
                finished[iid] = time.monotonic() - started
        return len(finished) == 2

    told = await run_async_path(nc, settings, as_the_dispatcher, publish, both_done)
    assert runs == ["soon"], runs  # the one already late never ran
    assert sorted(o for _, o, _ in told) == ["deadline_exceeded", "deadline_exceeded"]
    for iid in ("past", "soon"):
        got = await results.get(iid)
        assert got is not None
        assert got[0].reply is not None
        assert got[0].reply.error is not None
        assert got[0].reply.error.code is ErrorCode.DEADLINE_EXCEEDED
        assert "deadline" in got[0].reply.error.reason
    # Final when the attempt that missed it came back, not a backoff (2 s) later.
    assert finished["soon"] < 1.5, finished
    assert len(heard) == 2
    assert (await js.stream_info(jetstream.INVOCATIONS_STREAM)).state.messages == 0
    assert (await js.stream_info(jetstream.DEAD_LETTER_STREAM)).state.messages == 0


async def test_a_give_up_on_a_raising_delivery_lets_a_live_workers_claim_stand(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    """Handling raised after a worker claimed the attempt (its record RUNNING), on
    the last attempt: the give-up wrote `internal` over the worker's record while it
    still ran, and the result the worker then stored was refused (its claim's
    revision gone). The give-up now waits while the worker lives, and its result
    is the invocation's: stored, told, counted once, not dead-lettered."""
    settings = settings_for(nats_server.url, tmp_path, async_max_attempts=1, worker_timeout_s=1.0)
    js = nc.jetstream()
    results = ResultStore(await jetstream.results_kv(js), max_payload=nc.max_payload)
    stored: list[int | None] = []

    async def worker(iid: str, claimed: int) -> None:
        # Beats while it runs (listing the invocation), then stores its result.
        beat = WorkerHeartbeat(
            worker_id="w1", device="cpu", pid=1, memory_total=0, memory_used=0, memory_free=0
        )
        for _ in range(10):
            await nc.publish(heartbeat("w1"), encode(replace(beat, claimed=[iid])))
            await anyio.sleep(0.05)
        done = results.done(InvokeReply(invocation_id=iid, worker="w1"))
        stored.append(await results.swap(iid, done, claimed))
        await nc.publish(heartbeat("w1"), encode(beat))

    async with anyio.create_task_group() as workers:

        async def claimed_then_raises(
            function: str, body: bytes, headers: Mapping[str, str], *, claim: int
        ) -> InvokeReply:
            iid = headers[H_INVOCATION]
            workers.start_soon(worker, iid, await results.claim(iid, claim, "w1"))
            raise RuntimeError("a bug on the way back from the worker")

        async def settled_with_a_result() -> bool:
            got = await results.get("held")
            return bool(stored) and got is not None and got[0].reply is not None

        told = await run_async_path(
            nc,
            settings,
            claimed_then_raises,
            lambda js: js.publish(
                "gfaas.v1.invoke_async.f", body(x=np.array([1.0])), headers={H_MSG_ID: "held"}
            ),
            settled_with_a_result,
        )
    assert stored[0] is not None, "the worker's result was refused"
    got = await results.get("held")
    assert got is not None
    assert got[0].reply is not None
    assert got[0].reply.error is None, got[0].reply.error
    assert got[0].reply.worker == "w1"
    assert [(f, o) for f, o, _ in told] == [("f", "ok")]
    assert (await js.stream_info(jetstream.INVOCATIONS_STREAM)).state.messages == 0
    assert (await js.stream_info(jetstream.DEAD_LETTER_STREAM)).state.messages == 0


async def test_a_lookup_of_an_unknown_id_costs_one_stream_request_and_a_deep_queue_is_found(
    nats_server: NatsServer, nc: NATS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup that found no record read the newest 256 queued messages, one
    JetStream request each, every time: a caller looping over ids it never used
    made ingress send 257 stream requests a lookup, and work queued deeper than 256
    was answered not_found. Each message is now read once into an index: an
    unknown id costs one stream request (its info), a new publish one read more."""
    settings = settings_for(nats_server.url, tmp_path)
    js = nc.jetstream()
    await jetstream.ensure_invocations_stream(js)
    results = ResultStore(await jetstream.results_kv(js), max_payload=nc.max_payload)

    async def never(
        function: str, body: bytes, headers: Mapping[str, str], *, claim: int
    ) -> InvokeReply:
        raise AssertionError("nothing is taken here")

    asyncs = AsyncInvocations(
        nc, results, never, settings, max_payload=nc.max_payload, health=BusHealth(0.05)
    )
    depth = 300
    for i in range(depth):
        await js.publish(
            "gfaas.v1.invoke_async.f", body(x=np.array([1.0])), headers={H_MSG_ID: f"q-{i}"}
        )
    requests: list[str] = []
    real_request = nc.request

    async def counted(subject: str, *args: Any, **kwargs: Any) -> Msg:
        if jetstream.INVOCATIONS_STREAM in subject:
            requests.append(subject)
        return await real_request(subject, *args, **kwargs)

    monkeypatch.setattr(nc, "request", counted)

    async def code_of(iid: str) -> str:
        reply = await asyncs.result(iid)
        return str(reply.error.code) if reply.error else "ok"

    # The oldest, deeper than the 256 newest.
    assert await code_of("q-0") == "pending"
    assert await code_of(f"q-{depth - 1}") == "pending"
    requests.clear()
    for i in range(50):
        assert await code_of(f"never-used-{i}") == "not_found"
    assert len(requests) == 50, len(requests)  # was 50 * 257
    requests.clear()
    await js.publish("gfaas.v1.invoke_async.f", body(x=np.array([1.0])), headers={H_MSG_ID: "new"})
    assert await code_of("new") == "pending"
    assert len(requests) == 2, requests  # its info, and the one message new since

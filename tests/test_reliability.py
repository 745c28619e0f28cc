"""Nothing lost, nothing run twice, no caller left hanging (in-process platform).

Each test reproduces one fault an outside tester found; the chaos tests that kill
processes are in test_chaos.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import KeyWrongLastSequenceError

from gfaas.client import Client, outputs_of
from services.scheduler.app import serve as serve_scheduler
from services.scheduler.leader import KEY as LEASE_KEY
from shared import jetstream, subjects
from shared.natsd import NatsServer
from shared.results import ResultStore
from shared.schema import (
    H_DEAD_CODE,
    H_DEAD_REASON,
    AsyncRecord,
    AsyncState,
    DType,
    ErrorCode,
    FunctionSpec,
    InvokeReply,
    SchedulerBeat,
    Tensor,
    decode,
)
from tests import funcs
from tests.helpers import body, deploy_and_wait, final_result
from tests.platform import Platform, platform_at, settings_for
from tests.specs import ADD_ONE, SLEEP

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

SLOW_COUNT = FunctionSpec(name="slow-count", handler="tests.funcs:slow_count")


@pytest.fixture
def quick_platform(nats_server: NatsServer, tmp_path: Path) -> Iterator[Platform]:
    """Short ack wait and backoff, so redelivery and retries show within a test."""
    with platform_at(
        nats_server.url,
        tmp_path / "state",
        async_ack_wait_s=1.0,
        async_backoff_s=0.1,
        async_backoff_max_s=0.5,
        scheduler_timeout_s=1.0,
    ) as p:
        yield p


async def test_an_id_given_only_in_the_body_is_where_the_result_is(
    platform: Platform, nc: NATS
) -> None:
    await deploy_and_wait(nc, ADD_ONE)
    data = msgspec.msgpack.encode(
        {
            "invocation_id": "body-only-1",
            "inputs": [{"name": "x", "dtype": "float32", "shape": [1], "data": b"\0\0\x80?"}],
        }
    )
    await nc.jetstream().publish("gfaas.v1.invoke_async.add-one", data)
    reply = await final_result(Client(nc), "body-only-1")
    assert outputs_of(reply)["y"].tolist() == [2.0]


async def test_result_right_after_the_publish_is_pending_never_not_found(
    platform: Platform, nc: NATS
) -> None:
    await deploy_and_wait(nc, SLOW_COUNT)
    client = Client(nc)
    js = nc.jetstream()
    codes = set()
    for i in range(20):
        iid = f"fresh-{i}"
        await js.publish(
            "gfaas.v1.invoke_async.slow-count",
            body(seconds=np.array([0.05]), n=np.array([i])),
            headers={"Nats-Msg-Id": iid},
        )
        reply = await client.result(iid)
        assert reply.error is not None or reply.outputs, reply
        codes.add(reply.error.code if reply.error else "ok")
    assert "not_found" not in codes, codes
    for i in range(20):
        assert (await final_result(client, f"fresh-{i}")).error is None


async def test_ids_that_cannot_be_keys_go_to_the_dead_letters_and_do_not_block(
    platform: Platform, nc: NATS
) -> None:
    await deploy_and_wait(nc, ADD_ONE)
    js = nc.jetstream()
    bad = 300
    for i in range(bad):
        await js.publish(
            "gfaas.v1.invoke_async.add-one",
            body(x=np.array([1.0])),
            headers={"Nats-Msg-Id": f"not a key {i}"},
        )
    # Malformed body, usable id: its error is the result, and it is dead-lettered too.
    await js.publish(
        "gfaas.v1.invoke_async.add-one", b"\xc1garbage", headers={"Nats-Msg-Id": "garbled"}
    )
    await js.publish(
        "gfaas.v1.invoke_async.add-one", body(x=np.array([1.0])), headers={"Nats-Msg-Id": "good"}
    )
    client = Client(nc)
    assert outputs_of(await final_result(client, "good"))["y"].tolist() == [2.0]
    garbled = await final_result(client, "garbled")
    assert garbled.error is not None
    assert garbled.error.code == "bad_request"
    with anyio.fail_after(10):
        while (await js.stream_info(jetstream.DEAD_LETTER_STREAM)).state.messages < bad + 1:
            await anyio.sleep(0.05)
    first = await js.get_msg(jetstream.DEAD_LETTER_STREAM, 1)
    assert first.headers is not None
    assert first.headers[H_DEAD_CODE] == "bad_request"
    assert "invocation id" in first.headers[H_DEAD_REASON]
    # Nothing is left unacknowledged to be redelivered.
    with anyio.fail_after(10):
        while (await js.stream_info(jetstream.INVOCATIONS_STREAM)).state.messages:
            await anyio.sleep(0.05)


async def test_a_run_longer_than_the_ack_wait_runs_once(quick_platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, SLOW_COUNT)
    funcs.SLOW_RUNS.clear()
    client = Client(nc)
    iid = await client.invoke_async("slow-count", {"seconds": np.array([3.0]), "n": np.array([7])})
    reply = await final_result(client, iid)
    assert outputs_of(reply)["y"].tolist() == [8]
    await anyio.sleep(1.5)  # past another ack wait: no redelivery comes
    assert funcs.SLOW_RUNS == [7]
    # Kept alive by in-progress acks: delivered once, not redelivered and turned away.
    info = await nc.jetstream().consumer_info(
        jetstream.INVOCATIONS_STREAM, jetstream.ASYNC_CONSUMER
    )
    assert info.delivered is not None
    assert info.delivered.consumer_seq == 1  # the only message, delivered once


async def test_async_work_waits_out_a_missing_scheduler_instead_of_failing(
    quick_platform: Platform, nc: NATS
) -> None:
    await deploy_and_wait(nc, ADD_ONE)
    client = Client(nc)
    settings = settings_for(quick_platform.url, quick_platform.state_dir, scheduler_timeout_s=1.0)
    quick_platform.stop("scheduler")
    ids = [await client.invoke_async("add-one", {"x": np.array([float(i)])}) for i in range(20)]
    # Sync callers are told at once, not left to their timeout.
    started = time.monotonic()
    with pytest.raises(Exception, match="unavailable"):
        await client.invoke("add-one", {"x": np.array([1.0])}, timeout=10)
    assert time.monotonic() - started < 2.0
    await anyio.sleep(1.5)
    for iid in ids:
        pending = await client.result(iid)
        assert pending.error is not None
        assert pending.error.code == "pending", pending
    quick_platform.start("scheduler", serve_scheduler, settings)
    for i, iid in enumerate(ids):
        reply = await final_result(client, iid)
        assert outputs_of(reply)["y"].tolist() == [float(i) + 1.0]


async def test_a_call_during_a_leadership_handover_waits_for_the_next_leader(
    quick_platform: Platform, nc: NATS
) -> None:
    """A lease that changes hands (here: someone else holds it for a moment, as when a
    starved scheduler's lease lapses) leaves no leader for a while: a call made then
    is answered once the scheduler leads again, not told `unavailable`."""
    await deploy_and_wait(nc, ADD_ONE)
    client = Client(nc)
    kv = await nc.jetstream().key_value(jetstream.LEADER_BUCKET)
    stepped_down = anyio.Event()

    async def on_beat(msg: Msg) -> None:
        if not decode(msg.data, SchedulerBeat).active:
            stepped_down.set()

    sub = await nc.subscribe(subjects.SCHEDULER_ALIVE, cb=on_beat)
    # Take the lease from it: its next renewal fails, and it cannot retake the lease
    # while this entry stands.
    with anyio.fail_after(5):
        while True:
            await kv.delete(LEASE_KEY)
            try:
                await kv.create(LEASE_KEY, b"intruder")
                break
            except KeyWrongLastSequenceError:  # it retook it in between: again
                continue
        await stepped_down.wait()
    await sub.unsubscribe()
    replies: list[dict[str, np.ndarray[Any, Any]]] = []

    async def call() -> None:
        replies.append(await client.invoke("add-one", {"x": np.array([1.0])}, timeout=10))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await anyio.sleep(0.4)
        assert not replies  # waiting for a leader, not answered `unavailable`
        await kv.delete(LEASE_KEY)  # the scheduler retakes it
    assert replies[0]["y"].tolist() == [2.0]


async def test_a_lease_that_lapses_under_a_waiting_call_is_retaken_not_handed_over(
    nats_server: NatsServer, tmp_path: Path, nc: NATS
) -> None:
    """A renewal that comes after the lease's TTL (the scheduler's loop stalled on a
    loaded machine; in CI, 1.4 s with two instances importing torch) finds no lease.
    No one else took it, so the scheduler takes it again and goes on: the call that
    waits in its queue meanwhile is answered, not told `unavailable`."""
    # One slot on the one worker: a second call waits in the scheduler's queue.
    with platform_at(nats_server.url, tmp_path / "state", capacity=1, scheduler_timeout_s=1.0):
        await deploy_and_wait(nc, SLEEP)
        client = Client(nc)
        kv = await nc.jetstream().key_value(jetstream.LEADER_BUCKET)
        stepped_down: list[SchedulerBeat] = []

        async def on_beat(msg: Msg) -> None:
            if not (beat := decode(msg.data, SchedulerBeat)).active:
                stepped_down.append(beat)

        sub = await nc.subscribe(subjects.SCHEDULER_ALIVE, cb=on_beat)
        replies: list[InvokeReply] = []

        async def call(seconds: float) -> None:
            x = {"seconds": np.array([seconds], dtype=np.float32)}
            replies.append(await client.invoke_reply("sleep", x, timeout=10))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 1.0)  # holds the one slot
            with anyio.fail_after(5):
                while (await client.status("scheduler")).details["assigned"] < 1:
                    await anyio.sleep(0.02)
            tg.start_soon(call, 0.0)  # waits in the scheduler's queue
            with anyio.fail_after(5):
                while (await client.status("scheduler")).details["pending"] < 1:
                    await anyio.sleep(0.02)
            await kv.delete(LEASE_KEY)  # what the TTL does to a lease renewed too late
        await sub.unsubscribe()
        assert [r.error for r in replies] == [None, None], replies
        status = await client.status("scheduler")
        assert status.details["lapses"] >= 1, status.details
        assert status.details["terms"] == 1, status.details
        assert stepped_down == []


async def test_a_stopping_scheduler_hands_what_waits_there_to_its_successor(
    nats_server: NatsServer, tmp_path: Path, nc: NATS
) -> None:
    """A clean stop with a standby running (a rolling restart): the call waiting in
    the stopping scheduler's queue goes to the standby once it leads, and is
    answered, not told `unavailable`."""
    overrides: dict[str, Any] = {"capacity": 1, "scheduler_timeout_s": 1.0}
    with platform_at(nats_server.url, tmp_path / "state", **overrides) as p:
        await deploy_and_wait(nc, SLEEP)
        client = Client(nc)
        p.start("standby", serve_scheduler, settings_for(p.url, p.state_dir, **overrides))
        with anyio.fail_after(10):
            while len(await client.statuses("scheduler", expect=2, timeout=1)) < 2:
                await anyio.sleep(0.05)

        async def leader() -> dict[str, Any]:
            found = await client.statuses("scheduler", expect=2, timeout=1)
            (details,) = [d for d in found.values() if d["active"]]
            return details

        replies: list[InvokeReply] = []

        async def call(seconds: float) -> None:
            x = {"seconds": np.array([seconds], dtype=np.float32)}
            replies.append(await client.invoke_reply("sleep", x, timeout=10))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 1.0)  # holds the one slot
            with anyio.fail_after(5):
                while (await leader())["assigned"] < 1:
                    await anyio.sleep(0.02)
            tg.start_soon(call, 0.0)  # waits in the active scheduler's queue
            with anyio.fail_after(5):
                while (await leader())["pending"] < 1:
                    await anyio.sleep(0.02)
            await anyio.to_thread.run_sync(p.stop, "scheduler")
        assert [r.error for r in replies] == [None, None], replies
        successor = await leader()
        assert successor["assigned"] >= 1, successor  # placed there


async def test_schedule_messages_without_routing_headers_are_answered(
    platform: Platform, nc: NATS
) -> None:
    bad_headers: list[dict[str, str] | None] = [
        None,
        {"Gfaas-Invocation-Id": "x1"},
        {"Gfaas-Function": "add-one"},
        {"Gfaas-Function": "no such name!", "Gfaas-Invocation-Id": "x2"},
        {"Gfaas-Function": "add-one", "Gfaas-Invocation-Id": "x3", "Gfaas-Deadline-Ms": "soon"},
    ]
    for headers in bad_headers:
        msg = await nc.request("gfaas.v1.schedule", b"", timeout=2, headers=headers)
        reply = msgspec.msgpack.decode(msg.data, type=InvokeReply)
        assert reply.error is not None
        assert reply.error.code == "bad_request", (headers, reply)


async def test_a_superseded_attempt_is_refused_by_the_results_store(nc: NATS) -> None:
    store = ResultStore(await jetstream.results_kv(nc.jetstream()), max_payload=1 << 20)
    first = await store.create("inv-1", AsyncRecord(state=AsyncState.PENDING))
    assert first is not None
    second = await store.swap("inv-1", AsyncRecord(state=AsyncState.PENDING, attempt=2), first)
    assert second is not None
    from shared.errors import GfaasError

    with pytest.raises(GfaasError) as refused:
        await store.claim("inv-1", first, "w0")
    assert refused.value.code is ErrorCode.SUPERSEDED
    assert await store.claim("inv-1", second, "w0") > second


async def test_a_platform_fault_in_the_worker_is_retried_not_stored_as_the_result(
    nats_server: NatsServer, tmp_path: Path, nc: NATS
) -> None:
    """The worker that claimed an attempt and failed it through no fault of the
    caller's (here its model is not in the store) must leave it to be tried again;
    it stored the failure as the result, and every redelivery answered it, final."""
    with platform_at(
        nats_server.url,
        tmp_path / "state",
        async_backoff_s=0.05,
        async_backoff_max_s=0.1,
        async_max_attempts=3,
    ):
        spec = FunctionSpec(name="scale", handler="tests.funcs:Scale", model="not-pushed")
        client = Client(nc)
        # `deploy` refuses a model not pushed: registered around it (a model deleted since).
        await (await client.registry()).put(spec)
        await deploy_and_wait(nc, ADD_ONE)
        with anyio.fail_after(5):  # ingress's registry watch sees it too
            while "scale" not in (await client.status("ingress")).details["functions"]:
                await anyio.sleep(0.02)
        iid = await client.invoke_async("scale", {"x": np.array([1.0])})
        reply = await final_result(client, iid)
        assert reply.error is not None
        assert reply.error.code == "model_unavailable"
        assert reply.error.reason.startswith("gave up after 3 attempts"), reply.error.reason
        js = nc.jetstream()
        dead = await js.get_msg(jetstream.DEAD_LETTER_STREAM, 1)
        assert dead.headers is not None
        assert dead.headers[H_DEAD_CODE] == "model_unavailable"


async def test_a_result_just_under_the_store_limit_is_stored_not_a_dropped_connection(
    nc: NATS,
) -> None:
    """The fit was checked on the reply alone (+64 bytes), but the KV write is the
    record around it with an expected-revision header: a reply just under the limit
    went past max_payload, the server closed the connection and the store timed out."""
    store = ResultStore(await jetstream.results_kv(nc.jetstream()), max_payload=nc.max_payload)

    def reply_of(size: int) -> InvokeReply:
        n = size
        while True:  # the framing around the bytes is some tens of bytes
            tensor = Tensor(name="y", dtype=DType.UINT8, shape=[n], data=b"\0" * n)
            reply = InvokeReply(invocation_id="near-limit", outputs=[tensor])
            over = len(msgspec.msgpack.encode(reply)) - size
            if not over:
                return reply
            n -= over

    reply = reply_of(nc.max_payload - 64)
    first = await store.create("near-limit", AsyncRecord(state=AsyncState.PENDING))
    assert first is not None
    with anyio.fail_after(5):
        assert await store.swap("near-limit", store.done(reply), first) is not None
    assert nc.is_connected
    got = await store.get("near-limit")
    assert got is not None
    assert got[0].reply is not None
    assert got[0].reply.error is not None
    assert got[0].reply.error.code is ErrorCode.PAYLOAD_TOO_LARGE
    # One well inside the limit is stored as it is.
    fits = reply_of(nc.max_payload // 2)
    assert await store.create("well-inside", store.done(fits)) is not None
    got = await store.get("well-inside")
    assert got is not None
    assert got[0].reply == fits


async def test_an_unexpected_error_after_the_claim_gives_the_attempt_back(
    quick_platform: Platform, nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that failed with no GfaasError after its claim (here the registry read
    timed out in an outage of the bus) was answered `internal`, but its claim was
    kept: the worker listed it in every heartbeat as still running, so ingress waited
    on it for good and the invocation never ended."""
    from services.gpu_worker.execute import Executor
    from shared.schema import InvocationMeta

    await deploy_and_wait(nc, ADD_ONE)
    real = Executor.execute
    failed: list[str] = []

    async def once_timed_out(
        self: Executor, meta: InvocationMeta, data: bytes
    ) -> tuple[InvokeReply, float]:
        if not failed:
            failed.append(meta.invocation_id)
            raise TimeoutError("the registry did not answer")
        return await real(self, meta, data)

    monkeypatch.setattr(Executor, "execute", once_timed_out)
    client = Client(nc)
    iid = await client.invoke_async("add-one", {"x": np.array([1.0])})
    reply = await final_result(client, iid, timeout=10)
    assert failed == [iid]
    assert outputs_of(reply)["y"].tolist() == [2.0]

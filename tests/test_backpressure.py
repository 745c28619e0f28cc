"""Back-pressure: a worker at capacity hands what the scheduler placed there back to
it, and the scheduler places it again (elsewhere, or once a slot frees) instead of
the caller hearing `overloaded`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import anyio
import msgspec
import numpy as np
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from gfaas.client import Client
from services.gpu_worker.handlers import Bus as WorkerBus
from services.gpu_worker.handlers import Job, Runs
from services.gpu_worker.state import Books
from services.scheduler.handlers import MAX_LOST_STARTS, Scheduler
from services.scheduler.state import Invocation
from shared import subjects
from shared.bus import NatsBus
from shared.config import Settings
from shared.natsd import NatsServer
from shared.registry import Registry
from shared.scheduling import make_policy
from shared.schema import (
    Done,
    ErrorCode,
    FunctionSpec,
    InvocationMeta,
    InvokeReply,
    Refused,
    RefusedReply,
    decode,
    encode,
    now_millis,
)
from tests.helpers import body, deploy_and_wait
from tests.platform import Platform, platform_at
from tests.test_scheduler_views import heartbeat, invocation

SLEEP = FunctionSpec(name="sleep", handler="tests.funcs:sleep", concurrency=4)


# -- the scheduler's handler, with a fake bus -------------------------------------------


class FakeBus:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.errors: list[tuple[str, ErrorCode]] = []

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        reply: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.published.append((subject, data))

    async def request(
        self, subject: str, data: bytes, *, timeout: float, headers: Mapping[str, str] | None = None
    ) -> bytes:
        raise AssertionError("the scheduler asks nothing of the bus")

    async def reply_error(
        self, subject: str, invocation_id: str, code: ErrorCode, reason: str
    ) -> None:
        self.errors.append((invocation_id, code))


class UnsyncedRegistry:
    """What the scheduler's tick reads of a registry whose watch has not caught up."""

    synced = False
    specs: dict[str, FunctionSpec] = {}


def two_workers(bus: FakeBus) -> Scheduler:
    """A scheduler that knows workers w0 and w1, one slot each, nothing running."""
    # Only new invocations look specs up; the tick asks whether the registry is read
    # through (not yet: nothing counts as removed).
    registry = cast(Registry[FunctionSpec], UnsyncedRegistry())
    scheduler = Scheduler(bus, registry, make_policy("least_loaded"), Settings())
    for wid in ("w0", "w1"):
        scheduler.state.observe(msgspec.structs.replace(heartbeat(wid), capacity=1), 0.0)
    return scheduler


def refusal(worker_id: str, invocation_id: str) -> Refused:
    return Refused(worker_id=worker_id, invocation_id=invocation_id, inflight=1, capacity=1)


@pytest.mark.unit
@pytest.mark.anyio
async def test_a_refused_invocation_goes_to_a_worker_with_room() -> None:
    bus = FakeBus()
    scheduler = two_workers(bus)
    inv = invocation(scheduler.state, 0, SLEEP, 0.0)
    scheduler.state.assign("w0", inv, 0.0)
    answer = await scheduler.refused(refusal("w0", "i0"))
    assert answer == RefusedReply(taken=True)
    assert [s for s, _ in bus.published] == [subjects.worker_run("w1")]
    assert "i0" in scheduler.state.workers["w1"].running
    assert "i0" not in scheduler.state.workers["w0"].running
    # w0 said it is full: nothing more goes there until a slot frees.
    assert scheduler.state.workers["w0"].view.outstanding == 1


@pytest.mark.unit
@pytest.mark.anyio
async def test_a_refused_invocation_waits_while_every_worker_is_full_then_runs() -> None:
    bus = FakeBus()
    scheduler = two_workers(bus)
    first, second = (invocation(scheduler.state, n, SLEEP, 0.0) for n in (0, 1))
    scheduler.state.assign("w0", first, 0.0)
    scheduler.state.assign("w1", second, 0.0)
    assert await scheduler.refused(refusal("w0", "i0")) == RefusedReply(taken=True)
    assert list(scheduler.state.pending) == ["i0"]
    assert not bus.published
    assert not bus.errors
    # What w0 ran behind the scheduler's back ends: its slot is free again.
    unseen = Done(worker_id="w0", invocation_id="elsewhere", function="sleep", ok=True)
    await scheduler.done(unseen, scheduled=True)
    assert [s for s, _ in bus.published] == [subjects.worker_run("w0")]
    assert not scheduler.state.pending


@pytest.mark.unit
@pytest.mark.anyio
async def test_a_refusal_for_an_invocation_the_scheduler_does_not_hold_is_not_taken() -> None:
    bus = FakeBus()
    scheduler = two_workers(bus)
    assert await scheduler.refused(refusal("w0", "unknown")) == RefusedReply(taken=False)
    assert not bus.published
    assert not scheduler.state.pending


@pytest.mark.unit
@pytest.mark.anyio
async def test_a_refusal_past_the_invocations_deadline_is_left_to_the_worker() -> None:
    # Taken, it would be placed or expired again: its caller would hear from the
    # worker (which answers what it holds when not taken) and from the scheduler too.
    bus = FakeBus()
    scheduler = two_workers(bus)
    inv = invocation(scheduler.state, 0, SLEEP, 0.0)
    inv.meta = msgspec.structs.replace(inv.meta, deadline_ms=now_millis() - 1)
    scheduler.state.assign("w0", inv, 0.0)
    assert await scheduler.refused(refusal("w0", "i0")) == RefusedReply(taken=False)
    assert not bus.published
    assert not scheduler.state.pending
    # Its slot is freed by the worker's Done, sent with its answer.
    done = Done(worker_id="w0", invocation_id="i0", function="sleep", ok=False)
    await scheduler.done(done, scheduled=True)
    assert scheduler.state.workers["w0"].view.outstanding == 0


@pytest.mark.unit
@pytest.mark.anyio
async def test_two_invocations_waiting_under_one_id_are_both_served() -> None:
    # Callers may reuse an id (a correlation id): the second used to replace the first
    # in the queue, whose caller was never answered.
    bus = FakeBus()
    scheduler = two_workers(bus)
    state = scheduler.state
    for n, wid in ((8, "w0"), (9, "w1")):
        state.assign(wid, invocation(state, n, SLEEP, 0.0), 0.0)
    first, second = invocation(state, 0, SLEEP, 0.0), invocation(state, 0, SLEEP, 0.1)
    first.reply, second.reply = "inbox.first", "inbox.second"
    assert state.enqueue(first)
    assert state.enqueue(second)
    assert len(state.pending) == 2
    state.requeue(state.take(second.view.invocation_id))  # placed, refused, back
    assert len(state.pending) == 2
    for n, wid in ((8, "w0"), (9, "w1")):
        done = Done(worker_id=wid, invocation_id=f"i{n}", function="sleep", ok=True)
        await scheduler.done(done, scheduled=True)
    assert not state.pending
    assert len(bus.published) == 2
    assert {b.running["i0"].reply for b in state.workers.values()} == {
        "inbox.first",
        "inbox.second",
    }
    # Expired, both are answered.
    third, fourth = (invocation(state, 5, SLEEP, 0.0) for _ in range(2))
    for inv in (third, fourth):
        inv.meta = msgspec.structs.replace(inv.meta, deadline_ms=1)
        assert state.enqueue(inv)
    assert state.expire_pending(now_millis()) == [third, fourth]
    assert not state.pending


# -- live ----------------------------------------------------------------------------------


@pytest.fixture
def one_slot(nats_server: NatsServer, tmp_path: Path) -> Iterator[Platform]:
    with platform_at(nats_server.url, tmp_path / "s", workers=1, capacity=1) as p:
        yield p


@pytest.fixture
def one_slot_each(nats_server: NatsServer, tmp_path: Path) -> Iterator[Platform]:
    with platform_at(nats_server.url, tmp_path / "s", workers=2, capacity=1) as p:
        yield p


@asynccontextmanager
async def occupied(nc: NATS, worker_id: str, seconds: float) -> AsyncIterator[list[InvokeReply]]:
    """`worker_id` runs, for `seconds`, a call the scheduler never placed (as a former
    leader's would be), so its books say the worker is free. Yields where the call's
    reply is once the block has ended."""
    meta = InvocationMeta(
        invocation_id=f"behind-{worker_id}", function="sleep", deadline_ms=now_millis() + 30_000
    )
    replies: list[InvokeReply] = []

    async def occupy() -> None:
        msg = await nc.request(
            subjects.worker_run(worker_id),
            body(seconds=np.array(seconds)),
            timeout=30,
            headers=meta.to_headers(),
        )
        replies.append(decode(msg.data, InvokeReply))

    async with anyio.create_task_group() as tg:
        tg.start_soon(occupy)
        with anyio.fail_after(10):
            while not await running_on(Client(nc), worker_id):
                await anyio.sleep(0.02)
        yield replies


async def running_on(client: Client, worker_id: str) -> bool:
    statuses = await client.statuses("gpu-worker", expect=2, timeout=0.2)
    return any(d["worker_id"] == worker_id and d["inflight"] for d in statuses.values())


@pytest.mark.nats
@pytest.mark.anyio
async def test_a_full_worker_hands_the_call_back_and_the_caller_gets_its_result(
    one_slot: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await deploy_and_wait(nc, SLEEP)
    async with occupied(nc, "w0", 1.0) as behind:
        reply = await client.invoke_reply("sleep", {"seconds": np.array(0.01)}, timeout=20)
    assert reply.error is None, reply.error
    assert [r.error for r in behind] == [None]
    scheduler = (await client.status("scheduler")).details
    worker = (await client.status("gpu-worker")).details
    assert scheduler["replaced"] >= 1
    assert worker["refused"] >= 1
    # It waited in the scheduler's queue until the slot freed; the queue is empty again.
    assert scheduler["pending"] == 0


@pytest.mark.nats
@pytest.mark.anyio
async def test_a_refused_call_is_placed_on_another_worker(
    one_slot_each: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await deploy_and_wait(nc, SLEEP)
    replies: list[InvokeReply] = []

    async def call() -> None:
        replies.append(await client.invoke_reply("sleep", {"seconds": np.array(0.05)}, timeout=20))

    async with occupied(nc, "w0", 4.0):
        started = time.monotonic()
        async with anyio.create_task_group() as calls:
            # Two at once: the scheduler, seeing both workers free, puts one on w0.
            calls.start_soon(call)
            calls.start_soon(call)
        elapsed = time.monotonic() - started
    assert [r.error for r in replies] == [None, None]
    assert {r.worker for r in replies} == {"w1"}
    # Both ran on w1, one after the other: neither waited for w0's slot.
    assert elapsed < 3.0
    assert (await client.status("scheduler")).details["replaced"] >= 1


@pytest.mark.unit
@pytest.mark.anyio
async def test_what_a_starting_instance_took_waits_again_when_it_is_lost_a_few_times() -> None:
    # An instance runs nothing it took while starting before its ready beat; one lost
    # before the scheduler heard that beat ran none of it: the invocation waits again
    # (up to MAX_LOST_STARTS times), where a ready worker's loss answers worker_lost.
    bus = FakeBus()
    scheduler = two_workers(bus)

    async def lose(worker_id: str, inv: Invocation, *, starting: bool) -> None:
        """`worker_id` holds `inv`, then goes silent past the timeout."""
        for other in scheduler.state.workers.values():
            other.last_seen = time.monotonic()
        book = scheduler.state.workers[worker_id]
        book.starting = starting
        scheduler.state.assign(worker_id, inv, 0.0)
        book.last_seen = -1e9
        scheduler.health.heard_self(time.monotonic())  # the bus itself is fine
        await scheduler.tick()
        assert worker_id not in scheduler.state.workers
        # A worker of the same name comes back (the next start), one slot, none free.
        again = msgspec.structs.replace(heartbeat(worker_id), capacity=0)
        scheduler.state.observe(again, time.monotonic())

    await lose("w1", invocation(scheduler.state, 0, SLEEP, 0.0), starting=False)
    assert bus.errors == [("i0", ErrorCode.WORKER_LOST)]
    taken = invocation(scheduler.state, 1, SLEEP, 0.0)
    for _ in range(MAX_LOST_STARTS):
        await lose("w0", taken, starting=True)
        assert list(scheduler.state.pending) == ["i1"]
        assert bus.errors == [("i0", ErrorCode.WORKER_LOST)]
        scheduler.state.take("i1")
    await lose("w0", taken, starting=True)
    assert bus.errors == [("i0", ErrorCode.WORKER_LOST), ("i1", ErrorCode.WORKER_LOST)]
    assert not scheduler.state.pending


@pytest.mark.nats
@pytest.mark.anyio
async def test_a_full_worker_waits_for_the_schedulers_answer_even_past_the_deadline(
    nc: NATS,
) -> None:
    # It used to wait no longer than the invocation's deadline: a scheduler that took
    # the invocation back a little later had it answered twice (`overloaded` by the
    # worker, then by whatever the scheduler did with it).
    books = Books(worker_id="w0", device="cpu", node="", limit=0, capacity=0)  # full
    unused = cast(Any, None)  # a refused invocation is neither claimed nor executed
    runs = Runs(cast(WorkerBus, NatsBus(nc)), books, unused, unused, "w0")

    async def slow_scheduler(msg: Msg) -> None:
        await anyio.sleep(0.05)
        await msg.respond(encode(RefusedReply(taken=True)))

    await nc.subscribe(subjects.REFUSED, cb=slow_scheduler)
    answered: list[bytes] = []

    async def caller(msg: Msg) -> None:
        answered.append(msg.data)

    inbox = nc.new_inbox()
    await nc.subscribe(inbox, cb=caller)
    meta = InvocationMeta(invocation_id="late", function="sleep", deadline_ms=now_millis() + 5)
    assert not await runs.admit(Job(meta, b"", inbox, meta.to_headers()))
    await nc.flush()
    await anyio.sleep(0.1)
    assert not answered  # the scheduler took it: it answers

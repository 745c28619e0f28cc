"""The scheduler's books of each worker (services/scheduler/state.py's WorkerBook),
driven through its handlers with a fake bus: restarts, reused invocation ids, and
notes that do not match what the books hold."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from gfaas.client import Client
from services.gpu_worker.state import Books
from services.scheduler.handlers import Scheduler
from shared import subjects
from shared.natsd import NatsServer
from shared.scheduling.grants import HOT_CALLS
from shared.schema import (
    Done,
    ErrorCode,
    FunctionSpec,
    Refused,
    RefusedReply,
    WorkerHeartbeat,
    WorkerLost,
    decode,
    encode,
)
from tests.helpers import body, deploy_and_wait, request
from tests.platform import platform_at
from tests.test_backpressure import FakeBus, two_workers
from tests.test_scheduler_views import heartbeat, invocation

pytestmark = pytest.mark.unit

SLEEP = FunctionSpec(name="sleep", handler="tests.funcs:sleep", concurrency=4)


def beat(worker_id: str, boot: str, capacity: int = 1, inflight: int = 0) -> WorkerHeartbeat:
    hb = heartbeat(worker_id)
    return msgspec.structs.replace(hb, capacity=capacity, boot=boot, inflight=inflight)


def booted(bus: FakeBus) -> Scheduler:
    """two_workers, each beating from a process with boot "one"."""
    scheduler = two_workers(bus)
    for wid in ("w0", "w1"):
        scheduler.state.workers[wid].boot = "one"
    return scheduler


def lost_notes(bus: FakeBus) -> list[WorkerLost]:
    return [decode(d, WorkerLost) for s, d in bus.published if s == subjects.WORKER_LOST]


@pytest.mark.anyio
async def test_a_worker_restarted_under_its_id_loses_what_the_old_process_ran() -> None:
    """A worker restarted (same GFAAS_WORKER_ID, or a container's same hostname and
    pid) before the timeout reaped it: its old invocations died with the old process
    and send no Done. They used to stay in the books, its one slot held for good and
    their callers unanswered; now they are answered `worker_lost` and the new
    process starts with books of its own."""
    bus = FakeBus()
    scheduler = booted(bus)
    state = scheduler.state
    await scheduler.heartbeat(beat("w0", "one", capacity=8))
    # Hot enough for a grant to an ingress: slots lent out on w0 too.
    for n in range(HOT_CALLS):
        inv = invocation(state, n, SLEEP, 0.0)
        state.assign("w0", inv, 0.0)
        grant = state.lend("ing", inv, SLEEP, "w0", ttl_s=2.0, now=0.0)
    assert grant is not None
    assert state.workers["w0"].view.outstanding == HOT_CALLS + grant.slots
    # The same process, running them all: kept.
    await scheduler.heartbeat(beat("w0", "one", capacity=8, inflight=HOT_CALLS))
    assert len(state.workers["w0"].running) == HOT_CALLS
    assert not bus.errors

    await scheduler.heartbeat(beat("w0", "two", capacity=8))  # another process
    assert sorted(bus.errors) == [(f"i{n}", ErrorCode.WORKER_LOST) for n in range(HOT_CALLS)]
    assert [x.worker_id for x in lost_notes(bus)] == ["w0"]  # ingress answers its own
    book = state.workers["w0"]
    assert (book.running, book.lent, book.boot) == ({}, {}, "two")
    assert book.view.outstanding == 0
    assert list(state.lent()) == []


@pytest.mark.anyio
async def test_a_restarted_worker_takes_what_waits_at_once() -> None:
    bus = FakeBus()
    scheduler = booted(bus)
    state = scheduler.state
    state.assign("w0", invocation(state, 0, SLEEP, 0.0), 0.0)
    state.assign("w1", invocation(state, 1, SLEEP, 0.0), 0.0)
    waiting = invocation(state, 2, SLEEP, 0.0)
    assert state.enqueue(waiting)
    await scheduler.heartbeat(beat("w1", "other"))
    assert bus.errors == [("i1", ErrorCode.WORKER_LOST)]
    assert not state.pending
    assert [s for s, _ in bus.published][-1] == subjects.worker_run("w1")
    assert list(state.workers["w1"].running) == ["i2"]
    # Its Done frees the new process's slot; w0 never restarted and keeps its run.
    done = Done(worker_id="w1", invocation_id="i2", function="sleep", ok=True)
    await scheduler.done(done, scheduled=True)
    assert state.workers["w1"].view.outstanding == 0
    assert list(state.workers["w0"].running) == ["i0"]


def test_each_worker_process_beats_with_its_own_boot() -> None:
    one, two = (Books(worker_id="w", device="cpu", node="n", limit=1, capacity=1) for _ in "12")
    assert len(one.boot) == len(two.boot) == 16
    assert one.boot != two.boot
    hb = decode(msgspec.msgpack.encode(beat("w", one.boot)), WorkerHeartbeat)
    assert hb.boot == one.boot


class RepliesBus(FakeBus):
    """FakeBus, with the reply subject each error answer went to."""

    def __init__(self) -> None:
        super().__init__()
        self.answered: list[str] = []

    async def reply_error(
        self, subject: str, invocation_id: str, code: ErrorCode, reason: str
    ) -> None:
        await super().reply_error(subject, invocation_id, code, reason)
        self.answered.append(subject)


def twins(scheduler: Scheduler, worker_id: str = "w0") -> None:
    """Two invocations under one caller's id "i0", both sent to `worker_id`."""
    state = scheduler.state
    for reply in ("inbox.first", "inbox.second"):
        inv = invocation(state, 0, SLEEP, 0.0)
        inv.reply = reply
        state.assign(worker_id, inv, 0.0)


@pytest.mark.anyio
async def test_two_invocations_running_under_one_id_each_free_their_slot() -> None:
    """Callers may reuse an id: two under one on a worker were one record in its
    running books (the second replaced the first), so their two Done notes freed one
    slot, the other held for good."""
    bus = RepliesBus()
    scheduler = booted(bus)
    state = scheduler.state
    twins(scheduler)
    assert len(state.workers["w0"].running) == 2
    assert state.workers["w0"].view.outstanding == 2
    for reply in ("inbox.second", "inbox.first"):
        done = Done(worker_id="w0", invocation_id="i0", function="sleep", ok=True, reply=reply)
        await scheduler.done(done, scheduled=True)
    assert state.workers["w0"].running == {}
    assert state.workers["w0"].view.outstanding == 0
    # From a worker that names no reply subject: the first sent goes first.
    twins(scheduler)
    plain = Done(worker_id="w0", invocation_id="i0", function="sleep", ok=True)
    await scheduler.done(plain, scheduled=True)
    assert [i.reply for i in state.workers["w0"].running.values()] == ["inbox.second"]


@pytest.mark.anyio
async def test_a_lost_worker_answers_both_invocations_under_one_id() -> None:
    bus = RepliesBus()
    scheduler = booted(bus)
    twins(scheduler)
    await scheduler.heartbeat(beat("w0", "two"))
    assert sorted(bus.answered) == ["inbox.first", "inbox.second"]
    assert bus.errors == [("i0", ErrorCode.WORKER_LOST)] * 2


@pytest.mark.anyio
async def test_the_refused_one_of_two_under_one_id_is_the_one_placed_again() -> None:
    bus = RepliesBus()
    scheduler = booted(bus)
    state = scheduler.state
    twins(scheduler)
    refused = Refused(
        worker_id="w0", invocation_id="i0", inflight=1, capacity=1, reply="inbox.second"
    )
    assert await scheduler.refused(refused) == RefusedReply(taken=True)
    assert [i.reply for i in state.workers["w0"].running.values()] == ["inbox.first"]
    assert [i.reply for i in state.workers["w1"].running.values()] == ["inbox.second"]


@pytest.mark.anyio
async def test_an_ingress_silent_only_while_the_bus_was_down_keeps_its_grants() -> None:
    """The books took back the grants of an ingress not heard for the worker timeout
    even while the scheduler heard nobody (the bus down): the ingress, never told,
    kept sending under them once the bus was back, into slots placed on again."""
    bus = FakeBus()
    scheduler = booted(bus)
    state = scheduler.state
    # Lent, and the bus last heard, long ago; the ingress unheard since.
    then = time.monotonic() - 2 * state.worker_timeout_s
    state.observe(beat("w0", "one", capacity=8), then)
    for n in range(HOT_CALLS):
        inv = invocation(state, n, SLEEP, then)
        state.assign("w0", inv, then)
        grant = state.lend("ing", inv, SLEEP, "w0", ttl_s=60.0, now=then)
    assert grant is not None
    scheduler.health.heard_self(then)
    state.ingress_seen["ing"] = then
    await scheduler.tick()
    assert [x.grant for x in state.lapsed(time.monotonic(), heard=False)] == []
    assert [x.grant for x in state.lent()] == [grant]
    # The bus back: the ingress gets a full timeout from then to be heard again.
    scheduler.health.heard_self(time.monotonic())
    await scheduler.tick()
    assert [x.grant for x in state.lent()] == [grant]
    # Silent with the bus up, it loses them.
    assert [x.grant for x in state.lapsed(time.monotonic() + state.worker_timeout_s + 1)] == [grant]


@pytest.mark.anyio
async def test_a_lost_done_note_does_not_hold_its_slot_for_good() -> None:
    """A Done note lost on the bus (the scheduler reconnecting, say) left its
    invocation running in the books for good: its worker's one slot stayed busy and
    what waited for it waited until its deadline. The worker's beats say it runs
    nothing: what was sent a worker timeout ago and is not counted there goes."""
    bus = FakeBus()
    scheduler = booted(bus)
    state = scheduler.state
    now = time.monotonic()
    state.assign("w0", invocation(state, 0, SLEEP, now), now - 2 * state.worker_timeout_s)
    state.assign("w1", invocation(state, 1, SLEEP, now), now)
    assert state.enqueue(invocation(state, 2, SLEEP, now))
    # What was sent to w1 just now may not have been there when it beat: kept.
    await scheduler.heartbeat(beat("w1", "one", inflight=0))
    assert list(state.workers["w1"].running) == ["i1"]
    assert list(state.pending) == ["i2"]
    # w0 runs nothing, though the books say i0 since long ago: its slot is free.
    await scheduler.heartbeat(beat("w0", "one", inflight=0))
    assert list(state.workers["w0"].running) == ["i2"]
    assert not state.pending
    assert not bus.errors
    # While it still runs what it was sent, nothing goes.
    await scheduler.heartbeat(beat("w0", "one", inflight=1))
    assert list(state.workers["w0"].running) == ["i2"]


# -- live: a worker restarted under its id, over NATS ---------------------------------


@pytest.mark.nats
@pytest.mark.anyio
async def test_live_a_caller_hears_worker_lost_when_its_worker_restarts(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    """A worker (here the test, beating as "fake") takes an invocation and restarts
    before the scheduler's worker timeout: the caller hears `worker_lost` once the new
    process beats, not at its deadline."""
    with platform_at(nats_server.url, tmp_path, workers=0, worker_timeout_s=30.0):
        boot = "one"
        took = anyio.Event()

        async def on_run(msg: Msg) -> None:
            took.set()  # and never answered: the process dies with it

        await nc.subscribe(subjects.worker_run("fake"), cb=on_run)

        async def beating() -> None:
            while True:
                hb = msgspec.structs.replace(beat("fake", boot, capacity=4), inflight=0)
                await nc.publish(subjects.heartbeat("fake"), encode(hb))
                await anyio.sleep(0.1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(beating)
            await deploy_and_wait(nc, SLEEP, handler_check=False)
            with anyio.fail_after(4.0):
                while "fake" not in (await Client(nc).status("scheduler")).details["workers"]:
                    await anyio.sleep(0.05)
                async with anyio.create_task_group() as calls:
                    answer: list[dict[str, Any]] = []

                    async def call() -> None:
                        _, reply = await request(nc, "sleep", body(x=np.ones(1, np.float32)))
                        answer.append(reply)

                    calls.start_soon(call)
                    await took.wait()
                    boot = "two"
            tg.cancel_scope.cancel()
        (reply,) = answer
        assert reply["error"]["code"] == "worker_lost", reply
        assert "restarted" in reply["error"]["reason"]

"""The books behind direct sends, without NATS: the grant policy, the scheduler's
lent slots, and ingress's routes."""

from __future__ import annotations

import time
from collections.abc import Mapping

import anyio
import msgspec
import pytest

from services.ingress.direct import OVERDUE_MEMORY_S, STOP_BEFORE_S, DirectRoutes
from services.ingress.dispatch import Dispatcher
from services.scheduler.state import ClusterState
from shared import subjects
from shared.config import Settings
from shared.scheduling import RequestView, WorkerView
from shared.scheduling.grants import HOT_CALLS, grant_slots
from shared.schema import (
    Done,
    ErrorCode,
    FunctionKind,
    FunctionSpec,
    Grant,
    InvocationMeta,
    SchedulerBeat,
    WorkerLost,
    decode,
    now_millis,
)
from tests.test_backpressure import FakeBus
from tests.test_scheduler_views import MB, heartbeat, invocation

pytestmark = pytest.mark.unit

FN = FunctionSpec(name="f", handler="m:f", kind=FunctionKind.GPU, model="m", concurrency=3)


def worker(outstanding: int = 0, *resident: str) -> WorkerView:
    return WorkerView(
        worker_id="w",
        device="cpu",
        capacity=8,
        outstanding=outstanding,
        resident=frozenset(resident),
    )


def request(model: str = "m") -> RequestView:
    return RequestView(
        invocation_id="i", function="f", kind=FunctionKind.GPU, model=model, model_bytes=MB
    )


# -- the policy ----------------------------------------------------------------------------


def test_half_the_free_slots_are_lent_up_to_the_functions_concurrency() -> None:
    warm = worker(1, "m")
    assert grant_slots(warm, request(), queued=0, limit=8, now=0.0) == 3
    assert grant_slots(warm, request(), queued=0, limit=2, now=0.0) == 2
    # 3 free slots: too few to hold any back (MIN_FREE).
    busy = worker(5, "m")
    assert grant_slots(busy, request(), queued=0, limit=8, now=0.0) == 0


def test_nothing_is_lent_while_work_waits_or_the_model_is_not_there() -> None:
    warm = worker(0, "m")
    assert grant_slots(warm, request(), queued=1, limit=8, now=0.0) == 0
    cold = worker(0)
    assert grant_slots(cold, request(), queued=0, limit=8, now=0.0) == 0
    # A function without a model needs nothing resident.
    assert grant_slots(cold, request(model=""), queued=0, limit=8, now=0.0) == 4
    # Nor is anything lent for a function called now and then.
    assert grant_slots(warm, request(), queued=0, limit=8, now=0.0, recent_calls=2) == 0


# -- the scheduler's books -----------------------------------------------------------------


def lent_state(now: float = 0.0) -> tuple[ClusterState, Grant]:
    state = ClusterState(worker_timeout_s=5.0, pending_limit=10)
    hb = msgspec.structs.replace(heartbeat("w", m=MB), capacity=8)
    state.observe(hb, now)
    for n in range(HOT_CALLS - 1):  # calls that came and went: not hot yet
        inv = invocation(state, n, FN, now)
        state.assign("w", inv, now)
        assert state.lend("ing", inv, FN, "w", ttl_s=2.0, now=now) is None
        state.finish("w", inv.meta.invocation_id)
    inv = invocation(state, HOT_CALLS, FN, now)
    state.assign("w", inv, now)
    grant = state.lend("ing", inv, FN, "w", ttl_s=2.0, now=now)
    assert grant is not None
    return state, grant


def test_lent_slots_count_as_busy_until_given_back() -> None:
    state, grant = lent_state()
    assert grant.slots == 3
    assert state.workers["w"].view.outstanding == 1 + 3
    # A heartbeat rebuilds the view: the lent slots stay counted.
    state.observe(msgspec.structs.replace(heartbeat("w", m=MB), capacity=8), 0.5)
    assert state.workers["w"].view.outstanding == 1 + 3
    assert state.give_back("w", grant.grant_id)
    assert state.workers["w"].view.outstanding == 1
    assert not state.give_back("w", grant.grant_id)  # once only


def test_a_grant_is_renewed_for_its_ingress_not_doubled() -> None:
    state, grant = lent_state()
    again = state.lend("ing", invocation(state, 2, FN, 1.0), FN, "w", ttl_s=2.0, now=1.0)
    assert again == grant
    assert state.workers["w"].view.outstanding == 1 + 3
    (lent,) = state.lent()
    assert lent.expires_at == 3.0


def test_revoked_grants_are_not_renewed_and_lapse_when_never_returned() -> None:
    state, grant = lent_state()
    (revoked,) = state.revoke()
    assert revoked.grant == grant
    assert state.revoke() == []  # told once
    assert state.lend("ing", invocation(state, 2, FN, 1.0), FN, "w", ttl_s=2.0, now=1.0) is None
    # Its ingress, alive, never gives it back: the slots come back once the longest
    # run it could have sent (the function's timeout) is over.
    late = 2.0 + FN.timeout_ms / 1000.0
    state.ingress_seen["ing"] = late
    assert state.lapsed(now=late) == []
    state.ingress_seen["ing"] = late + 1.0
    assert [x.grant for x in state.lapsed(now=late + 1.0)] == [grant]
    assert state.workers["w"].view.outstanding == 1


def test_an_ingress_that_stops_saying_it_is_alive_loses_its_grants() -> None:
    state, grant = lent_state()
    state.ingress_seen["ing"] = 1.0
    assert state.lapsed(now=1.0 + state.worker_timeout_s) == []
    assert [x.grant for x in state.lapsed(now=1.1 + state.worker_timeout_s)] == [grant]
    assert state.workers["w"].view.outstanding == 1


def test_a_gone_ingress_and_idle_call_times_are_forgotten() -> None:
    """Each ingress start has an id of its own: what the books keep per ingress (when
    it was last heard, its recent calls per function) goes once it is gone, or the
    books grow for the scheduler's lifetime."""
    state, grant = lent_state()
    state.ingress_seen["ing"] = 0.0
    state.ingress_seen["other"] = 0.0
    assert ("ing", "f") in state.calls
    state.forget_idle(now=0.5)  # all heard lately, "f" called within the hot window
    assert set(state.ingress_seen) == {"ing", "other"}
    assert ("ing", "f") in state.calls
    state.ingress_seen["ing"] = 5.0
    late = 0.1 + state.worker_timeout_s
    # While the bus is not heard, nobody's silence counts: only stale call times go.
    state.forget_idle(now=late, heard=False)
    assert set(state.ingress_seen) == {"ing", "other"}
    assert state.calls == {}
    assert [x.grant for x in state.lapsed(now=late)] == []
    state.forget_idle(now=late)
    assert set(state.ingress_seen) == {"ing"}
    # Called again, a pair starts afresh (not hot until it is called HOT_CALLS times).
    inv = invocation(state, 9, FN, late)
    state.assign("w", inv, late)
    assert state.lend("other", inv, FN, "w", ttl_s=2.0, now=late) is None
    assert len(state.calls[("other", "f")]) == 1
    assert grant.grant_id in state.workers["w"].lent


# -- ingress's routes ----------------------------------------------------------------------

GRANT = Grant(grant_id="g1", function="f", worker_id="w", slots=2, ttl_s=2.0)


def test_routes_send_up_to_the_lent_slots_and_free_them_on_done() -> None:
    routes = DirectRoutes()
    assert routes.on_grant(GRANT, now=0.0) == []
    assert routes.take("f", "a", 0.1, deadline=9.0) == "w"
    assert routes.take("f", "b", 0.1, deadline=9.0) == "w"
    assert routes.take("f", "c", 0.1, deadline=9.0) is None  # both slots busy
    assert routes.take("g", "d", 0.1, deadline=9.0) is None  # no grant for g
    assert routes.take("f", "e", 0.1, deadline=9.0, near="other") is None
    assert routes.finish("a") == []
    assert routes.take("f", "c", 0.2, deadline=9.0) == "w"


def test_an_invocation_id_already_sent_directly_goes_through_the_scheduler() -> None:
    """Two concurrent calls with one caller-chosen id: one record per direct send, so
    the grant is freed and given back (a second send under the id leaked its slot)."""
    routes = DirectRoutes()
    routes.on_grant(GRANT, now=0.0)
    assert routes.take("f", "dup", 0.1, deadline=9.0) == "w"
    assert routes.take("f", "dup", 0.1, deadline=9.0) is None  # to the scheduler
    assert routes.routes["g1"].in_use == 1
    assert routes.finish("dup") == []
    assert routes.routes["g1"].in_use == 0
    assert routes.take("f", "dup", 0.2, deadline=9.0) == "w"  # nothing of it runs now
    assert routes.finish("dup") == []
    assert routes.tick(5.0) == [GRANT]  # lapsed with nothing under it: given back


def test_half_way_one_invocation_goes_to_the_scheduler_to_renew() -> None:
    routes = DirectRoutes()
    routes.on_grant(GRANT, now=0.0)
    assert routes.take("f", "a", 1.0, deadline=9.0) is None  # renewal trip
    assert routes.take("f", "b", 1.1, deadline=9.0) == "w"
    routes.on_grant(GRANT, now=1.2)  # renewed: half-way is now at 2.2
    assert routes.take("f", "c", 2.0, deadline=9.0) == "w"
    assert routes.renewals == 1


def test_a_lapsed_or_revoked_grant_goes_back_once_nothing_runs_under_it() -> None:
    routes = DirectRoutes()
    routes.on_grant(GRANT, now=0.0)
    assert routes.take("f", "a", 0.1, deadline=9.0) == "w"
    revoke = msgspec.structs.replace(GRANT, slots=0)
    assert routes.on_grant(revoke, now=0.2) == []  # "a" still runs
    assert routes.take("f", "b", 0.2, deadline=9.0) is None
    assert routes.finish("a") == [GRANT]
    # A renewal that was already on its way is not taken up again.
    assert routes.on_grant(GRANT, now=0.3) == []
    assert routes.take("f", "c", 0.3, deadline=9.0) is None

    lapsing = DirectRoutes()
    lapsing.on_grant(GRANT, now=0.0)
    assert lapsing.take("f", "a", 2.0 - STOP_BEFORE_S, deadline=9.0) is None
    assert lapsing.tick(2.0 - STOP_BEFORE_S) == [GRANT]


def test_a_lost_worker_hands_back_what_was_sent_there() -> None:
    routes = DirectRoutes()
    routes.on_grant(GRANT, now=0.0)
    called: list[str] = []
    routes.take("f", "a", 0.1, deadline=9.0, reply="inbox.a")
    routes.take("f", "b", 0.1, deadline=9.0, on_lost=lambda: called.append("b"))
    lost = routes.lost("w")
    assert sorted(iid for iid, _ in lost) == ["a", "b"]
    assert dict(lost)["a"].reply == "inbox.a"
    on_lost = dict(lost)["b"].on_lost
    assert on_lost is not None
    on_lost()
    assert called == ["b"]
    assert routes.routes == {}
    assert routes.sent == {}
    # Sends whose caller stopped waiting free their slots on the next tick.
    routes.on_grant(msgspec.structs.replace(GRANT, grant_id="g2"), now=1.0)
    routes.take("f", "c", 1.1, deadline=1.5)
    routes.tick(1.6)
    assert routes.sent == {}
    assert routes.routes["g2"].in_use == 0


def test_what_was_sent_under_surrendered_grants_is_still_answered_if_its_worker_is_lost() -> None:
    """A new scheduler voids the old one's grants, not the runs sent under them: those
    callers hear `worker_lost` when the worker dies (they used to be forgotten with the
    grants and waited out their deadlines)."""
    routes = DirectRoutes()
    routes.on_grant(GRANT, now=0.0)
    assert routes.take("f", "a", 0.1, deadline=9.0, reply="inbox.a") == "w"
    assert routes.surrender() == [GRANT]
    assert routes.take("f", "b", 0.2, deadline=9.0) is None  # nothing more goes direct
    assert [(iid, sent.reply) for iid, sent in routes.lost("w")] == [("a", "inbox.a")]
    assert routes.sent == {}
    # One that finishes instead just ends its record; nothing is given back twice.
    routes.on_grant(msgspec.structs.replace(GRANT, grant_id="g2"), now=1.0)
    assert routes.take("f", "c", 1.1, deadline=9.0) == "w"
    routes.surrender()
    assert routes.finish("c") == []
    assert routes.sent == {}


def test_two_sends_under_one_id_are_told_apart_by_their_reply_subjects() -> None:
    """Callers may reuse an id: each direct send is its own record, and a Done note
    (Done.reply) ends its own one, not the other caller's (which a lost worker must
    still answer)."""
    routes = DirectRoutes()
    routes.on_grant(GRANT, now=0.0)
    assert routes.take("f", "dup", 0.1, deadline=9.0, reply="inbox.1") == "w"
    assert routes.take("f", "dup", 0.1, deadline=9.0, reply="inbox.2") == "w"
    assert routes.routes["g1"].in_use == 2
    assert routes.finish("dup", "inbox.2") == []
    assert routes.routes["g1"].in_use == 1
    assert [(iid, s.reply) for iid, s in routes.lost("w")] == [("dup", "inbox.1")]
    # Ingress's own request waits on an inbox the books never see: a Done naming a
    # reply subject no send has is that one's, not another caller's.
    routes.on_grant(msgspec.structs.replace(GRANT, grant_id="g2"), now=1.0)
    assert routes.take("f", "dup", 1.1, deadline=9.0, reply="inbox.1") == "w"
    assert routes.take("f", "dup", 1.1, deadline=9.0, on_lost=lambda: None) == "w"
    assert routes.take("f", "dup", 1.1, deadline=9.0) is None  # two of those: ambiguous
    assert routes.finish("dup", "_INBOX.own") == []
    assert [(iid, s.reply) for iid, s in routes.lost("w")] == [("dup", "inbox.1")]


def test_the_late_done_of_an_overdue_send_does_not_end_a_later_one_under_its_id() -> None:
    """A send past its deadline is counted ended, but its handler may still run and
    its Done come late: that note must not end (and unrecord) a send made since under
    the same id, whose slot would be counted free twice and whose caller a lost
    worker would no longer answer."""
    routes = DirectRoutes()
    routes.on_grant(GRANT, now=0.0)
    assert routes.take("f", "dup", 0.1, deadline=0.5, reply="inbox.1") == "w"
    routes.tick(0.6)
    assert routes.routes["g1"].in_use == 0
    assert routes.take("f", "dup", 0.7, deadline=9.0, reply="inbox.2") == "w"
    assert routes.finish("dup", "inbox.1") == []  # the first one's late Done
    assert routes.routes["g1"].in_use == 1
    assert [(iid, s.reply) for iid, s in routes.lost("w")] == [("dup", "inbox.2")]
    # The same for ingress's own request after an overdue send of another caller.
    routes.on_grant(msgspec.structs.replace(GRANT, grant_id="g2"), now=1.0)
    assert routes.take("f", "x", 1.1, deadline=1.5, reply="inbox.1") == "w"
    routes.tick(1.6)
    assert routes.take("f", "x", 1.7, deadline=9.0, on_lost=lambda: None) == "w"
    assert routes.finish("x", "inbox.1") == []
    assert routes.routes["g2"].in_use == 1
    assert routes.finish("x", "_INBOX.own") == []
    assert routes.routes["g2"].in_use == 0
    assert routes.overdue == {}
    # Overdue sends are remembered for a while only.
    assert routes.take("f", "y", 1.8, deadline=1.9, reply="inbox.3") == "w"
    routes.tick(2.0)
    assert list(routes.overdue) == ["y"]
    routes.tick(1.9 + OVERDUE_MEMORY_S)
    assert routes.overdue == {}
    assert routes._under == {}


@pytest.mark.anyio
async def test_a_lent_worker_that_turns_a_send_away_is_sent_nothing_more() -> None:
    """A caller's invocation sent directly is answered by the worker: turned away
    (`overloaded`, the worker full after all), its caller hears so, and so would
    every next one sent there under the grant. Its Done says so: the grant is retired
    (given back) and what comes next goes through the scheduler, which can queue it."""
    bus = FakeBus()
    dispatcher = Dispatcher(bus, "ing", Settings())
    await dispatcher.on_scheduler_beat(SchedulerBeat(scheduler_id="s", active=True))
    await dispatcher.on_grant(GRANT)
    meta = InvocationMeta(invocation_id="a", function="f", deadline_ms=now_millis() + 5_000)
    assert await dispatcher.send(meta, b"", "inbox.a") == "w"
    turned = Done(worker_id="w", invocation_id="a", function="f", ok=False, reply="inbox.a")
    await dispatcher.on_done(turned, ErrorCode.OVERLOADED)
    assert [decode(data, Grant) for s, data in bus.published if s == subjects.GRANT_RETURN] == [
        GRANT
    ]
    again = InvocationMeta(invocation_id="b", function="f", deadline_ms=now_millis() + 5_000)
    assert await dispatcher.send(again, b"", "inbox.b") is None  # to the scheduler
    assert bus.published[-1][0] == subjects.SCHEDULE


class SilentBus(FakeBus):
    """A worker that never answers: the request waits out its timeout."""

    async def request(
        self, subject: str, data: bytes, *, timeout: float, headers: Mapping[str, str] | None = None
    ) -> bytes:
        await anyio.sleep(timeout)
        raise TimeoutError(subject)


@pytest.mark.anyio
async def test_a_call_waited_for_past_its_deadline_hears_its_worker_lost_meanwhile() -> None:
    """A workflow stage's reply is waited for past its deadline (grace_s: a stage that
    finished late hands its outputs on): its direct send stays in the books as long,
    so a worker lost meanwhile ends the wait with worker_lost at once, not a timeout
    at the end of the grace (the books forgot the send at its deadline)."""
    bus = SilentBus()
    dispatcher = Dispatcher(bus, "ing", Settings())
    await dispatcher.on_grant(GRANT)
    meta = InvocationMeta(invocation_id="a", function="f", deadline_ms=now_millis() + 100)
    started = time.monotonic()
    async with anyio.create_task_group() as tg:

        async def lose() -> None:
            await anyio.sleep(0.3)
            await dispatcher.tick()
            await dispatcher.on_worker_lost(WorkerLost(worker_id="w", reason="it died"))

        tg.start_soon(lose)
        reply = await dispatcher.call(meta, b"", grace_s=3.0)
    assert reply.error is not None
    assert reply.error.code is ErrorCode.WORKER_LOST, reply.error
    assert time.monotonic() - started < 2.0

"""Ingress's books on the schedulers (services/ingress/liveness.py), without NATS: when
having no leader is a handover to wait out and when it is `unavailable` at once."""

from __future__ import annotations

import pytest

from services.ingress.liveness import Forwarded, SchedulerWatch
from shared.schema import SchedulerBeat

pytestmark = pytest.mark.unit

T = 1.0  # the scheduler timeout


def watch_with_leader(*standbys: str) -> SchedulerWatch:
    """Started at 0; at 10 scheduler `a` leads and the standbys are heard."""
    w = SchedulerWatch(timeout_s=T, started_at=0.0)
    w.beat(SchedulerBeat(scheduler_id="a", active=True), 10.0)
    for s in standbys:
        w.beat(SchedulerBeat(scheduler_id=s, active=False), 10.0)
    return w


def test_just_started_the_schedulers_get_one_timeout_to_be_heard() -> None:
    w = SchedulerWatch(timeout_s=T, started_at=0.0)
    assert w.available(0.9)
    assert not w.available(1.1)


def test_a_leader_that_steps_down_and_may_retake_is_waited_for_one_timeout() -> None:
    w = watch_with_leader()
    # Its renewal failed: it says it is not active, and will try to retake the lease.
    w.beat(SchedulerBeat(scheduler_id="a", active=False), 10.2)
    assert w.leader(10.2) is None
    assert w.available(10.3)
    assert w.grace_until(10.3) == pytest.approx(10.2 + T)
    w.beat(SchedulerBeat(scheduler_id="a", active=False), 11.1)
    assert not w.available(11.3)  # it had its timeout and did not lead: unavailable


def test_a_clean_stop_with_no_successor_is_unavailable_at_once() -> None:
    w = watch_with_leader()
    w.beat(SchedulerBeat(scheduler_id="a", active=False, stopping=True), 10.2)
    assert not w.available(10.21)


def test_a_clean_stop_with_a_standby_is_waited_for() -> None:
    w = watch_with_leader("b")
    w.beat(SchedulerBeat(scheduler_id="b", active=False), 10.15)
    w.beat(SchedulerBeat(scheduler_id="a", active=False, stopping=True), 10.2)
    assert w.available(10.5)
    assert w.beat(SchedulerBeat(scheduler_id="b", active=True), 10.6)  # a new leader
    assert w.leader(10.6) == "b"


def test_a_silent_leader_with_a_standby_is_waited_for_until_its_lease_is_taken() -> None:
    w = watch_with_leader("b")
    w.beat(SchedulerBeat(scheduler_id="b", active=False), 10.9)
    # `a` died at 10: silent past the timeout; `b` takes the lease within one more.
    assert w.leader(11.1) is None
    assert w.available(11.9)
    w.beat(SchedulerBeat(scheduler_id="b", active=False), 11.5)
    assert not w.available(12.1)


def test_a_silent_leader_with_no_standby_is_unavailable_once_silent() -> None:
    w = watch_with_leader()
    assert w.available(10.9)
    assert not w.available(11.1)


def test_no_responders_from_the_leader_opens_a_grace_that_its_stop_beat_ends() -> None:
    w = watch_with_leader()
    w.no_responders("a", 10.3)
    assert w.leader(10.3) is None
    assert w.available(10.5)
    w.beat(SchedulerBeat(scheduler_id="a", active=False, stopping=True), 10.4)
    assert not w.available(10.5)


def test_standbys_that_fell_silent_are_no_successors() -> None:
    w = watch_with_leader("b")
    w.tick(11.5)  # everything heard at 10 is past the timeout
    assert w.standby == {}
    assert not w.available(11.5)


def test_what_went_to_a_leader_found_deaf_is_answered_once_it_is_silent() -> None:
    """A killed leader: one caller finds nobody listening (and waits for the next),
    another's invocation was already on its way to it; that one is answered
    `unavailable` when its silence shows, as if nobody had found it deaf."""
    w = watch_with_leader("b")
    w.sent("i1", Forwarded(scheduler="a", deadline=30.0))
    w.no_responders("a", 10.2)
    assert w.leader(10.2) is None
    assert w.tick(10.5) == []
    w.beat(SchedulerBeat(scheduler_id="b", active=False), 10.8)
    lost = w.tick(11.1)
    assert [iid for iid, _ in lost] == ["i1"]


def test_a_deaf_leader_that_beats_as_active_again_leads() -> None:
    w = watch_with_leader()
    w.no_responders("a", 10.2)
    w.beat(SchedulerBeat(scheduler_id="a", active=True), 10.3)
    assert w.leader(10.3) == "a"


def test_two_invocations_forwarded_under_one_id_are_each_answered() -> None:
    """Callers may reuse an id: each forwarded invocation is its own record. Keyed by
    the id, the second replaced the first, the first's Done ended the second's, and
    when the scheduler fell silent only one caller (or none) heard `unavailable`."""
    w = watch_with_leader()
    w.sent("dup", Forwarded(scheduler="a", deadline=30.0, reply="inbox.1"))
    w.sent("dup", Forwarded(scheduler="a", deadline=30.0, reply="inbox.2"))
    own = w.sent("dup", Forwarded(scheduler="a", deadline=30.0, on_lost=lambda: None))
    assert w.done("dup", "inbox.1") is not None
    assert w.done("dup", "inbox.1") is None  # once
    assert w.done("dup", "_INBOX.own") is None  # ingress's own request ends its own
    w.sent("dup", Forwarded(scheduler="a", deadline=30.0, reply="inbox.3"))
    lost = w.tick(11.5)  # "a" fell silent
    assert sorted((iid, f.reply) for iid, f in lost) == [
        ("dup", ""),
        ("dup", "inbox.2"),
        ("dup", "inbox.3"),
    ]
    assert w.end(own) is None  # already answered
    assert len(w.forwarded) == 0
    assert w.forwarded.done("dup", "inbox.2") is None  # nothing kept under the id

"""The autoscaler's burst model, instance cost and two keep-alives (pure decisions)."""

from __future__ import annotations

import math

import pytest

from shared.scheduling.autoscale import (
    AutoscaleSettings,
    Config,
    FunctionLoad,
    Instance,
    ProfilePoint,
    burst_floor,
    burst_late,
    choose,
    scale,
)
from tests.test_autoscale import PROFILE, profile

pytestmark = pytest.mark.unit

# 15 ms alone: 8 requests within 80 ms take 2 instances of a full share, 4 slivers.
HEAVY = profile(15.0, 0.18)
MODEL = AutoscaleSettings(burst_mean=2.0, burst_gap_ms=5.0, burst_budget=0.0025)


def point(p99_ms: float) -> ProfilePoint:
    return ProfilePoint(Config(0.24, 1.0), p99_ms, 1000.0 / p99_ms)


def test_without_gaps_a_cluster_is_late_from_the_first_request_past_what_n_serve() -> None:
    # 80 ms SLO, 12 ms each: one instance serves 6 back to back; the 7th and later are
    # late, and those are (1 - p)^6 of the requests for clusters of mean 2.
    assert burst_late(1, 12.0, 80.0, 2.0, 0.0) == pytest.approx(0.5**6, abs=1e-6)
    assert burst_late(2, 12.0, 80.0, 2.0, 0.0) == pytest.approx(0.5**12, abs=1e-6)


def test_gaps_between_a_clusters_requests_leave_fewer_of_them_late() -> None:
    together = burst_late(1, 12.0, 80.0, 2.0, 0.0)
    apart = burst_late(1, 12.0, 80.0, 2.0, 5.0)
    assert 0.0 < apart < together


def test_more_instances_leave_fewer_requests_late() -> None:
    late = [burst_late(n, 30.0, 80.0, 3.0, 2.0) for n in range(1, 6)]
    assert late == sorted(late, reverse=True)
    assert late[-1] < late[0]


def test_a_service_longer_than_the_slo_is_always_late() -> None:
    assert burst_late(4, 90.0, 80.0, 2.0, 5.0) == 1.0


def test_the_model_floor_is_the_fewest_instances_within_the_budget() -> None:
    p = point(30.0)
    n = burst_floor(p, 80.0, MODEL)
    assert burst_late(n, 30.0, 80.0, 2.0, 5.0) <= MODEL.burst_budget
    assert n == 1 or burst_late(n - 1, 30.0, 80.0, 2.0, 5.0) > MODEL.burst_budget


def test_a_tighter_budget_never_lowers_the_floor() -> None:
    p = point(20.0)
    loose = burst_floor(p, 80.0, AutoscaleSettings(burst_mean=2.0, burst_gap_ms=5.0))
    tight = AutoscaleSettings(burst_mean=2.0, burst_gap_ms=5.0, burst_budget=1e-5)
    assert burst_floor(p, 80.0, tight) >= loose


def test_the_fixed_burst_is_used_without_a_cluster_model() -> None:
    p = point(12.0)
    assert burst_floor(p, 80.0, AutoscaleSettings(burst=8)) == math.ceil(8 / 6)
    assert burst_floor(p, 80.0, AutoscaleSettings(burst=8, burst_mean=1.0)) == 2


def test_an_instance_cost_prefers_fewer_larger_instances() -> None:
    # A small demand with a burst floor: by device share alone slivers win, each
    # holding less but needing more instances for the burst.
    slivers = choose(HEAVY, 5.0, 80.0, settings=AutoscaleSettings(burst=8))
    fewer = choose(HEAVY, 5.0, 80.0, settings=AutoscaleSettings(burst=8, instance_cost=0.1))
    assert fewer.count < slivers.count
    assert fewer.config.share > slivers.config.share
    assert fewer.meets_slo


def load(rate: float, *instances: Instance, **kw: object) -> FunctionLoad:
    fields: dict[str, object] = {
        "function": "resnet",
        "rate": rate,
        "profile": PROFILE,
        "slo_ms": 80.0,
        "idle_s": 30.0,
        "instances": instances,
    }
    fields.update(kw)
    return FunctionLoad(**fields)  # type: ignore[arg-type]


def test_a_bursts_surplus_goes_after_the_short_keep_alive() -> None:
    config = choose(PROFILE, 5.0, 80.0).config
    extras = [Instance(f"i{n}", config, 100.0) for n in range(4)]
    now = 102.0  # idle 2 s: past the surplus keep-alive, short of idle_s
    kept = scale(load(5.0, *extras), now)
    assert kept.remove == ()
    decision = scale(load(5.0, *extras, surplus_idle_s=1.0), now)
    assert len(decision.remove) == 3  # down to what the rate needs
    assert decision.instances == 1
    assert decision.capacity >= 5.0


def test_the_last_instances_keep_the_long_keep_alive() -> None:
    config = choose(PROFILE, 5.0, 80.0).config
    last = Instance("i0", config, 100.0)
    # No rate left: the last one is the function's keep-alive, not a burst's surplus.
    assert scale(load(0.0, last, surplus_idle_s=1.0), 110.0).remove == ()
    assert scale(load(0.0, last, surplus_idle_s=1.0), 131.0).remove == ("i0",)


def test_the_surplus_keep_alive_keeps_the_burst_floor() -> None:
    settings = AutoscaleSettings(burst=8)
    plan = choose(HEAVY, 1.0, 80.0, settings=settings)
    floor = burst_floor(next(p for p in HEAVY if p.config == plan.config), 80.0, settings)
    assert floor >= 2
    held = [Instance(f"i{n}", plan.config, 0.0) for n in range(floor + 2)]
    decision = scale(load(1.0, *held, profile=HEAVY, surplus_idle_s=0.5), 50.0, settings)
    assert decision.instances == floor

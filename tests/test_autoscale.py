"""The shared-GPU autoscaler: pure decisions over a rate, a profile and the clock."""

from __future__ import annotations

import dataclasses
import math

import pytest

from shared.scheduling.autoscale import (
    AutoscaleSettings,
    Config,
    FunctionLoad,
    Instance,
    ProfilePoint,
    admissible_rate,
    burst_floor,
    choose,
    scale,
)

pytestmark = pytest.mark.unit

SM = (0.06, 0.12, 0.24, 0.5, 1.0)
QUOTA = (0.2, 0.4, 0.6, 0.8, 1.0)


def profile(exec_ms: float = 8.0, saturation: float = 0.12) -> tuple[ProfilePoint, ...]:
    """Service grows as 1/s below saturation and as 1/q with the quota."""
    points = []
    for s in SM:
        for q in QUOTA:
            ms = exec_ms * max(1.0, saturation / s) / q
            points.append(ProfilePoint(Config(s, q), ms, 1000.0 / ms))
    return tuple(points)


PROFILE = profile()


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


def inst(n: int, config: Config, last_used: float = 100.0) -> Instance:
    return Instance(f"i{n}", config, last_used)


def test_a_first_request_starts_one_instance_from_zero() -> None:
    decision = scale(load(0.0, waiting=1), now=100.0)
    assert len(decision.add) == 1
    assert decision.remove == ()
    assert not decision.slo_unmeetable


def test_nothing_starts_without_requests_or_a_rate() -> None:
    decision = scale(load(0.0), now=100.0)
    assert decision.add == ()
    assert decision.instances == 0


def test_a_rising_rate_adds_instances_until_they_cover_it() -> None:
    now = 100.0
    current: tuple[Instance, ...] = ()
    counts = []
    for rate in (5.0, 50.0, 200.0, 800.0):
        decision = scale(load(rate, *current), now)
        assert decision.capacity >= rate
        current += tuple(inst(len(current) + k, c, now) for k, c in enumerate(decision.add))
        counts.append(len(current))
    assert counts == sorted(counts)
    assert counts[-1] > counts[0]


def test_new_instances_take_the_plans_configuration() -> None:
    decision = scale(load(500.0), now=0.0)
    assert set(decision.add) == {decision.plan.config}
    assert len(decision.add) == decision.plan.count


def test_the_plan_is_the_least_device_share_that_meets_the_slo() -> None:
    for rate in (0.5, 7.0, 60.0, 400.0, 3000.0):
        plan = choose(PROFILE, rate, 80.0)
        brute = min(
            math.ceil(rate / admissible_rate(p, 80.0)) * p.config.share
            for p in PROFILE
            if admissible_rate(p, 80.0) > 0.0
        )
        assert plan.meets_slo
        assert plan.capacity >= rate
        assert plan.share == pytest.approx(brute)


def test_a_small_rate_gets_a_small_slice_of_a_device() -> None:
    small = choose(PROFILE, 2.0, 80.0)
    large = choose(PROFILE, 2000.0, 80.0)
    assert small.count == 1
    assert small.config.share < 0.1
    assert large.share / large.count > small.share


def test_an_idle_instance_goes_after_idle_s_when_the_others_cover_the_rate() -> None:
    plan = choose(PROFILE, 300.0, 80.0)
    busy = [inst(n, plan.config, last_used=100.0) for n in range(plan.count)]
    spare = inst(99, plan.config, last_used=100.0 - 31.0)
    decision = scale(load(300.0, *busy, spare), now=100.0)
    assert decision.remove == ("i99",)
    assert decision.add == ()


def test_an_instance_idle_for_less_than_idle_s_stays() -> None:
    plan = choose(PROFILE, 300.0, 80.0)
    busy = [inst(n, plan.config, last_used=100.0) for n in range(plan.count)]
    spare = inst(99, plan.config, last_used=100.0 - 29.0)
    assert scale(load(300.0, *busy, spare), now=100.0).remove == ()


def test_an_idle_instance_the_rate_still_needs_stays() -> None:
    plan = choose(PROFILE, 300.0, 80.0)
    idle = [inst(n, plan.config, last_used=0.0) for n in range(plan.count)]
    assert scale(load(300.0, *idle), now=100.0).remove == ()


def test_no_load_for_idle_s_scales_to_zero() -> None:
    config = Config(0.12, 1.0)
    instances = [inst(n, config, last_used=50.0) for n in range(3)]
    decision = scale(load(0.0, *instances), now=100.0)
    assert sorted(decision.remove) == ["i0", "i1", "i2"]
    assert decision.instances == 0


def test_min_instances_are_kept_when_idle() -> None:
    config = Config(0.12, 1.0)
    instances = [inst(n, config, last_used=0.0) for n in range(3)]
    decision = scale(load(0.0, *instances, min_instances=2), now=100.0)
    assert len(decision.remove) == 1
    assert decision.instances == 2


def test_min_instances_are_started_without_load() -> None:
    decision = scale(load(0.0, min_instances=2), now=0.0)
    assert len(decision.add) == 2


def test_fixed_shares_bypass_the_choice() -> None:
    fixed = Config(0.5, 1.0)
    assert choose(PROFILE, 300.0, 80.0).config != fixed
    decision = scale(load(300.0, fixed=fixed), now=0.0)
    assert set(decision.add) == {fixed}
    assert decision.capacity >= 300.0


def test_fixed_shares_the_profile_never_measured_are_an_error() -> None:
    with pytest.raises(ValueError, match="fixed"):
        scale(load(10.0, fixed=Config(0.3, 1.0)), now=0.0)


@pytest.mark.parametrize(
    "bad",
    [
        ProfilePoint(Config(1.0, 1.0), p99_ms=4.0, throughput=0.0),
        ProfilePoint(Config(1.0, 1.0), p99_ms=4.0, throughput=math.nan),
        ProfilePoint(Config(1.0, 1.0), p99_ms=4.0, throughput=math.inf),
        ProfilePoint(Config(1.0, 1.0), p99_ms=math.nan, throughput=250.0),
    ],
)
def test_a_row_that_measured_nothing_is_not_planned_on(bad: ProfilePoint) -> None:
    # The one usable row misses the SLO: best effort, which plans on throughput.
    slow = ProfilePoint(Config(0.5, 1.0), p99_ms=120.0, throughput=8.0)
    for rows in ((bad, slow), (slow, bad)):
        decision = scale(load(20.0, profile=rows), now=0.0)
        assert decision.plan.config == slow.config
        assert set(decision.add) == {slow.config}
        assert decision.slo_unmeetable
    with pytest.raises(ValueError, match="usable"):
        scale(load(20.0, profile=(bad,)), now=0.0)


def test_an_slo_no_configuration_meets_is_said_with_a_best_effort_choice() -> None:
    decision = scale(load(50.0, slo_ms=5.0), now=0.0)
    assert decision.slo_unmeetable
    fastest = min(PROFILE, key=lambda p: p.p99_ms)
    assert set(decision.add) == {fastest.config}
    assert decision.capacity >= 50.0


def test_an_slo_some_configuration_meets_is_not_unmeetable() -> None:
    assert not scale(load(50.0, slo_ms=10.0), now=0.0).slo_unmeetable


def test_max_instances_caps_scale_out_and_says_so() -> None:
    decision = scale(load(5000.0, max_instances=3), now=0.0)
    assert len(decision.add) == 3
    assert decision.saturated


def test_a_configuration_the_packer_refused_is_replaced_by_the_next_best() -> None:
    first = scale(load(300.0), now=0.0)
    again = scale(load(300.0, avoid=frozenset({first.plan.config})), now=0.0)
    assert again.add
    assert first.plan.config not in again.add
    assert again.capacity >= 300.0


def test_a_burst_gets_enough_instances_to_answer_all_within_the_slo() -> None:
    settings = AutoscaleSettings(burst=8)
    decision = scale(load(1.0), now=0.0, settings=settings)
    point = next(p for p in PROFILE if p.config == decision.plan.config)
    per_instance = int(80.0 // point.p99_ms)
    assert len(decision.add) * per_instance >= 8
    assert len(decision.add) == burst_floor(point, 80.0, settings)


def test_instances_off_the_plan_go_first_on_scale_in() -> None:
    plan = choose(PROFILE, 300.0, 80.0)
    on_plan = [inst(n, plan.config, last_used=0.0) for n in range(plan.count)]
    off_plan = inst(99, Config(0.06, 0.2), last_used=0.0)
    decision = scale(load(300.0, off_plan, *on_plan), now=100.0)
    assert decision.remove == ("i99",)


def test_an_instance_in_an_unprofiled_configuration_counts_for_no_capacity() -> None:
    stray = inst(1, Config(0.3, 0.7), last_used=100.0)
    decision = scale(load(50.0, stray), now=100.0)
    assert decision.capacity >= 50.0
    assert decision.add


def test_admissible_rate_shrinks_with_the_slo_and_is_zero_past_it() -> None:
    point = ProfilePoint(Config(0.12, 1.0), 8.0, 125.0)
    rates = [admissible_rate(point, slo) for slo in (200.0, 80.0, 20.0, 9.0)]
    assert rates == sorted(rates, reverse=True)
    assert admissible_rate(point, 7.9) == 0.0
    assert rates[0] <= 0.9 * 125.0


def test_the_memory_an_instance_holds_counts_against_many_small_ones() -> None:
    slivers = choose(PROFILE, 2.0, 80.0)
    heavy = choose(PROFILE, 2.0, 80.0, memory_share=0.2)
    assert slivers.config.share < 0.2
    assert heavy.count == 1
    assert heavy.config.share >= slivers.config.share


def test_shares_outside_zero_to_one_are_refused() -> None:
    with pytest.raises(ValueError, match="sm_share"):
        Config(0.0, 1.0)
    with pytest.raises(ValueError, match="time_quota"):
        Config(0.5, 1.5)


def test_decisions_are_values_that_do_not_change_their_inputs() -> None:
    before = load(300.0, inst(1, Config(0.12, 1.0)))
    copy = dataclasses.replace(before)
    scale(before, now=100.0)
    assert before == copy

"""The shared-GPU simulator and its service model, driven by the live autoscaler and packing."""

from __future__ import annotations

import numpy as np
import pytest

from gfaas.sim.sharemodel import (
    DEFAULT_MODEL,
    GRID,
    SharedFunction,
    shared_functions,
    whole_device,
)
from gfaas.sim.sharing import SharingCluster, SharingOptions, StartCost, simulate_sharing
from gfaas.sim.workload import Arrival, FunctionProfile, WorkloadSpec, make_arrivals, make_functions
from shared.scheduling.autoscale import Config

pytestmark = pytest.mark.unit

SMALL = FunctionProfile("small", "small-model", 100_000_000, 0.007, 0.080, 1.0)
CLUSTER = SharingCluster(nodes=1, gpus_per_node=4)


def steady(
    rate: float, seed: int = 2, duration_s: float = 4.0
) -> tuple[list[SharedFunction], list[Arrival]]:
    spec = WorkloadSpec(
        n_functions=8,
        duration_s=duration_s,
        rate=rate,
        on_boost=1.0,
        burst_mean=1.0,
        diurnal_amplitude=0.0,
        median_model_bytes=120_000_000,
        model_sigma=0.3,
        seed=seed,
    )
    rng = np.random.default_rng(seed)
    functions = make_functions(spec, rng)
    return shared_functions(functions), make_arrivals(spec, functions, rng)


def test_a_time_quota_stretches_service_by_its_inverse() -> None:
    full = DEFAULT_MODEL.service_s(0.010, 0.2, Config(0.5, 1.0))
    quarter = DEFAULT_MODEL.service_s(0.010, 0.2, Config(0.5, 0.25))
    assert quarter == pytest.approx(4 * full)


def test_sms_beyond_saturation_do_not_speed_a_model_up() -> None:
    at = DEFAULT_MODEL.service_s(0.010, 0.24, Config(0.24, 1.0))
    beyond = DEFAULT_MODEL.service_s(0.010, 0.24, Config(1.0, 1.0))
    below = DEFAULT_MODEL.service_s(0.010, 0.24, Config(0.12, 1.0))
    assert at == pytest.approx(beyond)
    assert below == pytest.approx(2 * at)


def test_busy_neighbours_slow_a_request_only_on_the_sms_it_leaves_them() -> None:
    alone = DEFAULT_MODEL.service_s(0.010, 0.1, Config(0.5, 1.0))
    crowded = DEFAULT_MODEL.service_s(0.010, 0.1, Config(0.5, 1.0), busy_others=0.9)
    whole = DEFAULT_MODEL.service_s(0.010, 0.1, Config(1.0, 1.0), busy_others=0.9)
    assert crowded == pytest.approx(alone * (1 + DEFAULT_MODEL.interference * 0.5))
    assert whole == pytest.approx(0.010)


def test_the_baseline_profile_has_all_the_sms_only() -> None:
    [f] = shared_functions([SMALL])
    assert len(f.profile) == len(GRID)
    assert {p.config.sm_share for p in whole_device(f.profile)} == {1.0}


def test_a_first_request_waits_for_the_cold_start_then_runs() -> None:
    functions = shared_functions([SMALL])
    start = StartCost(process_s=0.2, fetch_s=1.0)
    result = simulate_sharing(
        functions, [Arrival(0.0, "small"), Arrival(5.0, "small")], CLUSTER, SharingOptions()
    )
    [cold] = result.from_zero_s
    service = min(p.p99_ms for p in functions[0].profile if p.config.share <= 0.02) / 1e3
    assert cold >= start.seconds(2, SMALL.model_bytes)
    assert cold <= start.seconds(2, SMALL.model_bytes) + service + 0.1
    assert result.starts == 1
    assert result.starts_by_tier == (0, 0, 1)


def test_an_idle_function_scales_to_zero_and_starts_again_from_its_host_tier() -> None:
    functions = shared_functions([SMALL])
    arrivals = [Arrival(0.0, "small"), Arrival(60.0, "small")]
    result = simulate_sharing(functions, arrivals, CLUSTER, SharingOptions(idle_s=10.0))
    assert len(result.from_zero_s) == 2
    assert result.starts_by_tier == (0, 1, 1)
    assert result.instance_s < 30.0


def test_every_request_is_served_or_rejected() -> None:
    functions, arrivals = steady(400.0)
    result = simulate_sharing(functions, arrivals, CLUSTER, SharingOptions())
    assert result.completed + result.rejected == len(arrivals)
    assert 0.0 <= result.slo_attainment <= 1.0


def test_the_sharing_simulator_is_deterministic() -> None:
    functions, arrivals = steady(400.0)
    first = simulate_sharing(functions, arrivals, CLUSTER, SharingOptions())
    again = simulate_sharing(*steady(400.0), CLUSTER, SharingOptions())
    assert first == again


def test_space_and_time_sharing_hold_less_of_the_gpus_than_time_alone() -> None:
    functions, arrivals = steady(600.0)
    prewarm = {f.name: f.fn.share * 600.0 for f in functions}
    options = SharingOptions(prewarm=prewarm, idle_s=60.0)
    time_only = simulate_sharing(
        functions, arrivals, CLUSTER, SharingOptions(prewarm=prewarm, whole_device=True)
    )
    shared = simulate_sharing(functions, arrivals, CLUSTER, options)
    assert shared.slo_attainment >= 0.99
    assert shared.mean_share < 0.6 * time_only.mean_share


def test_an_unmeetable_slo_is_rejected_when_asked_to() -> None:
    hopeless = FunctionProfile("slow", "slow-model", 100_000_000, 0.5, 0.1, 1.0)
    functions = shared_functions([hopeless])
    arrivals = [Arrival(0.0, "slow"), Arrival(1.0, "slow")]
    served = simulate_sharing(functions, arrivals, CLUSTER, SharingOptions())
    rejected = simulate_sharing(
        functions, arrivals, CLUSTER, SharingOptions(reject_unmeetable=True)
    )
    assert served.unmeetable == ("slow",)
    assert served.completed == 2
    assert rejected.rejected == 2


def test_an_instance_started_while_its_weights_are_still_fetched_waits_for_them() -> None:
    # Two instances from zero at once: the second finds the model "on the node" (the
    # first one's fetch is under way) but cannot serve before the weights are there.
    functions = shared_functions([SMALL])
    start = StartCost()
    arrivals = [Arrival(0.0, "small"), Arrival(0.05, "small")]
    result = simulate_sharing(functions, arrivals, CLUSTER, SharingOptions(min_instances=2))
    assert result.starts == 2
    assert result.starts_by_tier[2] == 1
    fetched = start.seconds(2, SMALL.model_bytes)
    assert min(result.from_zero_s) >= fetched
    # Both requests, the second one too, finish after the fetch.
    assert result.p50_s >= fetched - 0.05

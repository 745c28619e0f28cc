"""The discrete-event simulator, driven by the live policies."""

from __future__ import annotations

import pytest

from gfaas.sim.simulator import ClusterSpec, cache_for_ratio, simulate
from gfaas.sim.workload import Arrival, FunctionProfile, Workload, WorkloadSpec, generate
from shared.scheduling import make_policy

pytestmark = pytest.mark.unit

CACHE = 1_500_000_000
SMALL = WorkloadSpec(
    n_functions=35,
    duration_s=30.0,
    rate=50.0,
    total_model_bytes=3 * 4 * CACHE,  # the working set is 3x the cluster's cache
    max_model_bytes=CACHE // 2,
    seed=1,
)
CLUSTER = ClusterSpec(nodes=1, gpus_per_node=4, cache_bytes=CACHE)


@pytest.fixture(scope="module")
def workload() -> Workload:
    return generate(SMALL)


def test_the_simulator_is_deterministic_for_a_seed(workload: Workload) -> None:
    first = simulate(workload, CLUSTER, make_policy("locality"))
    again = simulate(generate(SMALL), CLUSTER, make_policy("locality"))
    assert first == again


def test_locality_beats_load_balance_on_a_small_trace(workload: Workload) -> None:
    balance = simulate(workload, CLUSTER, make_policy("load_balance"))
    locality = simulate(workload, CLUSTER, make_policy("locality"))
    assert locality.hit_rate > 2 * balance.hit_rate
    assert locality.mean_s < balance.mean_s


def test_every_request_is_completed_rejected_or_failed(workload: Workload) -> None:
    for name in ["load_balance", "locality", "slo"]:
        result = simulate(workload, CLUSTER, make_policy(name))
        assert result.completed + result.rejected + result.failed == len(workload.arrivals)
        assert 0.0 <= result.slo_attainment <= 1.0
        assert result.p50_s <= result.p99_s


def test_slo_meets_more_deadlines_than_load_balance(workload: Workload) -> None:
    balance = simulate(workload, CLUSTER, make_policy("load_balance"))
    slo = simulate(workload, CLUSTER, make_policy("slo"))
    assert slo.slo_attainment > balance.slo_attainment


def test_a_model_bigger_than_every_gpu_fails_instead_of_hanging() -> None:
    huge = FunctionProfile("big", "big-model", 10 * CACHE, 0.01, 1.0, 1.0)
    small = FunctionProfile("ok", "ok-model", CACHE // 10, 0.01, 1.0, 1.0)
    trace = Workload([huge, small], [Arrival(0.0, "big"), Arrival(0.001, "ok")])
    result = simulate(trace, CLUSTER, make_policy("locality"))
    assert (result.failed, result.completed) == (1, 1)


def test_a_lone_request_takes_swap_plus_exec_then_hits_warm() -> None:
    fn = FunctionProfile("f", "m", 120_000_000, 0.010, 1.0, 1.0)
    trace = Workload([fn], [Arrival(0.0, "f"), Arrival(1.0, "f")])
    result = simulate(trace, CLUSTER, make_policy("locality"))
    cold = CLUSTER.profile.swap_s(fn.model_bytes) + fn.exec_s
    assert result.hit_rate == pytest.approx(0.5)
    assert result.mean_s == pytest.approx((cold + fn.exec_s) / 2)


def test_cache_for_ratio_sizes_the_cache_to_a_working_set_multiple(workload: Workload) -> None:
    per_gpu = cache_for_ratio(workload.functions, n_gpus=4, ratio=3.0)
    assert per_gpu == pytest.approx(CACHE, rel=1e-3)

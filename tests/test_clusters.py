"""Each function's request clusters measured from its arrival times (pure, injected times)."""

from __future__ import annotations

import numpy as np
import pytest

from gfaas.sim.sharemodel import shared_functions
from gfaas.sim.sharing import SharingCluster, SharingOptions, simulate_sharing
from gfaas.sim.workload import Arrival, FunctionProfile, WorkloadSpec, make_arrivals
from shared.scheduling.autoscale import AutoscaleSettings
from shared.scheduling.clusters import ClusterEstimator, ClusterShape, shaped

pytestmark = pytest.mark.unit

ONE = [FunctionProfile("f", "m", 100_000_000, 0.01, 0.08, 1.0)]


def measured(times: list[float], **kw: object) -> ClusterShape:
    estimator = ClusterEstimator(**kw)  # type: ignore[arg-type]
    for t in times:
        estimator.add(t)
    shape = estimator.shape()
    assert shape is not None
    return shape


def poisson(rate: float, n: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(t) for t in np.cumsum(rng.exponential(1.0 / rate, n))]


def neyman_scott(
    clusters_per_s: float, duration_s: float, seed: int = 3, **kw: float
) -> list[float]:
    """Clusters from the simulator's generator: geometric sizes of mean 2, gaps of 5 ms."""
    values: dict[str, float] = {"burst_mean": 2.0, "on_boost": 1.0, "diurnal_amplitude": 0.0}
    values.update(kw)
    spec = WorkloadSpec(
        n_functions=1,
        duration_s=duration_s,
        rate=values["burst_mean"] * clusters_per_s,
        burst_gap_s=0.005,
        seed=seed,
        **values,  # type: ignore[arg-type]
    )
    rng = np.random.default_rng(seed)
    return [a.time_s for a in make_arrivals(spec, ONE, rng)]


@pytest.mark.parametrize("rate", [2.0, 30.0, 300.0])
def test_poisson_arrivals_show_no_clusters(rate: float) -> None:
    shape = measured(poisson(rate, 20_000))
    assert shape.mean == pytest.approx(1.0, abs=0.08)
    # As planned with: no cluster model, the rule as set.
    assert shaped(AutoscaleSettings(), shape).burst_mean <= 1.0


@pytest.mark.parametrize("clusters_per_s", [2.0, 20.0])
def test_clusters_of_two_requests_5_ms_apart_are_measured_so(clusters_per_s: float) -> None:
    shape = measured(neyman_scott(clusters_per_s, 8000.0 / clusters_per_s))
    assert shape.mean == pytest.approx(2.0, abs=0.15)
    assert shape.gap_s == pytest.approx(0.005, abs=0.001)


def test_clusters_that_overlap_each_other_are_still_measured() -> None:
    # 150 clusters/s, each about 5 ms long: the next one often starts inside it, so
    # no gap threshold separates them; the pairs in excess of the background still do.
    shape = measured(neyman_scott(150.0, 60.0))
    assert shape.mean == pytest.approx(2.0, abs=0.15)
    assert shape.gap_s == pytest.approx(0.005, abs=0.0015)


def test_a_rate_that_swings_in_bursts_of_seconds_is_not_taken_for_clusters() -> None:
    # Poisson arrivals at 500/s on average, the rate 4x during 1 s on, 1 s off: a
    # background taken as flat over the 100 ms before reads that as 1.85 requests a
    # cluster; the straight line through the two windows before, as 1.01.
    times = neyman_scott(500.0, 100.0, seed=2, burst_mean=1.0, on_boost=4.0, on_s=1.0, off_s=1.0)
    assert measured(times).mean < 1.2


def test_too_few_arrivals_tell_nothing() -> None:
    estimator = ClusterEstimator(min_arrivals=50)
    for t in poisson(10.0, 40):
        estimator.add(t)
    assert estimator.shape() is None
    assert shaped(AutoscaleSettings(burst=3), None) == AutoscaleSettings(burst=3)


def test_memory_stays_bounded_at_any_rate_and_the_estimate_sane() -> None:
    # 400/s: the 250 ms counted hold 100 arrivals, cut to 64: the background is
    # counted over the span kept.
    estimator = ClusterEstimator(max_recent=64)
    for t in poisson(400.0, 20_000):
        estimator.add(t)
    assert len(estimator._near) + len(estimator._far) + len(estimator._farther) <= 64
    shape = estimator.shape()
    assert shape is not None
    assert shape.mean == pytest.approx(1.0, abs=0.1)
    # So many that not even the 50 ms within reach fit: no estimate, not a wrong one.
    flood = ClusterEstimator(max_recent=64)
    for t in poisson(100_000.0, 50_000):
        flood.add(t)
    assert len(flood._near) + len(flood._far) + len(flood._farther) <= 64
    assert flood.shape() is None


def test_an_arrival_out_of_order_counts_as_the_last() -> None:
    estimator = ClusterEstimator(min_arrivals=1)
    for t in (0.0, 1.0, 2.0, 1.5, 3.0):
        estimator.add(t)
    shape = estimator.shape()
    assert shape is not None
    assert shape.mean >= 1.0


def test_the_shape_held_moves_only_past_its_tolerance() -> None:
    estimator = ClusterEstimator(min_arrivals=50, hold=(0.15, 0.3))
    for t in neyman_scott(5.0, 400.0):
        estimator.add(t)
    first = estimator.held()
    assert first is not None
    assert estimator.held() is first
    # The same function, now called without clusters: the mean drops past 0.15.
    start = 401.0
    for t in poisson(20.0, 4000):
        estimator.add(start + t)
    later = estimator.held()
    assert later is not None
    assert later is not first
    assert later.mean < first.mean - 0.15


def test_a_measured_shape_becomes_the_burst_model_and_its_burstiness() -> None:
    settings = AutoscaleSettings(burst_budget=0.01)
    planned = shaped(settings, ClusterShape(mean=2.013, gap_s=0.00493, arrivals=500))
    assert planned.burst_mean == 2.0  # to 0.05
    assert planned.burst_gap_ms == pytest.approx(4.93, rel=0.05)
    assert planned.burstiness == pytest.approx(3.0)  # 2m - 1
    assert planned.burst_budget == 0.01
    # Never below the burstiness set.
    assert (
        shaped(AutoscaleSettings(burstiness=4.0), ClusterShape(2.0, 0.005, 500)).burstiness == 4.0
    )


def test_the_simulator_plans_with_the_clusters_it_measures() -> None:
    # 10 clusters/s of 2 requests 5 ms apart, of a function that serves in 30 ms.
    fn = FunctionProfile("f", "m", 100_000_000, 0.030, 0.080, 1.0)
    arrivals = [Arrival(t, "f") for t in neyman_scott(10.0, 60.0)]
    functions = shared_functions([fn])
    cluster = SharingCluster(nodes=1, gpus_per_node=4)
    options = SharingOptions(idle_s=60.0)
    measuring = simulate_sharing(functions, arrivals, cluster, options)
    blind = simulate_sharing(
        functions, arrivals, cluster, SharingOptions(idle_s=60.0, measure_clusters=False)
    )
    shape = measuring.shapes["f"]
    assert shape is not None
    assert shape.mean == pytest.approx(2.0, abs=0.2)
    # The measured clusters raise the floor above the one request the rule as set
    # (no cluster model) asks for.
    assert measuring.peak_instances > blind.peak_instances

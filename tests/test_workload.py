"""The synthetic Azure-like workload generator."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from gfaas.sim.workload import WorkloadSpec, generate, read_csv, write_csv

pytestmark = pytest.mark.unit

SPEC = WorkloadSpec(
    n_functions=50, duration_s=20.0, rate=80.0, total_model_bytes=30_000_000_000, seed=7
)


def test_the_same_seed_gives_the_same_workload() -> None:
    assert generate(SPEC) == generate(SPEC)


def test_a_different_seed_gives_a_different_trace() -> None:
    other = replace(SPEC, seed=8)
    assert generate(SPEC).arrivals != generate(other).arrivals


def test_a_trace_round_trips_through_csv(tmp_path: Path) -> None:
    arrivals = generate(SPEC).arrivals
    path = tmp_path / "trace.csv"
    write_csv(path, arrivals)
    assert path.read_text().splitlines()[0] == "time_s,function"
    assert read_csv(path) == arrivals


def test_model_sizes_total_the_target_and_each_fits_the_cap() -> None:
    spec = replace(SPEC, max_model_bytes=1_000_000_000)
    sizes = [f.model_bytes for f in generate(spec).functions]
    assert sum(sizes) == pytest.approx(spec.total_model_bytes, rel=1e-3)
    assert max(sizes) <= spec.max_model_bytes


def test_an_impossible_size_target_is_refused() -> None:
    spec = replace(SPEC, max_model_bytes=100_000_000)
    with pytest.raises(ValueError, match="cannot total"):
        generate(spec)


def test_popularity_is_zipf_like_with_the_first_function_most_called() -> None:
    workload = generate(SPEC)
    counts = {f.name: 0 for f in workload.functions}
    for a in workload.arrivals:
        counts[a.function] += 1
    ranked = sorted(counts, key=counts.__getitem__, reverse=True)
    assert ranked[0] == "fn0000"
    assert counts["fn0000"] > 5 * counts[ranked[len(ranked) // 2]]


def test_arrivals_are_sorted_inside_the_trace_and_near_the_asked_rate() -> None:
    spec = replace(SPEC, duration_s=200.0)
    times = [a.time_s for a in generate(spec).arrivals]
    assert times == sorted(times)
    assert times[0] >= 0.0
    assert times[-1] < spec.duration_s
    assert 0.5 * spec.rate < len(times) / spec.duration_s < 1.5 * spec.rate


def test_every_function_has_a_profile_with_an_attainable_slo() -> None:
    for f in generate(SPEC).functions:
        assert f.exec_s > 0
        assert f.slo_s > f.exec_s

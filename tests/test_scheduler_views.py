"""The live scheduler's views: heartbeats and completions in, policy views out (no NATS)."""

from __future__ import annotations

import msgspec
import pytest

from services.scheduler.state import ClusterState, Invocation
from shared.scheduling import DeviceProfile, RequestView, WorkerView, make_policy, plan
from shared.scheduling.observed import (
    alone_exec_s,
    assume_finished,
    ewma,
    fit_profile,
    reported_cache,
    with_running,
)
from shared.schema import Done, FunctionKind, FunctionSpec, InvocationMeta, WorkerHeartbeat

pytestmark = pytest.mark.unit

MB = 1_000_000
CAPACITY = 13 * MB


def heartbeat(worker_id: str, **models: int) -> WorkerHeartbeat:
    return WorkerHeartbeat(
        worker_id=worker_id,
        device="cpu",
        pid=1,
        memory_total=64_000 * MB,
        memory_used=0,
        memory_free=64_000 * MB,
        models=sorted(models),
        capacity=4,
        cache_capacity=CAPACITY,
        model_bytes=dict(models),
        model_load_s={k: 0.01 + v / 100e6 for k, v in models.items()},
        model_score=dict.fromkeys(models, 1.0),
    )


def spec(name: str, model: str = "", slo_ms: float = 100.0) -> FunctionSpec:
    return FunctionSpec(name=name, handler="m:f", kind=FunctionKind.GPU, model=model, slo_ms=slo_ms)


def invocation(state: ClusterState, n: int, fn: FunctionSpec, now: float) -> Invocation:
    meta = InvocationMeta(invocation_id=f"i{n}", function=fn.name)
    return Invocation(
        meta=meta, reply="", body=b"", headers={}, view=state.request_view(fn, meta, now, 0)
    )


def test_a_reported_cache_holds_sizes_costs_and_loads_still_under_way() -> None:
    cache = reported_cache(
        CAPACITY, {"a": 4 * MB, "b": 2 * MB}, {"a": 0.05}, {"a": 3.0}, ["b"], now=10.0
    )
    assert cache.free == CAPACITY - 6 * MB
    assert cache.entries["a"].load_s == 0.05
    assert cache.popularity("a", 10.0) == 3.0
    assert cache.ready("a", 10.0)
    assert not cache.ready("b", 10.0)


def test_running_requests_count_as_resident_and_pinned_before_the_worker_says_so() -> None:
    reported = WorkerView(
        worker_id="w",
        device="cpu",
        capacity=4,
        cache=reported_cache(CAPACITY, {"old": 12 * MB}, {"old": 0.1}, {}, [], now=0.0),
    )
    running = RequestView(invocation_id="r", function="f", model="new", model_bytes=3 * MB)
    view = with_running(reported, [running], now=1.0)
    assert view.outstanding == 1
    assert view.resident == {"new"}  # "old" was evicted to make room
    assert view.cache is not None
    assert view.cache.entries["new"].pins == 1
    after = assume_finished(view, running)
    assert after.outstanding == 0
    assert after.cache is not None
    assert after.cache.entries["new"].pins == 0


def test_a_profile_is_fitted_to_measured_loads() -> None:
    # 10 ms fixed + 100 MB/s.
    samples = [(0, 0.010), (4 * MB, 0.050), (16 * MB, 0.170)]
    profile = fit_profile(samples)
    assert profile.link_bandwidth == pytest.approx(100e6, rel=1e-6)
    assert profile.swap_overhead_s == pytest.approx(0.010, rel=1e-6)


def test_a_profile_without_usable_loads_is_the_default() -> None:
    base = DeviceProfile()
    assert fit_profile([], base) is base
    assert fit_profile([(0, 0.01)], base) is base
    one = fit_profile([(12 * MB, 0.062)], base)
    assert one.swap_overhead_s == base.swap_overhead_s
    assert one.link_bandwidth == pytest.approx(12 * MB / 0.060)


def test_exec_time_is_learned_without_the_interference_of_co_runners() -> None:
    profile = DeviceProfile(interference=0.5)
    assert alone_exec_s(0.030, 2, profile) == pytest.approx(0.015)
    assert ewma(0.0, 0.02) == 0.02
    assert ewma(0.02, 0.04, alpha=0.5) == pytest.approx(0.03)
    # One stall of 100x counts as 4x: the estimate moves, but not past the SLOs.
    assert ewma(0.001, 0.1, alpha=0.5) == pytest.approx(0.0025)


def test_heartbeats_and_completions_fill_the_request_view() -> None:
    state = ClusterState(worker_timeout_s=1.0, pending_limit=10)
    assert state.observe(heartbeat("w0", cnn=12 * MB), now=0.0)
    fn = spec("classify", model="cnn")
    first = invocation(state, 0, fn, now=1.0)
    assert (first.view.model_bytes, first.view.exec_s) == (12 * MB, 0.0)
    assert first.view.due == pytest.approx(1.1)
    state.assign("w0", first, now=1.0)
    state.done(
        Done(worker_id="w0", invocation_id="i0", function="classify", ok=True, exec_ms=20.0), 1.05
    )
    again = invocation(state, 1, fn, now=2.0)
    assert again.view.exec_s == pytest.approx(0.020)
    # A cold run (the model was not on the worker) teaches nothing: it includes the load.
    cold = invocation(state, 2, spec("encode", model="enc"), now=2.0)
    state.assign("w0", cold, now=2.0)
    done = Done(worker_id="w0", invocation_id="i2", function="encode", ok=True, exec_ms=90.0)
    state.done(done, 2.1)
    assert "encode" not in state.exec_s
    assert state.workers["w0"].view.outstanding == 0
    assert state.slo.counts["classify"] == (1, 1)


def test_a_run_that_overran_its_deadline_is_learnt_from_one_that_failed_is_not() -> None:
    """A handler that returned past its deadline (its caller answered deadline_exceeded,
    the note ok false) still took that long: its exec_ms is learnt, scheduled or sent
    under a grant, or a function that often overruns looks fast. A run that failed
    otherwise sends no time, and teaches nothing."""
    state = ClusterState(worker_timeout_s=1.0, pending_limit=10)
    state.observe(heartbeat("w0", cnn=12 * MB), now=0.0)
    fn = spec("classify", model="cnn")
    late = invocation(state, 0, fn, now=1.0)
    state.assign("w0", late, now=1.0)
    overran = Done(
        worker_id="w0", invocation_id="i0", function="classify", ok=False, exec_ms=2000.0
    )
    state.done(overran, 3.0)
    assert state.exec_s["classify"] == pytest.approx(2.0)
    assert state.slo.counts["classify"] == (1, 0)  # and it missed its SLO (seen, met)
    failed = invocation(state, 1, fn, now=3.0)
    state.assign("w0", failed, now=3.0)
    state.done(Done(worker_id="w0", invocation_id="i1", function="classify", ok=False), 3.1)
    assert state.exec_s["classify"] == pytest.approx(2.0)
    state.done_direct(
        Done(worker_id="w0", invocation_id="d", function="direct", ok=False, exec_ms=500.0)
    )
    assert state.exec_s["direct"] == pytest.approx(0.5)
    state.done_direct(Done(worker_id="w0", invocation_id="e", function="other", ok=False))
    assert "other" not in state.exec_s


def test_a_heartbeat_keeps_what_was_sent_since() -> None:
    state = ClusterState(worker_timeout_s=1.0, pending_limit=10)
    state.observe(heartbeat("w0"), now=0.0)
    state.model_bytes["enc"] = 2 * MB
    inv = invocation(state, 0, spec("encode", model="enc"), now=0.1)
    state.assign("w0", inv, now=0.1)
    # The worker has not started on it yet: its heartbeat still says nothing is resident.
    state.observe(heartbeat("w0"), now=0.2)
    view = state.workers["w0"].view
    assert view.outstanding == 1
    assert "enc" in view.resident


def test_the_live_views_let_locality_keep_models_apart() -> None:
    """Two models that do not fit one worker's cache together go to different workers."""
    state = ClusterState(worker_timeout_s=1.0, pending_limit=10)
    state.observe(heartbeat("w0"), now=0.0)
    state.observe(heartbeat("w1"), now=0.0)
    state.model_bytes.update(cnn=12 * MB, enc=2 * MB)
    policy = make_policy("locality")
    a = invocation(state, 0, spec("classify", model="cnn"), now=0.0)
    b = invocation(state, 1, spec("encode", model="enc"), now=0.0)
    for inv in (a, b):
        state.enqueue(inv)
    result = plan(policy, state.queue(256, with_rrc=False), state.views(), 0.0)
    placed = dict(result.assignments)
    assert placed["i0"] != placed["i1"]


def test_the_views_carry_the_workers_node_and_the_inputs_node() -> None:
    state = ClusterState(worker_timeout_s=1.0, pending_limit=10)
    state.observe(msgspec.structs.replace(heartbeat("w0"), node="n1"), now=0.0)
    assert state.workers["w0"].view.node == "n1"
    meta = InvocationMeta(invocation_id="i0", function="classify", node="n1")
    assert state.request_view(spec("classify"), meta, 0.0, 0).node == "n1"

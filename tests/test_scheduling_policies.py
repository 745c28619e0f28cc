"""Placement policies and queue-level dispatch, with hand-built cluster views."""

from __future__ import annotations

import dataclasses

import pytest

from shared.scheduling import (
    DeviceCache,
    Rejected,
    RequestView,
    SloTracker,
    WorkerView,
    decide,
    make_policy,
    plan,
    plan_dispatch,
    rrc,
)
from shared.scheduling.locality import Locality
from shared.scheduling.slo import SloAware, predict_latency
from shared.schema import FunctionKind

MB = 1_000_000
pytestmark = pytest.mark.unit


def gpu(
    worker_id: str,
    *,
    resident: tuple[str, ...] = (),
    outstanding: int = 0,
    capacity: int = 4,
    cache: DeviceCache | None = None,
    memory_free: int = 10_000 * MB,
    link_busy_until: float = 0.0,
) -> WorkerView:
    if cache is not None:
        resident = tuple(cache.entries)
        memory_free = cache.free
    return WorkerView(
        worker_id=worker_id,
        device="cuda:0",
        capacity=capacity,
        outstanding=outstanding,
        resident=frozenset(resident),
        memory_free=memory_free,
        cache=cache,
        link_busy_until=link_busy_until,
    )


def req(
    n: int,
    model: str,
    *,
    at: float = 0.0,
    slo_ms: float = 1000.0,
    exec_s: float = 0.010,
    size: int = 120 * MB,
    rrc_value: float = 0.0,
) -> RequestView:
    return RequestView(
        invocation_id=f"r{n}",
        function=f"fn-{model}",
        kind=FunctionKind.GPU,
        model=model,
        arrived_at=at,
        slo_ms=slo_ms,
        exec_s=exec_s,
        model_bytes=size,
        rrc=rrc_value,
    )


def test_every_documented_policy_name_makes_a_policy() -> None:
    for name in ["round_robin", "least_loaded", "load_balance", "locality", "slo"]:
        assert make_policy(name).name == name


def test_an_unknown_policy_name_is_an_error_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="locality"):
        make_policy("nope")


def test_load_balance_picks_the_least_loaded_worker_whatever_is_resident() -> None:
    workers = [gpu("a", resident=("m",), outstanding=2), gpu("b", outstanding=0)]
    assert make_policy("load_balance").choose(req(0, "m"), workers, 0.0) == "b"


def test_locality_sends_request_where_model_is_resident() -> None:
    workers = [gpu("a", outstanding=0), gpu("b", resident=("m",), outstanding=1)]
    assert make_policy("locality").choose(req(0, "m"), workers, 0.0) == "b"


def test_locality_skips_an_overloaded_resident_worker() -> None:
    workers = [gpu("a", outstanding=0), gpu("b", resident=("m",), outstanding=3)]
    assert Locality(overload_slack=1).choose(req(0, "m"), workers, 0.0) == "a"


def test_locality_waits_for_a_full_warm_worker_only_as_long_as_a_swap_would_take() -> None:
    workers = [gpu("a"), gpu("b", resident=("m",), outstanding=4)]
    request = req(0, "m", size=1200 * MB)  # ~0.1 s to swap in at 12 GB/s
    policy = make_policy("locality")
    assert policy.choose(request, workers, 0.05) is None
    assert policy.choose(request, workers, 0.2) == "a"


def test_locality_loads_a_cold_model_where_it_evicts_least() -> None:
    hot = DeviceCache(capacity=300 * MB).insert("hot", 300 * MB, 0.03, 0.0)
    for _ in range(20):
        hot = hot.use("hot", 0.0).release("hot")
    cold = DeviceCache(capacity=300 * MB).insert("cold", 300 * MB, 0.03, 0.0)
    workers = [gpu("a", cache=hot), gpu("b", cache=cold)]
    assert make_policy("locality").choose(req(0, "new", size=200 * MB), workers, 1.0) == "b"


def test_locality_prefers_free_memory_over_any_eviction() -> None:
    full = DeviceCache(capacity=300 * MB).insert("x", 300 * MB, 0.03, 0.0)
    empty = DeviceCache(capacity=300 * MB)
    workers = [gpu("a", cache=full), gpu("b", cache=empty)]
    assert make_policy("locality").choose(req(0, "new", size=200 * MB), workers, 1.0) == "b"


def test_slo_prediction_adds_link_backlog_swap_and_interference() -> None:
    w = gpu("a", outstanding=2, link_busy_until=1.05)
    r = req(0, "m", exec_s=0.010, size=120 * MB)
    # backlog 0.05 + swap (0.002 + 0.01) + exec 0.010 * (1 + 0.2 * 2)
    assert predict_latency(r, w, 1.0) == pytest.approx(0.05 + 0.012 + 0.014)


def test_slo_rejects_when_no_worker_can_meet_the_deadline() -> None:
    workers = [gpu("a"), gpu("b")]
    request = req(0, "m", slo_ms=5.0, exec_s=0.010)
    decision = decide(make_policy("slo"), request, workers, 0.0)
    assert isinstance(decision, Rejected)
    assert decision.invocation_id == "r0"
    # The plain Policy method never rejects: it keeps the request queued.
    assert make_policy("slo").choose(request, workers, 0.0) is None


def test_slo_avoids_a_warm_worker_whose_co_runners_would_make_it_late() -> None:
    workers = [gpu("busy", resident=("m",), outstanding=3), gpu("idle")]
    # warm but busy: 20 ms * (1 + 0.2 * 3) = 32 ms; cold but idle: 2 + 5 + 20 = 27 ms
    request = req(0, "m", slo_ms=30.0, exec_s=0.020, size=60 * MB)
    assert SloAware().decide(request, workers, 0.0) == "idle"


def test_slo_keeps_a_request_queued_when_a_drained_worker_could_still_make_it() -> None:
    workers = [gpu("a", resident=("m",), outstanding=4)]
    assert SloAware().decide(req(0, "m", slo_ms=100.0), workers, 0.0) is None


def test_slo_rejects_a_request_whose_deadline_passed_in_the_queue() -> None:
    decision = SloAware().decide(req(0, "m", slo_ms=100.0), [gpu("a")], 0.5)
    assert isinstance(decision, Rejected)


def test_rrc_counts_the_hits_a_function_needs_to_recover() -> None:
    assert rrc(100, 98, 0.98) == pytest.approx(0.0)
    assert rrc(100, 97, 0.98) == pytest.approx(50.0)
    tracker = SloTracker().record("f", met=False).record("f", met=True)
    assert tracker.rrc("f") == pytest.approx((0.98 * 2 - 1) / 0.02)
    assert SloTracker().rrc("never-seen") == 0.0


def test_slo_queues_functions_behind_their_target_first() -> None:
    on_track = req(0, "a", at=0.0)
    behind = req(1, "b", at=0.5, rrc_value=40.0)
    assert [r.invocation_id for r in SloAware().order([on_track, behind], 1.0)] == ["r1", "r0"]


def test_fifo_dispatch_tracks_load_while_planning_several_requests() -> None:
    workers = [gpu("a", capacity=2), gpu("b", capacity=1)]
    pending = [req(n, "m", at=n * 0.001) for n in range(4)]
    assignments = plan_dispatch(make_policy("load_balance"), pending, workers, 1.0)
    assert [i for i, _ in assignments] == ["r0", "r1", "r2"]
    assert sorted(w for _, w in assignments) == ["a", "a", "b"]


def test_dispatch_never_changes_the_views_it_was_given() -> None:
    workers = [gpu("a", capacity=2)]
    result = plan(make_policy("locality"), [req(0, "m")], workers, 0.0)
    assert workers[0].outstanding == 0
    assert not workers[0].resident
    assert result.workers[0].outstanding == 1
    assert "m" in result.workers[0].resident


def test_out_of_order_dispatch_lets_a_resident_model_request_overtake_a_swap() -> None:
    workers = [gpu("a", resident=("warm",), capacity=1)]
    pending = [req(0, "cold", at=0.00), req(1, "warm", at=0.01)]
    assert plan_dispatch(make_policy("locality"), pending, workers, 0.02) == [("r1", "a")]
    assert plan_dispatch(make_policy("locality_fifo"), pending, workers, 0.02) == [("r0", "a")]


def test_out_of_order_dispatch_does_not_let_much_later_requests_overtake() -> None:
    workers = [gpu("a", resident=("warm",), capacity=1)]
    pending = [req(0, "cold", at=0.0), req(1, "warm", at=1.0)]
    policy = Locality(max_overtake_s=0.25)
    assert plan_dispatch(policy, pending, workers, 1.0) == [("r0", "a")]


def test_plan_reports_slo_rejections_separately_from_assignments() -> None:
    workers = [gpu("a")]
    pending = [req(0, "m", slo_ms=1.0), req(1, "m", at=0.0, slo_ms=500.0)]
    result = plan(make_policy("slo"), pending, workers, 0.0)
    assert [r.invocation_id for r in result.rejected] == ["r0"]
    assert result.assignments == [("r1", "a")]


def test_a_gpu_function_falls_back_to_cpu_workers_when_there_is_no_gpu() -> None:
    cpu = WorkerView(worker_id="c", device="cpu", capacity=1)
    assert make_policy("locality").choose(req(0, "m"), [cpu], 0.0) == "c"


def test_a_workflow_stage_goes_where_its_inputs_are_unless_that_costs_more() -> None:
    stage = dataclasses.replace(req(1, "m"), near="b")
    policy = make_policy("round_robin")
    workers = [gpu("a"), gpu("b")]
    assert decide(policy, stage, workers, 0.0) == "b"
    # Not onto a full worker, nor one busier than the pick by more than one request.
    assert decide(policy, stage, [gpu("a"), gpu("b", outstanding=4)], 0.0) == "a"
    assert decide(policy, stage, [gpu("a"), gpu("b", outstanding=2)], 0.0) == "a"
    # Not when the model is warm on the pick and would have to load there.
    locality = make_policy("locality")
    warm_a = [gpu("a", resident=("m",)), gpu("b")]
    assert decide(locality, stage, warm_a, 0.0) == "a"
    both_warm = [gpu("a", resident=("m",)), gpu("b", resident=("m",))]
    assert decide(locality, stage, both_warm, 0.0) == "b"


def on(node: str, worker: WorkerView) -> WorkerView:
    return dataclasses.replace(worker, node=node)


def test_a_request_goes_to_a_worker_on_the_node_holding_its_inputs() -> None:
    pooled = dataclasses.replace(req(1, "m"), node="y")
    least = make_policy("least_loaded")
    workers = [on("x", gpu("a")), on("y", gpu("b")), on("y", gpu("c"))]
    assert decide(least, req(1, "m"), workers, 0.0) == "a"  # by load (and name) alone
    assert decide(least, pooled, workers, 0.0) == "b"
    # The policy's pick on that node stands; among the node's workers the least loaded.
    assert decide(make_policy("round_robin"), pooled, workers[1:], 0.0) == "b"
    busy_b = [on("x", gpu("a")), on("y", gpu("b", outstanding=1)), on("y", gpu("c"))]
    assert decide(least, pooled, busy_b, 0.0) == "c"
    # A worker there that holds the model goes before an idler cold one.
    warm_c = [on("x", gpu("a")), on("y", gpu("b")), on("y", gpu("c", resident=("m",)))]
    assert decide(make_policy("round_robin"), pooled, warm_c, 0.0) == "c"


def test_the_input_node_is_preferred_only_among_acceptable_choices() -> None:
    pooled = dataclasses.replace(req(1, "m"), node="y")
    least = make_policy("least_loaded")
    # Not onto a full worker, nor one busier than the pick by more than one request.
    assert decide(least, pooled, [on("x", gpu("a")), on("y", gpu("b", outstanding=4))], 0.0) == "a"
    assert decide(least, pooled, [on("x", gpu("a")), on("y", gpu("b", outstanding=2))], 0.0) == "a"
    assert decide(least, pooled, [on("x", gpu("a")), on("y", gpu("b", outstanding=1))], 0.0) == "b"
    # Not onto another kind of device than the policy chose.
    cpu_there = WorkerView(worker_id="b", device="cpu", capacity=4, node="y")
    assert decide(least, pooled, [on("x", gpu("a")), cpu_there], 0.0) == "a"
    # Not when the model is warm on the pick and would have to load there.
    locality = make_policy("locality")
    warm_a = [on("x", gpu("a", resident=("m",))), on("y", gpu("b"))]
    assert decide(locality, pooled, warm_a, 0.0) == "a"
    # Nothing on that node (or no node reported): the policy's pick.
    assert decide(least, pooled, [on("x", gpu("a")), gpu("b")], 0.0) == "a"


def test_a_workflow_stage_near_its_producer_stays_there_on_the_same_node() -> None:
    stage = dataclasses.replace(req(1, "m"), near="c", node="y")
    workers = [on("x", gpu("a")), on("y", gpu("b")), on("y", gpu("c"))]
    assert decide(make_policy("least_loaded"), stage, workers, 0.0) == "c"


def test_queued_requests_fill_the_input_node_then_go_elsewhere() -> None:
    pending = [dataclasses.replace(req(n, "m", at=n * 0.001), node="y") for n in range(3)]
    workers = [on("x", gpu("a", capacity=4)), on("y", gpu("b", capacity=2))]
    assert plan_dispatch(make_policy("least_loaded"), pending, workers, 1.0) == [
        ("r0", "b"),
        ("r1", "b"),
        ("r2", "a"),
    ]

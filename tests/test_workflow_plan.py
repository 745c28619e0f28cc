"""Workflow structure: the pure checks and ordering behind deploy and run."""

from __future__ import annotations

import pytest

from shared.schema import DType, FunctionSpec, StageSpec, TensorSpec, WorkflowSpec
from shared.workflow import MAX_STAGES, WorkflowError, check_functions, plan_workflow

pytestmark = pytest.mark.unit

X = [TensorSpec(name="x", dtype=DType.FLOAT32, shape=[-1])]


def wf(stages: list[StageSpec], outputs: dict[str, str] | None = None) -> WorkflowSpec:
    return WorkflowSpec(name="w", inputs=X, stages=stages, outputs=outputs or {"y": "d.y"})


DIAMOND = [
    StageSpec(name="d", function="add", inputs={"a": "b.y", "b": "c.y"}),
    StageSpec(name="b", function="double", inputs={"x": "a.y"}),
    StageSpec(name="c", function="echo", inputs={"x": "a.y"}),
    StageSpec(name="a", function="add-one", inputs={"x": "$in.x"}),
]


def test_stages_are_ordered_after_what_they_read() -> None:
    plan = plan_workflow(wf(DIAMOND))
    assert plan.order == ("a", "b", "c", "d")
    assert plan.deps["d"] == {"b", "c"}
    assert plan.readers == {"a.y": 2, "b.y": 1, "c.y": 1}
    assert plan.feeds_stages("a")
    assert not plan.feeds_stages("d")


def test_a_cycle_is_refused() -> None:
    stages = [
        StageSpec(name="a", function="f", inputs={"x": "b.y"}),
        StageSpec(name="b", function="f", inputs={"x": "a.y"}),
    ]
    with pytest.raises(WorkflowError, match="cycle"):
        plan_workflow(wf(stages, {"y": "a.y"}))


@pytest.mark.parametrize(
    ("stages", "outputs", "match"),
    [
        ([StageSpec(name="a", function="f", inputs={"x": "$in.z"})], {"y": "a.y"}, "inputs are"),
        ([StageSpec(name="a", function="f", inputs={"x": "q.y"})], {"y": "a.y"}, "unknown"),
        ([StageSpec(name="a", function="f", inputs={"x": "a.y"})], {"y": "a.y"}, "its own"),
        ([StageSpec(name="a", function="f", inputs={"x": "nodot"})], {"y": "a.y"}, "source"),
        ([StageSpec(name="a", function="f", inputs={"x": "$in.x"})], {"y": "b.y"}, "no such"),
        ([StageSpec(name="a", function="f", inputs={"x": "$in.x"})], {}, "no outputs"),
        ([], {"y": "a.y"}, "no stages"),
    ],
)
def test_malformed_workflows_are_refused_with_a_reason(
    stages: list[StageSpec], outputs: dict[str, str], match: str
) -> None:
    spec = WorkflowSpec(name="w", inputs=X, stages=stages, outputs=outputs)
    with pytest.raises(WorkflowError, match=match):
        plan_workflow(spec)


def test_stage_inputs_must_match_the_function() -> None:
    plan = plan_workflow(wf(DIAMOND))
    specs = {
        name: FunctionSpec(name=name, handler="m:f", inputs=X)
        for name in ("double", "echo", "add-one")
    }
    with pytest.raises(WorkflowError, match="'add' is not deployed"):
        check_functions(plan, specs)
    specs["add"] = FunctionSpec(name="add", handler="m:f", inputs=X)
    with pytest.raises(WorkflowError, match="takes"):
        check_functions(plan, specs)


def test_a_workflow_output_the_stage_function_never_makes_is_refused() -> None:
    # Deploy checked only what other stages read: `a.nope` went through, and every
    # call then failed after all its stages had run.
    y = [TensorSpec(name="y", dtype=DType.FLOAT32, shape=[-1])]
    specs = {"f": FunctionSpec(name="f", handler="m:f", inputs=X, outputs=y)}
    stages = [StageSpec(name="a", function="f", inputs={"x": "$in.x"})]
    check_functions(plan_workflow(wf(stages, {"out": "a.y"})), specs)
    with pytest.raises(WorkflowError, match=r"a\.nope: f has no output 'nope'"):
        check_functions(plan_workflow(wf(stages, {"out": "a.nope"})), specs)


def chain(n: int) -> WorkflowSpec:
    """s0 <- s1 <- ... <- s(n-1), listed last first."""
    stages = [StageSpec(name="s0", function="f", inputs={"x": "$in.x"})]
    stages += [
        StageSpec(name=f"s{i}", function="f", inputs={"x": f"s{i - 1}.y"}) for i in range(1, n)
    ]
    return wf(stages[::-1], {"y": f"s{n - 1}.y"})


def test_a_workflow_of_more_stages_than_the_limit_is_refused() -> None:
    # None was: 4,000 stages took ingress's loop half a second to plan and 1.4 s to
    # check at each run, every other invocation waiting behind it.
    y = [TensorSpec(name="y", dtype=DType.FLOAT32, shape=[-1])]
    specs = {"f": FunctionSpec(name="f", handler="m:f", inputs=X, outputs=y)}
    plan = plan_workflow(chain(MAX_STAGES))
    assert plan.order == tuple(f"s{i}" for i in range(MAX_STAGES))
    assert plan.function_of(f"s{MAX_STAGES - 1}") == "f"
    check_functions(plan, specs)
    with pytest.raises(WorkflowError, match=f"{MAX_STAGES + 1} stages; the limit is"):
        plan_workflow(chain(MAX_STAGES + 1))

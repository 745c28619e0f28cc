"""Workflows: DAGs of functions whose intermediates move by handle.

Pure: validating a WorkflowSpec and planning its stages, no I/O. Ingress runs the
plan (services/ingress/workflow.py); `gfaas deploy` validates with it first.

A stage's input source is `$in.<name>` (a workflow input) or `<stage>.<output>`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.names import is_valid_name, name_problem
from shared.schema import FunctionSpec, TensorSpec, WorkflowSpec

INPUT = "$in"
# The most stages one workflow may have. Ingress plans and checks a workflow's stages
# on its event loop (each run checks them again), and each stage is a call of its
# own: a workflow of thousands took seconds of that loop per run, every other
# caller's invocations waiting behind it.
MAX_STAGES = 256


class WorkflowError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Source:
    stage: str  # INPUT for a workflow input
    name: str

    @property
    def key(self) -> str:
        return f"{self.stage}.{self.name}"


def parse_source(text: str) -> Source:
    stage, dot, name = text.partition(".")
    if not dot or not stage or not name:
        raise WorkflowError(f"source {text!r} must be '$in.<input>' or '<stage>.<output>'")
    return Source(stage, name)


@dataclass(frozen=True)
class WorkflowPlan:
    spec: WorkflowSpec
    # Stages in an order where every stage comes after those it reads from.
    order: tuple[str, ...]
    sources: Mapping[str, Mapping[str, Source]]  # stage -> input -> source
    deps: Mapping[str, frozenset[str]]  # stage -> stages it reads from
    outputs: Mapping[str, Source]
    # How many stages read each stage output (fan-out), by Source.key.
    readers: Mapping[str, int]
    # Stage -> its function.
    functions: Mapping[str, str] = field(default_factory=dict)

    def function_of(self, stage: str) -> str:
        return self.functions[stage]

    def feeds_stages(self, stage: str) -> bool:
        """Whether any other stage reads one of `stage`'s outputs."""
        return any(key.startswith(f"{stage}.") for key in self.readers)


def plan_workflow(spec: WorkflowSpec) -> WorkflowPlan:
    """Check a workflow's structure and order its stages; raise WorkflowError."""
    if not is_valid_name(spec.name):
        raise WorkflowError(name_problem("workflow", spec.name))
    if not spec.stages:
        raise WorkflowError(f"workflow {spec.name} has no stages")
    if len(spec.stages) > MAX_STAGES:
        raise WorkflowError(
            f"workflow {spec.name} has {len(spec.stages)} stages; the limit is {MAX_STAGES}"
        )
    names = [s.name for s in spec.stages]
    if len(set(names)) != len(names):
        raise WorkflowError(f"workflow {spec.name}: stage names must be unique")
    inputs = {t.name for t in spec.inputs}
    sources: dict[str, dict[str, Source]] = {}
    deps: dict[str, frozenset[str]] = {}
    readers: dict[str, int] = {}
    for stage in spec.stages:
        if not is_valid_name(stage.name) or stage.name == INPUT:
            raise WorkflowError(f"stage name {stage.name!r} is not a valid name")
        if not is_valid_name(stage.function):
            raise WorkflowError(f"stage {stage.name}: {name_problem('function', stage.function)}")
        parsed = {arg: parse_source(src) for arg, src in stage.inputs.items()}
        for arg, src in parsed.items():
            if src.stage == INPUT:
                if src.name not in inputs:
                    raise WorkflowError(
                        f"stage {stage.name}: input {arg} reads {src.key}, "
                        f"but the workflow's inputs are {sorted(inputs)}"
                    )
            elif src.stage not in names:
                raise WorkflowError(f"stage {stage.name}: input {arg} reads unknown stage")
            elif src.stage == stage.name:
                raise WorkflowError(f"stage {stage.name} reads its own output")
            else:
                readers[src.key] = readers.get(src.key, 0) + 1
        sources[stage.name] = parsed
        deps[stage.name] = frozenset(s.stage for s in parsed.values() if s.stage != INPUT)
    outputs = {name: parse_source(src) for name, src in spec.outputs.items()}
    for name, src in outputs.items():
        if src.stage not in names:
            raise WorkflowError(f"workflow output {name} reads {src.key}: no such stage")
    if not outputs:
        raise WorkflowError(f"workflow {spec.name} declares no outputs")
    functions = {stage.name: stage.function for stage in spec.stages}
    return WorkflowPlan(spec, _topological(deps), sources, deps, outputs, readers, functions)


def _topological(deps: Mapping[str, frozenset[str]]) -> tuple[str, ...]:
    """Stages in rounds, each round's sorted: those whose stages all came before."""
    waiting = {stage: len(d) for stage, d in deps.items()}
    readers: dict[str, list[str]] = {stage: [] for stage in deps}
    for stage, d in deps.items():
        for dep in d:
            readers[dep].append(stage)
    order: list[str] = []
    ready = sorted(stage for stage, n in waiting.items() if n == 0)
    while ready:
        order.extend(ready)
        following: list[str] = []
        for stage in ready:
            for reader in readers[stage]:
                waiting[reader] -= 1
                if waiting[reader] == 0:
                    following.append(reader)
        ready = sorted(following)
    if len(order) < len(deps):
        left = sorted(set(deps) - set(order))
        raise WorkflowError(f"stages {left} form a cycle")
    return tuple(order)


def check_functions(plan: WorkflowPlan, specs: Mapping[str, FunctionSpec]) -> None:
    """Each stage's function is deployed and gets exactly the inputs it declares."""
    # Stage -> the outputs of it that other stages read or the workflow returns.
    wanted_of: dict[str, list[Source]] = {}
    read = [src for sources in plan.sources.values() for src in sources.values()]
    for src in [*read, *plan.outputs.values()]:
        wanted_of.setdefault(src.stage, []).append(src)
    for stage in plan.spec.stages:
        spec = specs.get(stage.function)
        if spec is None:
            raise WorkflowError(f"stage {stage.name}: function {stage.function!r} is not deployed")
        if spec.inputs:
            wanted = {t.name for t in spec.inputs}
            if set(stage.inputs) != wanted:
                raise WorkflowError(
                    f"stage {stage.name}: {stage.function} takes {sorted(wanted)}, "
                    f"the stage gives {sorted(stage.inputs)}"
                )
        declared = {t.name for t in spec.outputs}
        if declared:
            # What other stages read and what the workflow returns alike: a workflow
            # output naming an output the function never makes fails every call.
            for src in wanted_of.get(stage.name, ()):
                if src.name not in declared:
                    raise WorkflowError(f"{src.key}: {stage.function} has no output {src.name!r}")


def as_model(spec: WorkflowSpec, functions: Mapping[str, FunctionSpec]) -> FunctionSpec:
    """A workflow as clients of one model see it (OIP metadata, the repository index,
    as Triton shows an ensemble): its inputs, and each output with the dtype and shape
    of the stage output it names (an output whose stage function declares none is left
    out of the metadata, not guessed)."""
    by_stage = {stage.name: functions.get(stage.function) for stage in spec.stages}
    outputs: list[TensorSpec] = []
    for name, text in spec.outputs.items():
        stage, _, output = text.partition(".")
        function = by_stage.get(stage)
        declared = {t.name: t for t in function.outputs} if function is not None else {}
        if output in declared:
            outputs.append(
                TensorSpec(name=name, dtype=declared[output].dtype, shape=declared[output].shape)
            )
    return FunctionSpec(
        name=spec.name,
        handler=f"workflow:{spec.name}",
        inputs=list(spec.inputs),
        outputs=outputs,
        slo_ms=spec.slo_ms,
        timeout_ms=spec.timeout_ms,
        description=spec.description or f"workflow of {len(spec.stages)} stages",
    )


def _fits(produced: TensorSpec, wanted: TensorSpec) -> bool:
    """Can a tensor declared as `produced` be passed where `wanted` is declared? Same
    dtype and rank; each dimension fixed in both is equal (-1 matches anything)."""
    if produced.dtype != wanted.dtype or len(produced.shape) != len(wanted.shape):
        return False
    return all(p == w or p < 0 or w < 0 for p, w in zip(produced.shape, wanted.shape, strict=True))


def check_tensors(plan: WorkflowPlan, specs: Mapping[str, FunctionSpec]) -> None:
    """Every stage input gets what it declares: the workflow input or the producing
    stage's output it reads has the same dtype and a compatible shape (where both
    sides declare them). Raises WorkflowError naming the first mismatch."""
    declared_inputs = {t.name: t for t in plan.spec.inputs}
    stages = {s.name: s for s in plan.spec.stages}
    for stage_name, sources in plan.sources.items():
        consumer = specs.get(stages[stage_name].function)
        if consumer is None:
            continue
        wanted = {t.name: t for t in consumer.inputs}
        for arg, src in sources.items():
            if arg not in wanted:
                continue
            if src.stage == INPUT:
                produced = declared_inputs.get(src.name)
            else:
                producer = specs.get(stages[src.stage].function)
                outs = {t.name: t for t in producer.outputs} if producer is not None else {}
                produced = outs.get(src.name)
            if produced is not None and not _fits(produced, wanted[arg]):
                raise WorkflowError(
                    f"stage {stage_name}: input {arg!r} wants {wanted[arg].dtype}"
                    f"{wanted[arg].shape}, but {src.key} is {produced.dtype}{produced.shape}"
                )

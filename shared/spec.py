"""Function and workflow specs from TOML or YAML files, validated into schema structs.

A file with `stages` (or a [workflow] table) is a workflow; anything else a function.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import yaml

from shared.codebundle import ref_problem
from shared.names import is_valid_name, name_problem
from shared.scheduling.packing import units
from shared.schema import FunctionSpec, TensorSpec, WorkflowSpec
from shared.workflow import WorkflowError, plan_workflow


class SpecError(ValueError):
    pass


def parse_spec(data: dict[str, Any], *, source: str = "<spec>") -> FunctionSpec:
    # A file may wrap the spec in a [function] table or give it at top level.
    body = data.get("function", data)
    try:
        spec = msgspec.convert(body, FunctionSpec)
    except msgspec.ValidationError as exc:
        raise SpecError(f"{source}: {exc}") from exc
    check_function(spec, source=source)
    return spec


def check_function(spec: FunctionSpec, *, source: str = "<spec>") -> None:
    """Raise SpecError naming the first thing wrong with `spec`: what a file load and
    a deploy (which may come from code, not a file) both check."""
    if not is_valid_name(spec.name):
        raise SpecError(f"{source}: {name_problem('function', spec.name)}")
    if spec.model and not is_valid_name(spec.model):
        raise SpecError(f"{source}: {name_problem('model', spec.model)}")
    if ":" not in spec.handler:
        raise SpecError(f"{source}: handler {spec.handler!r} must be 'module:attr'")
    if spec.code and (problem := ref_problem(spec.code)) is not None:
        raise SpecError(f"{source}: {problem}")
    # `not 0 < x < inf` so that NaN and inf (TOML has both) are refused too: the
    # autoscaler divides by the SLO.
    if spec.concurrency < 1 or spec.timeout_ms <= 0 or not 0.0 < spec.slo_ms < math.inf:
        raise SpecError(f"{source}: concurrency, timeout_ms and slo_ms must be positive")
    if spec.memory_mb <= 0:
        # An instance's memory is booked on its device and capped for its process:
        # a negative figure would free room that is not there and lift the cap.
        raise SpecError(f"{source}: memory_mb ({spec.memory_mb}) must be positive")
    _check_tensors(spec.inputs, spec.outputs, source)
    _check_scaling(spec, source)


def check_workflow(spec: WorkflowSpec, *, source: str = "<spec>") -> None:
    """Raise SpecError naming the first thing wrong with `spec`: its structure (as
    `plan_workflow` sees it), and what a function's check refuses of its timeout, SLO
    and inputs too, since ingress admits a workflow's call as one function's: a
    timeout_ms of 0 made every call's deadline now."""
    try:
        plan_workflow(spec)
    except WorkflowError as exc:
        raise SpecError(f"{source}: {exc}") from exc
    if spec.timeout_ms <= 0 or not 0.0 < spec.slo_ms < math.inf:
        raise SpecError(f"{source}: timeout_ms and slo_ms must be positive")
    _check_tensors(spec.inputs, [], source)


def _check_tensors(
    inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], source: str
) -> None:
    names = [t.name for t in inputs]
    if len(set(names)) != len(names):
        raise SpecError(f"{source}: input names must be unique")
    for tensor in [*inputs, *outputs]:
        if any(d < -1 or d == 0 for d in tensor.shape):
            raise SpecError(f"{source}: {tensor.name}: dimensions are positive or -1")


def _check_scaling(spec: FunctionSpec, source: str) -> None:
    if spec.slo_unmeetable not in ("best_effort", "reject"):
        raise SpecError(
            f"{source}: slo_unmeetable ({spec.slo_unmeetable!r}) is 'best_effort' or 'reject'"
        )
    if spec.min_instances < 0 or spec.max_instances < 0:
        raise SpecError(f"{source}: min_instances and max_instances must not be negative")
    if spec.max_instances and spec.min_instances > spec.max_instances:
        raise SpecError(
            f"{source}: min_instances ({spec.min_instances}) is above "
            f"max_instances ({spec.max_instances})"
        )
    # Written as `not x >= 0` so that NaN (TOML allows it) is refused too.
    if not spec.idle_s >= 0.0:
        raise SpecError(f"{source}: idle_s ({spec.idle_s}) must not be negative")
    for key, value in (("sm_share", spec.sm_share), ("time_quota", spec.time_quota)):
        if not 0.0 <= value <= 1.0:
            raise SpecError(
                f"{source}: {key} ({value}) is a fraction of one device, from 0 to 1 "
                "(0: the autoscaler chooses)"
            )
        if value:
            try:
                units(value)  # what the packer places: finer shares cannot be enforced
            except ValueError:
                raise SpecError(
                    f"{source}: {key} ({value}) must be a whole percent (0.01 to 1)"
                ) from None


def wants_instances(spec: FunctionSpec) -> bool:
    """Does `spec` run as instances of its own (started from zero, scaled, each with
    a share of a device)? A spec that names a count or a share does; the others run
    on the workers every function shares (one whole device each, time-sliced). So
    does one whose handler comes from a code bundle: its modules, imported into a
    process's one `sys.modules`, would collide with another bundle's (or version's)."""
    return bool(
        spec.min_instances or spec.max_instances or spec.sm_share or spec.time_quota or spec.code
    )


def check_fits(spec: FunctionSpec, device_memory_bytes: Sequence[int]) -> str | None:
    """Why no device of these (each one's total memory) can hold an instance of
    `spec`, or None when one can. No devices: nothing to check against, None."""
    if not device_memory_bytes:
        return None
    largest = max(device_memory_bytes)
    if spec.memory_mb * 1024 * 1024 <= largest:
        return None
    return (
        f"{spec.name}: memory_mb {spec.memory_mb} does not fit any device "
        f"(the largest has {largest // (1024 * 1024)} MB)"
    )


def parse_workflow(data: dict[str, Any], *, source: str = "<spec>") -> WorkflowSpec:
    body = data.get("workflow", data)
    try:
        spec = msgspec.convert(body, WorkflowSpec)
    except msgspec.ValidationError as exc:
        raise SpecError(f"{source}: {exc}") from exc
    check_workflow(spec, source=source)
    return spec


def is_workflow(data: dict[str, Any]) -> bool:
    return "workflow" in data or "stages" in data


def load_spec(path: Path) -> FunctionSpec:
    spec = load_any(path)
    if not isinstance(spec, FunctionSpec):
        raise SpecError(f"{path}: a workflow, not a function")
    return spec


def load_any(path: Path) -> FunctionSpec | WorkflowSpec:
    data = _read(path)
    if is_workflow(data):
        return parse_workflow(data, source=str(path))
    return parse_spec(data, source=str(path))


def _read(path: Path) -> dict[str, Any]:
    text = path.read_text()
    # A file that does not parse is the caller's mistake, named with its path: a
    # YAMLError is no ValueError, so it escaped the CLI as a traceback.
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in {".yaml", ".yml"}:
            data = yaml.safe_load(text)
        else:
            raise SpecError(f"{path}: spec files are .toml, .yaml or .yml")
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a table of fields")
    return data

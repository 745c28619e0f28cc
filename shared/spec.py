"""Function and workflow specs from TOML or YAML files, validated into schema structs.

A file with `stages` (or a [workflow] table) is a workflow; anything else a function.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import msgspec
import yaml

from shared.schema import FunctionSpec, WorkflowSpec, is_valid_function_name
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
    if not is_valid_function_name(spec.name):
        raise SpecError(
            f"{source}: function name {spec.name!r} must match [a-z0-9][a-z0-9_-]{{0,62}}"
        )
    if ":" not in spec.handler:
        raise SpecError(f"{source}: handler {spec.handler!r} must be 'module:attr'")
    if spec.concurrency < 1 or spec.timeout_ms <= 0 or spec.slo_ms <= 0:
        raise SpecError(f"{source}: concurrency, timeout_ms and slo_ms must be positive")
    names = [t.name for t in spec.inputs]
    if len(set(names)) != len(names):
        raise SpecError(f"{source}: input names must be unique")
    for tensor in [*spec.inputs, *spec.outputs]:
        if any(d < -1 or d == 0 for d in tensor.shape):
            raise SpecError(f"{source}: {tensor.name}: dimensions are positive or -1")
    return spec


def parse_workflow(data: dict[str, Any], *, source: str = "<spec>") -> WorkflowSpec:
    body = data.get("workflow", data)
    try:
        spec = msgspec.convert(body, WorkflowSpec)
        plan_workflow(spec)
    except (msgspec.ValidationError, WorkflowError) as exc:
        raise SpecError(f"{source}: {exc}") from exc
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
    if path.suffix == ".toml":
        data = tomllib.loads(text)
    elif path.suffix in {".yaml", ".yml"}:
        data = yaml.safe_load(text)
    else:
        raise SpecError(f"{path}: spec files are .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a table of fields")
    return data

"""Scaling and sharing keys of a function spec: refused with one clear reason each,
where files are loaded, where the client deploys, and by `gfaas deploy` against the
cluster's devices."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from gfaas import cli
from gfaas.client import Client, memory_of_kind
from shared.natsd import NatsServer
from shared.schema import FunctionKind, FunctionSpec, WorkflowSpec
from shared.spec import (
    SpecError,
    check_fits,
    check_workflow,
    load_spec,
    parse_spec,
    parse_workflow,
)
from tests.helpers import wait_for_worker
from tests.platform import Platform

MB = 1024 * 1024
BASE = {"name": "f", "handler": "m:f"}


def refusal(**keys: Any) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec({**BASE, **keys}, source="f.toml")
    return str(caught.value)


@pytest.mark.unit
def test_scaling_and_sharing_keys_default_to_autoscaled_from_zero() -> None:
    spec = parse_spec(BASE)
    assert (spec.min_instances, spec.max_instances, spec.idle_s) == (0, 0, 300.0)
    assert (spec.sm_share, spec.time_quota) == (0.0, 0.0)
    fixed = parse_spec({**BASE, "min_instances": 2, "sm_share": 1.0, "time_quota": 0.25})
    assert (fixed.min_instances, fixed.sm_share, fixed.time_quota) == (2, 1.0, 0.25)
    # max_instances 0 is no limit, so any minimum is below it.
    assert parse_spec({**BASE, "min_instances": 5}).max_instances == 0


@pytest.mark.unit
@pytest.mark.parametrize("key", ["sm_share", "time_quota"])
@pytest.mark.parametrize("value", [1.5, -0.1, math.nan])
def test_a_share_or_quota_outside_zero_to_one_is_refused(key: str, value: float) -> None:
    assert f"f.toml: {key} ({value}) is a fraction of one device, from 0 to 1" in refusal(
        **{key: value}
    )


@pytest.mark.unit
@pytest.mark.parametrize("key", ["sm_share", "time_quota"])
@pytest.mark.parametrize("value", [0.125, 1 / 3, 0.001])
def test_a_share_or_quota_finer_than_a_percent_is_refused(key: str, value: float) -> None:
    # The packer places whole percents: such a spec once passed the deploy and ended
    # the scheduler at its next tick.
    assert refusal(**{key: value}) == f"f.toml: {key} ({value}) must be a whole percent (0.01 to 1)"
    assert getattr(parse_spec({**BASE, key: 0.15}), key) == 0.15


@pytest.mark.unit
@pytest.mark.parametrize("value", [math.inf, math.nan, 0.0, -5.0])
def test_an_slo_that_is_not_a_positive_number_is_refused(value: float) -> None:
    # inf and nan are valid TOML; the autoscaler divides by the SLO.
    assert "slo_ms must be positive" in refusal(slo_ms=value)


@pytest.mark.unit
@pytest.mark.parametrize("value", [0, -4000])
def test_memory_that_is_not_positive_is_refused(value: int) -> None:
    # Booked on the device and set as the instance's cap: a negative one made room.
    assert refusal(memory_mb=value) == f"f.toml: memory_mb ({value}) must be positive"


@pytest.mark.unit
def test_min_instances_above_max_instances_is_refused() -> None:
    assert refusal(min_instances=3, max_instances=2) == (
        "f.toml: min_instances (3) is above max_instances (2)"
    )
    assert "must not be negative" in refusal(min_instances=-1)
    assert "must not be negative" in refusal(max_instances=-1)


@pytest.mark.unit
@pytest.mark.parametrize("value", [-1.0, math.nan])
def test_a_negative_idle_time_is_refused(value: float) -> None:
    assert refusal(idle_s=value) == f"f.toml: idle_s ({value}) must not be negative"


@pytest.mark.unit
def test_a_spec_file_with_a_bad_share_is_refused_on_load(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text('name = "f"\nhandler = "m:f"\nsm_share = 2.0\n')
    with pytest.raises(SpecError, match=r"f.toml: sm_share \(2.0\)"):
        load_spec(path)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("name", "text", "kind"),
    [
        ("f.yaml", "name: [unclosed\n", "YAML"),
        ("f.yml", '!!python/object:os.system ["true"]\n', "YAML"),
        ("f.toml", "name = \n", "TOML"),
    ],
)
def test_a_spec_file_that_does_not_parse_is_refused_with_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, kind: str
) -> None:
    # A YAMLError is no ValueError: `gfaas spec` and `gfaas deploy` ended in a traceback.
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SpecError, match=f"{name}: not valid {kind}: "):
        load_spec(path)
    assert cli.main(["spec", str(path)]) == 2
    assert f"gfaas: {path}: not valid {kind}: " in capsys.readouterr().err


WORKFLOW = {
    "name": "w",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [-1]}],
    "stages": [{"name": "a", "function": "f", "inputs": {"x": "$in.x"}}],
    "outputs": {"y": "a.y"},
}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("keys", "reason"),
    [
        ({"timeout_ms": 0}, "timeout_ms and slo_ms must be positive"),
        ({"timeout_ms": -5}, "timeout_ms and slo_ms must be positive"),
        ({"slo_ms": math.nan}, "timeout_ms and slo_ms must be positive"),
        ({"slo_ms": -1.0}, "timeout_ms and slo_ms must be positive"),
        ({"inputs": [{"name": "x", "dtype": "float32", "shape": [0]}]}, "x: dimensions are"),
        (
            {"inputs": [{"name": "x", "dtype": "float32", "shape": [1]}] * 2},
            "input names must be unique",
        ),
    ],
)
def test_a_workflow_is_refused_what_a_function_is(keys: dict[str, Any], reason: str) -> None:
    # A workflow's call is admitted as one function's (its timeout the deadline), but
    # its file was checked for structure only: timeout_ms 0 deployed, and every call's
    # deadline was now.
    with pytest.raises(SpecError, match=f"w.toml: {reason}"):
        parse_workflow({**WORKFLOW, **keys}, source="w.toml")
    with pytest.raises(SpecError, match=f"w: {reason}"):
        check_workflow(msgspec.convert({**WORKFLOW, **keys}, WorkflowSpec), source="w")
    assert parse_workflow(WORKFLOW).timeout_ms == 30_000


@pytest.mark.unit
def test_memory_larger_than_every_device_does_not_fit() -> None:
    spec = FunctionSpec(name="big", handler="m:f", memory_mb=2048)
    assert check_fits(spec, [1024 * MB, 2048 * MB]) is None
    assert check_fits(spec, []) is None  # nothing known to check against
    assert check_fits(spec, [1024 * MB, 1536 * MB]) == (
        "big: memory_mb 2048 does not fit any device (the largest has 1536 MB)"
    )


@pytest.mark.unit
def test_a_function_is_checked_against_the_devices_of_its_kind() -> None:
    workers: dict[str, dict[str, Any]] = {
        "g": {"device": "cuda:0", "memory_total": 80 * 1024 * MB},
        "c": {"device": "cpu", "memory_total": 512 * 1024 * MB},
        "old": {"device": "cuda:1"},  # reports no total: left out
    }
    assert memory_of_kind(FunctionKind.GPU, workers) == [80 * 1024 * MB]
    assert memory_of_kind(FunctionKind.CPU, workers) == [512 * 1024 * MB]
    # No GPU worker: a GPU function runs on the CPU workers, so they count.
    cpu_only = {"c": workers["c"]}
    assert memory_of_kind(FunctionKind.GPU, cpu_only) == [512 * 1024 * MB]
    assert memory_of_kind(FunctionKind.GPU, {}) == []


def _write(tmp_path: Path, name: str, memory_mb: int) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'name = "{name}"\nhandler = "tests.funcs:echo"\nmemory_mb = {memory_mb}\n')
    return path


@pytest.mark.nats
def test_gfaas_deploy_refuses_a_function_no_worker_can_hold(
    platform: Platform, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def worker_known() -> None:
        async with Client.connect(platform.url) as client:
            await wait_for_worker(client, "w0")

    anyio.run(worker_known)
    huge = _write(tmp_path, "huge", 1 << 40)  # an exabyte: more than any worker has
    assert cli.main(["deploy", str(huge), "--nats-url", platform.url]) == 2
    assert "huge: memory_mb 1099511627776 does not fit any device" in capsys.readouterr().err
    small = _write(tmp_path, "small", 64)
    assert cli.main(["deploy", str(small), "--nats-url", platform.url]) == 0

    async def deployed() -> list[str]:
        async with Client.connect(platform.url) as client:
            # The client checks specs built in code as the loader checks files.
            with pytest.raises(SpecError, match="sm_share"):
                await client.deploy(FunctionSpec(name="bad", handler="m:f", sm_share=1.5))
            return [s.name for s in await client.functions()]

    assert anyio.run(deployed) == ["small"]


@pytest.mark.nats
def test_gfaas_deploy_without_workers_warns_and_deploys(
    nats_server: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "early", 1 << 40)
    assert cli.main(["deploy", str(path), "--nats-url", nats_server.url]) == 0
    assert "no worker answered; early's memory_mb is unchecked" in capsys.readouterr().err

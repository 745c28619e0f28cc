"""Wire schema, subjects, settings and spec files: no server needed."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest

from shared import subjects
from shared.config import ENV_VARS, nats_servers, settings_from_env
from shared.schema import (
    DEFAULT_TENANT,
    DType,
    ErrorCode,
    FunctionSpec,
    InvocationMeta,
    InvokeReply,
    InvokeRequest,
    Tensor,
    decode,
    encode,
    error_reply,
)
from shared.spec import SpecError, load_spec, parse_spec
from shared.tensors import from_value, to_numpy, to_torch

pytestmark = pytest.mark.unit


def test_request_round_trips_through_messagepack() -> None:
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    req = InvokeRequest(inputs=[from_value("x", x)], invocation_id="abc", timeout_ms=5)
    back = decode(encode(req), InvokeRequest)
    assert back == req
    np.testing.assert_array_equal(to_numpy(back.inputs[0]), x)


def test_plain_msgpack_map_from_any_client_decodes() -> None:
    raw = msgspec.msgpack.encode(
        {"inputs": [{"name": "x", "dtype": "float32", "shape": [2], "data": b"\0" * 8}]}
    )
    req = decode(raw, InvokeRequest)
    assert req.inputs[0].dtype is DType.FLOAT32


def test_unknown_fields_and_bad_dtypes_are_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match="inptus"):
        decode(msgspec.msgpack.encode({"inptus": []}), InvokeRequest)
    bad = {"inputs": [{"name": "x", "dtype": "float99", "shape": [1], "data": b""}]}
    with pytest.raises(msgspec.ValidationError, match="float99"):
        decode(msgspec.msgpack.encode(bad), InvokeRequest)


def test_error_reply_omits_empty_outputs_and_keeps_the_code() -> None:
    reply = error_reply("id1", ErrorCode.UNKNOWN_FUNCTION, "nope")
    raw = msgspec.msgpack.decode(encode(reply))
    assert raw == {"invocation_id": "id1", "error": {"code": "unknown_function", "reason": "nope"}}
    assert decode(encode(reply), InvokeReply).error == reply.error


def test_invocation_meta_round_trips_through_headers() -> None:
    meta = InvocationMeta(invocation_id="i1", function="f", tenant="t1", deadline_ms=123)
    assert InvocationMeta.from_headers(meta.to_headers()) == meta
    assert InvocationMeta.from_headers({}).tenant == DEFAULT_TENANT
    with pytest.raises(ValueError, match="Deadline"):
        InvocationMeta.from_headers({"Gfaas-Deadline-Ms": "soon"})
    pooled = InvocationMeta(invocation_id="i2", function="f", node="n1")
    assert InvocationMeta.from_headers(pooled.to_headers()).node == "n1"


def test_subjects_are_versioned_and_refuse_bad_tokens() -> None:
    assert subjects.invoke("resnet") == "gfaas.v1.invoke.resnet"
    assert subjects.worker_run("w-1") == "gfaas.v1.worker.w-1.run"
    for bad in ("a.b", "a b", "*", ">", ""):
        with pytest.raises(ValueError, match="token"):
            subjects.invoke(bad)


def test_torch_conversion_gives_a_writable_copy() -> None:
    t = Tensor(name="x", dtype=DType.FLOAT32, shape=[2], data=np.ones(2, np.float32).tobytes())
    tensor = to_torch(t)
    tensor += 1  # handlers may write to their inputs
    assert tensor.tolist() == [2.0, 2.0]


def test_a_nats_url_may_list_a_clusters_servers() -> None:
    assert nats_servers("nats://a:1") == ["nats://a:1"]
    assert nats_servers(" nats://a:1, nats://b:2,,nats://c:3 ") == [
        "nats://a:1",
        "nats://b:2",
        "nats://c:3",
    ]
    with pytest.raises(ValueError, match="no NATS server"):
        nats_servers(" , ")
    settings = settings_from_env(
        {"GFAAS_NATS_URL": "nats://a:1,nats://b:2", "GFAAS_JS_REPLICAS": "3"}
    )
    assert (len(nats_servers(settings.nats_url)), settings.js_replicas) == (2, 3)


def test_settings_come_from_the_environment_and_overrides() -> None:
    env = {"GFAAS_NATS_URL": "nats://x:1", "GFAAS_CAPACITY": "7", "GFAAS_HTTP_ENABLED": "false"}
    s = settings_from_env(env, capacity=None, policy="round_robin")
    assert (s.nats_url, s.capacity, s.http_enabled, s.policy) == (
        "nats://x:1",
        7,
        False,
        "round_robin",
    )
    assert "GFAAS_WORKER_TIMEOUT_S" in ENV_VARS
    with pytest.raises(ValueError, match="GFAAS_CAPACITY"):
        settings_from_env({"GFAAS_CAPACITY": "many"})


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        *[("1", True), ("TRUE", True), (" yes ", True), ("on", True)],
        *[("0", False), ("False", False), ("no", False), ("off", False), ("", False)],
    ],
)
def test_a_boolean_setting_reads_the_usual_words(raw: str, value: bool) -> None:
    assert settings_from_env({"GFAAS_NATS_AUTH": raw}).nats_auth is value


@pytest.mark.parametrize("raw", ["ture", "enabled", "2", "y"])
def test_a_boolean_setting_that_is_no_boolean_is_refused(raw: str) -> None:
    # It read as False: a typo in GFAAS_NATS_AUTH turned authentication off unsaid.
    with pytest.raises(ValueError, match=f"GFAAS_NATS_AUTH='{raw}': not a boolean"):
        settings_from_env({"GFAAS_NATS_AUTH": raw})


def test_a_float_setting_that_is_nan_is_refused() -> None:
    assert settings_from_env({"GFAAS_HEARTBEAT_S": "0.25"}).heartbeat_s == 0.25
    with pytest.raises(ValueError, match="GFAAS_HEARTBEAT_S='nan': not a number"):
        settings_from_env({"GFAAS_HEARTBEAT_S": "nan"})


def test_spec_files_load_and_bad_specs_say_why(tmp_path: Path) -> None:
    good = tmp_path / "f.yaml"
    good.write_text("name: f\nhandler: m:f\ninputs: [{name: x, dtype: float32, shape: [-1]}]\n")
    spec = load_spec(good)
    assert isinstance(spec, FunctionSpec)
    assert (spec.name, spec.handler, spec.kind) == ("f", "m:f", "cpu")
    assert (spec.inputs[0].dtype, spec.inputs[0].shape) == (DType.FLOAT32, [-1])
    with pytest.raises(SpecError, match="name"):
        parse_spec({"name": "Bad Name", "handler": "m:f"})
    with pytest.raises(SpecError, match="module:attr"):
        parse_spec({"name": "f", "handler": "nocolon"})
    with pytest.raises(SpecError, match="positive or -1"):
        parse_spec(
            {
                "name": "f",
                "handler": "m:f",
                "inputs": [{"name": "x", "dtype": "int8", "shape": [0]}],
            }
        )
    with pytest.raises(SpecError, match="kind"):
        parse_spec({"name": "f", "handler": "m:f", "kind": "tpu"})


def test_the_cli_and_client_start_without_importing_torch() -> None:
    # Client commands start in well under a second: torch alone costs about one.
    import subprocess
    import sys

    code = "import sys, gfaas.cli, gfaas.client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""Bad input gets a clear error reply (code + reason) promptly; the services keep serving."""

from __future__ import annotations

import time

import anyio
import msgspec
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from shared.errors import REASON_CHARS
from shared.schema import DType, FunctionSpec, TensorSpec
from tests.helpers import body, deploy_and_wait, request
from tests.platform import Platform

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

ECHO = FunctionSpec(
    name="echo",
    handler="tests.funcs:echo",
    inputs=[TensorSpec(name="x", dtype=DType.FLOAT32, shape=[-1, 3])],
)
BOOM = FunctionSpec(name="boom", handler="tests.funcs:boom")
NOT_A_MAPPING = FunctionSpec(name="not-a-mapping", handler="tests.funcs:not_a_mapping")
MISSING_HANDLER = FunctionSpec(name="missing", handler="tests.funcs:no_such_attr")
BIG_OUTPUT = FunctionSpec(name="big-output", handler="tests.funcs:big_output")
EXITS = FunctionSpec(name="exits", handler="tests.funcs:exit_if_negative")
GOOD = np.ones((1, 3), dtype=np.float32)


async def expect_error(nc: NATS, function: str, data: bytes, code: str) -> str:
    started = time.monotonic()
    msg, reply = await request(nc, function, data, timeout=10)
    assert time.monotonic() - started < 5, "an error must come promptly, not as a timeout"
    assert reply.get("error"), reply
    assert reply["error"]["code"] == code, reply
    assert msg.headers is not None
    assert msg.headers["Gfaas-Status"] == "error"
    reason: str = reply["error"]["reason"]
    assert reason
    # ... and the platform still serves the next request.
    _, ok = await request(nc, "echo", body(x=GOOD))
    assert "error" not in ok, ok
    return reason


async def test_unknown_function_gets_an_error_reply(platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, ECHO)
    reason = await expect_error(nc, "nope", body(x=GOOD), "unknown_function")
    assert "nope" in reason


async def test_malformed_messagepack_gets_an_error_reply(platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, ECHO)
    reason = await expect_error(nc, "echo", b"\xc1\xff not msgpack", "bad_request")
    assert "malformed" in reason


async def test_unknown_request_field_is_refused(platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, ECHO)
    data = msgspec.msgpack.encode({"inptus": []})
    reason = await expect_error(nc, "echo", data, "bad_request")
    assert "inptus" in reason


async def test_wrong_dtype_gets_an_error_reply(platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, ECHO)
    reason = await expect_error(nc, "echo", body(x=GOOD.astype(np.float64)), "invalid_input")
    assert "float64" in reason
    assert "float32" in reason


async def test_wrong_shape_gets_an_error_reply(platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, ECHO)
    reason = await expect_error(nc, "echo", body(x=np.ones((1, 4), np.float32)), "invalid_input")
    assert "[-1, 3]" in reason


async def test_data_length_not_matching_shape_is_refused(platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, ECHO)
    data = msgspec.msgpack.encode(
        {"inputs": [{"name": "x", "dtype": "float32", "shape": [1, 3], "data": b"\x00" * 5}]}
    )
    await expect_error(nc, "echo", data, "invalid_input")


async def test_payload_over_the_configured_maximum_is_refused(
    nats_server: object, nc: NATS, tmp_path: object
) -> None:
    from pathlib import Path

    from tests.platform import platform_at

    assert isinstance(tmp_path, Path)
    with platform_at(nc.connected_url.geturl(), tmp_path / "s", max_payload=64 * 1024):  # type: ignore[union-attr]
        await deploy_and_wait(nc, ECHO)
        big = np.zeros((10_000, 3), dtype=np.float32)  # 120 KB > 64 KiB
        reason = await expect_error(nc, "echo", body(x=big), "payload_too_large")
        assert "65536" in reason


async def test_handler_that_raises_gets_an_error_reply(platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, ECHO, BOOM)
    reason = await expect_error(nc, "boom", body(x=GOOD), "handler_error")
    assert "ValueError" in reason
    assert "on purpose" in reason


async def test_a_handlers_huge_multi_line_exception_is_one_clipped_line(
    platform: Platform, nc: NATS
) -> None:
    # The reason quoted the handler's exception whole: 100 KB over a thousand lines
    # went into the caller's reply, the failure record and the worker's log.
    await deploy_and_wait(nc, ECHO, FunctionSpec(name="page", handler="tests.funcs:boom_a_page"))
    reason = await expect_error(nc, "page", body(x=GOOD), "handler_error")
    assert "\n" not in reason, reason[:1000]
    assert len(reason) < REASON_CHARS + 100, len(reason)
    assert reason.startswith("page raised RuntimeError: first line x"), reason
    assert reason.endswith("characters cut)"), reason


async def test_handler_calling_sys_exit_gets_an_error_reply_and_the_worker_lives(
    platform: Platform, nc: NATS
) -> None:
    await deploy_and_wait(nc, ECHO, EXITS)
    # First on a thread (its timing is unknown yet), then, once it is known to be
    # quick, inline on the worker's event loop: neither may take the worker down.
    for _ in range(2):
        reason = await expect_error(nc, "exits", body(x=-GOOD), "handler_error")
        assert "SystemExit" in reason
        assert "sys.exit" in reason
        for _ in range(3):
            _, ok = await request(nc, "exits", body(x=GOOD))
            assert "error" not in ok, ok


async def test_handler_returning_garbage_gets_an_error_reply(platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, ECHO, NOT_A_MAPPING)
    reason = await expect_error(nc, "not-a-mapping", body(x=GOOD), "handler_error")
    assert "mapping" in reason


async def test_handler_that_cannot_be_imported_gets_an_error_reply(
    platform: Platform, nc: NATS
) -> None:
    # Deploy refuses it (tests/test_deploy_checks.py): unchecked, it fails at the call.
    await deploy_and_wait(nc, ECHO, MISSING_HANDLER, handler_check=False)
    reason = await expect_error(nc, "missing", body(x=GOOD), "handler_error")
    assert "no_such_attr" in reason


async def test_output_over_the_bus_limit_becomes_an_error(platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, ECHO, BIG_OUTPUT)
    reason = await expect_error(nc, "big-output", body(x=GOOD), "payload_too_large")
    assert "by handle" in reason


X = [TensorSpec(name="x", dtype=DType.FLOAT32, shape=[-1, 3])]
Y = TensorSpec(name="y", dtype=DType.FLOAT32, shape=[-1, 3])
# Each returns outputs that disagree with what it declares (what OIP metadata shows).
DISAGREEING = {
    "declares-int64": (
        FunctionSpec(
            name="declares-int64",
            handler="tests.funcs:echo",
            inputs=X,
            outputs=[TensorSpec(name="y", dtype=DType.INT64, shape=[-1, 3])],
        ),
        ["'y'", "float32[1, 3]", "declared int64[-1, 3]"],
    ),
    "declares-4-wide": (
        FunctionSpec(
            name="declares-4-wide",
            handler="tests.funcs:echo",
            inputs=X,
            outputs=[TensorSpec(name="y", dtype=DType.FLOAT32, shape=[-1, 4])],
        ),
        ["'y'", "shape [1, 3]", "expected [-1, 4]"],
    ),
    "declares-rank-1": (
        FunctionSpec(
            name="declares-rank-1",
            handler="tests.funcs:echo",
            inputs=X,
            outputs=[TensorSpec(name="y", dtype=DType.FLOAT32, shape=[-1])],
        ),
        ["'y'", "rank 2", "expected [-1]"],
    ),
    "declares-z-too": (
        FunctionSpec(
            name="declares-z-too",
            handler="tests.funcs:echo",
            inputs=X,
            outputs=[Y, TensorSpec(name="z", dtype=DType.FLOAT32, shape=[-1, 3])],
        ),
        ["declares output 'z' but did not produce it (it produced: y)"],
    ),
    "declares-y-only": (
        FunctionSpec(
            name="declares-y-only",
            handler="tests.funcs:echo_and_more",
            inputs=X,
            outputs=[Y],
        ),
        ["['extra']", "does not declare"],
    ),
}


async def test_outputs_that_disagree_with_the_declared_ones_are_a_handler_error(
    platform: Platform, nc: NATS
) -> None:
    # A wrong dtype, a wrong size or rank, a declared output missing, an undeclared
    # one returned: each named in the reason, never answered as it came back.
    await deploy_and_wait(nc, ECHO, *(spec for spec, _ in DISAGREEING.values()))
    for name, (_, words) in DISAGREEING.items():
        reason = await expect_error(nc, name, body(x=GOOD), "handler_error")
        assert name in reason
        for word in words:
            assert word in reason, (name, reason)
    # A spec that declares no outputs still lets its handler return any (echo's `y`),
    # and one whose outputs agree is answered as before.
    loose = FunctionSpec(name="declares-none", handler="tests.funcs:echo_and_more", inputs=X)
    ok_too = FunctionSpec(name="declares-right", handler="tests.funcs:echo", inputs=X, outputs=[Y])
    await deploy_and_wait(nc, loose, ok_too)
    _, reply = await request(nc, "declares-none", body(x=GOOD))
    assert sorted(t["name"] for t in reply["outputs"]) == ["extra", "y"], reply
    _, reply = await request(nc, "declares-right", body(x=GOOD))
    assert [(t["name"], t["dtype"], t["shape"]) for t in reply["outputs"]] == [
        ("y", "float32", [1, 3])
    ], reply


async def _register_with_an_unpushed_model(nc: NATS) -> None:
    from gfaas.client import Client

    spec = FunctionSpec(name="scale", handler="tests.funcs:Scale", model="not-pushed")
    # `deploy` refuses it now (test_deploy_checks.py); a spec registered around it (an
    # older client, a model deleted since) must still get a clear error at its call.
    await (await Client(nc).registry()).put(spec)
    await deploy_and_wait(nc, ECHO)
    with anyio.fail_after(5):  # ingress's registry watch sees it too
        while "scale" not in (await Client(nc).status("ingress")).details["functions"]:
            await anyio.sleep(0.02)


async def test_model_missing_from_the_store_gets_an_error_reply(
    platform: Platform, nc: NATS
) -> None:
    await _register_with_an_unpushed_model(nc)
    reason = await expect_error(nc, "scale", body(x=GOOD), "model_unavailable")
    assert "not-pushed" in reason


async def test_model_missing_from_the_store_is_unavailable_on_both_oip_fronts(
    platform: Platform, nc: NATS
) -> None:
    # Not the caller's fault, and retried as such by the async path: 503 / UNAVAILABLE
    # (what clients retry on), not 500 / INTERNAL (a bug in gfaas).
    import grpc
    import httpx
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    await _register_with_an_unpushed_model(nc)
    x = {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}
    url = f"http://127.0.0.1:{platform.http_port}/v2/models/scale/infer"
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(url, json={"inputs": [x]})
    assert r.status_code == 503, r.text
    assert r.json()["error"].startswith("model_unavailable: ")

    request = service_pb2.ModelInferRequest(model_name="scale")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{platform.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ModelInfer(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
    assert "model_unavailable" in (refused.value.details() or "")


async def test_a_handler_refusing_its_inputs_gets_invalid_input_not_a_handler_error(
    platform: Platform, nc: NATS
) -> None:
    from pathlib import Path

    from shared.spec import load_spec

    topk = load_spec(Path(__file__).resolve().parent.parent / "examples/vision/topk.toml")
    await deploy_and_wait(nc, topk)
    _, reply = await request(nc, "topk", body(logits=np.zeros((1, 3), np.float32)))
    assert reply["error"]["code"] == "invalid_input", reply
    assert "at least 5" in reply["error"]["reason"]
    _, ok = await request(nc, "topk", body(logits=np.arange(8, dtype=np.float32)[None]))
    assert "error" not in ok, ok

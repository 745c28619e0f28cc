"""The sync path over real NATS, exactly as a user with plain nats-py would call it."""

from __future__ import annotations

import numpy as np
import pytest
from nats.aio.client import Client as NATS

from gfaas.client import Client
from shared.schema import DType, FunctionSpec, TensorSpec
from tests.helpers import body, deploy_and_wait, request
from tests.platform import Platform

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

ECHO = FunctionSpec(
    name="echo",
    handler="tests.funcs:echo",
    inputs=[TensorSpec(name="x", dtype=DType.FLOAT32, shape=[-1, 3])],
    outputs=[TensorSpec(name="y", dtype=DType.FLOAT32, shape=[-1, 3])],
)


async def test_plain_nats_request_gets_the_function_output(platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, ECHO)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    msg, reply = await request(nc, "echo", body(x=x))
    assert "error" not in reply, reply
    out = reply["outputs"][0]
    assert out["name"] == "y"
    assert out["shape"] == [2, 3]
    np.testing.assert_array_equal(np.frombuffer(out["data"], np.float32).reshape(2, 3), x)
    assert msg.headers is not None
    assert msg.headers["Gfaas-Status"] == "ok"
    assert reply["invocation_id"] == msg.headers["Gfaas-Invocation-Id"]


async def test_caller_chosen_invocation_id_comes_back(platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, ECHO)
    x = np.ones((1, 3), dtype=np.float32)
    msg = await nc.request(
        "gfaas.v1.invoke.echo", body(x=x), timeout=5, headers={"Gfaas-Invocation-Id": "my-id-1"}
    )
    assert msg.headers is not None
    assert msg.headers["Gfaas-Invocation-Id"] == "my-id-1"


async def test_client_invoke_returns_numpy_outputs(platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, ECHO)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    out = await Client(nc).invoke("echo", {"x": x})
    np.testing.assert_array_equal(out["y"], x)


async def test_concurrent_invocations_all_complete(platform: Platform, nc: NATS) -> None:
    import anyio

    add_one = FunctionSpec(name="add-one", handler="tests.funcs:add_one", concurrency=4)
    await deploy_and_wait(nc, add_one)
    client = Client(nc)
    results: dict[int, float] = {}

    async def call(i: int) -> None:
        out = await client.invoke("add-one", {"x": np.array([i], dtype=np.float64)})
        results[i] = float(out["y"][0])

    async with anyio.create_task_group() as tg:
        for i in range(100):
            tg.start_soon(call, i)
    assert results == {i: i + 1.0 for i in range(100)}

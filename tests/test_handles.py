"""Tensors by handle through the live platform: the broker's leases, workers mapping
pooled buffers, outputs by handle, and every way a handle can be bad."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np
import pytest
import torch
from nats.aio.client import Client as NATS

from gfaas.client import Client, outputs_of
from services.memory_broker.app import serve as serve_broker
from shared import subjects
from shared.dataplane.client import BrokerClient, open_tensor
from shared.errors import GfaasError
from shared.natsd import NatsServer
from shared.schema import (
    CopyRequest,
    DType,
    FunctionSpec,
    Handle,
    OutputMode,
    Tensor,
    TensorSpec,
)
from tests.helpers import deploy_and_wait, wait_for_worker
from tests.platform import Platform, doomed_platform, platform_at, settings_for
from tests.specs import ECHO

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

N = 1024
DOUBLE = FunctionSpec(
    name="double",
    handler="tests.funcs:double",
    inputs=[TensorSpec(name="x", dtype=DType.FLOAT32, shape=[N])],
    outputs=[TensorSpec(name="y", dtype=DType.FLOAT32, shape=[N])],
)
BIG = FunctionSpec(name="big", handler="tests.funcs:big_output")
HOLD = FunctionSpec(
    name="hold",
    handler="tests.funcs:hold",
    outputs=[TensorSpec(name="y", dtype=DType.FLOAT32, shape=[256])],
)


async def broker_details(client: Client) -> dict[str, Any]:
    return (await client.status("memory-broker")).details


async def wait_leases(client: Client, count: int, timeout: float = 10.0) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while True:
            details = await broker_details(client)
            if details["leases"] == count:
                return details
            await anyio.sleep(0.05)


async def test_input_by_handle_is_read_in_place_and_outputs_come_back_by_handle(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await deploy_and_wait(nc, DOUBLE)
    x = np.arange(N, dtype=np.float32)
    arg = await client.put("x", x)
    assert arg.handle is not None
    assert arg.data == b""
    reply = await client.invoke_reply("double", [arg], outputs_by=OutputMode.HANDLE)
    (out,) = reply.outputs
    assert out.handle is not None
    assert out.data == b""
    np.testing.assert_array_equal(outputs_of(reply)["y"], x * 2)
    # The worker had the broker check the input and take the worker's reference on it
    # while the handler ran, in the trip that leased the output buffer anyway.
    checks = (await client.status("gpu-worker")).details["handle_checks"]
    assert checks == {"local": 0, "remote": 1}
    # The input's lease and the output's (now held by this client) are live.
    assert (await broker_details(client))["leases"] == 2
    await client.release([arg, *reply.outputs])
    await wait_leases(client, 0)


async def test_put_of_a_value_without_a_wire_dtype_is_refused_and_leases_nothing(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await wait_leases(client, 0)
    for value in (torch.zeros(8, dtype=torch.bfloat16), np.zeros(2, dtype=object)):
        with pytest.raises(GfaasError) as info:
            await client.put("w", value)
        assert info.value.code == "bad_request", info.value
        assert "put 'w': unsupported dtype" in info.value.reason
    # Refused before the lease: nothing was taken from the pool.
    await anyio.sleep(0.2)
    assert (await broker_details(client))["leases"] == 0
    arg = await client.put("x", np.ones(4, np.float32))
    assert (await broker_details(client))["leases"] == 1
    await client.release([arg])
    # The same values given to a call: the caller's mistake too, not a handler's.
    for value in (torch.zeros(8, dtype=torch.bfloat16), np.zeros(2, dtype=object)):
        with pytest.raises(GfaasError) as info:
            await client.invoke("echo", {"x": value}, timeout=10)
        assert info.value.code == "bad_request", info.value
        assert "input 'x': unsupported dtype" in info.value.reason
    await wait_leases(client, 0)


async def test_by_value_and_by_handle_give_the_same_result(platform: Platform, nc: NATS) -> None:
    client = Client(nc)
    await deploy_and_wait(nc, DOUBLE, ECHO)
    x = np.linspace(-1, 1, N, dtype=np.float32)
    by_value = await client.invoke_reply("double", {"x": x})
    by_handle = await client.invoke_reply("double", {"x": x}, outputs_by=OutputMode.HANDLE)
    # The reply really carries a handle, not the bytes, and they read the same.
    assert by_value.outputs[0].handle is None
    (pooled,) = by_handle.outputs
    assert pooled.handle is not None
    assert not pooled.data
    assert pooled.handle.nbytes == x.nbytes
    np.testing.assert_array_equal(outputs_of(by_value)["y"], outputs_of(by_handle)["y"])
    await client.release(by_handle.outputs)
    # A function whose output shape is open (echo) leases after it ran.
    echoed = await client.invoke_reply("echo", {"x": x}, outputs_by=OutputMode.HANDLE)
    assert echoed.outputs[0].handle is not None
    np.testing.assert_array_equal(outputs_of(echoed)["y"], x)
    await client.release(echoed.outputs)
    await wait_leases(client, 0)


async def test_output_over_the_bus_limit_goes_by_handle_in_auto_mode(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await deploy_and_wait(nc, BIG)
    with pytest.raises(GfaasError) as info:
        await client.invoke("big", {})
    assert info.value.code == "payload_too_large"
    reply = await client.invoke_reply("big", {}, outputs_by=OutputMode.AUTO)
    assert reply.error is None
    (out,) = reply.outputs
    assert out.handle is not None
    assert out.handle.nbytes == 4 * 1024 * 1024
    assert not outputs_of(reply)["y"].any()
    await client.release(reply.outputs)
    await wait_leases(client, 0)


def forged(handle: Handle, **changes: Any) -> Tensor:
    return Tensor(
        name="x",
        dtype=DType.FLOAT32,
        shape=[N],
        handle=msgspec.structs.replace(handle, **changes),
    )


async def test_bad_handles_are_refused_with_reasons_and_the_platform_keeps_serving(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc, tenant="acme")
    await deploy_and_wait(nc, DOUBLE)
    x = np.ones(N, np.float32)
    good = await client.put("x", x)
    assert good.handle is not None
    h = good.handle

    async def refused(arg: Tensor, tenant: str = "acme") -> tuple[str, str]:
        caller = Client(nc, tenant=tenant)
        with pytest.raises(GfaasError) as info:
            await caller.invoke("double", [arg])
        return info.value.code, info.value.reason

    code, reason = await refused(forged(h, generation=h.generation + 1))
    assert code == "not_found"
    assert "generation" in reason
    # Another tenant hears only that there is no such lease (docs/security.md).
    code, reason = await refused(good, tenant="mallory")
    assert code == "not_found"
    assert f"no lease {h.lease_id} for tenant 'mallory'" in reason
    code, reason = await refused(forged(h, tenant="mallory"), tenant="mallory")
    assert code == "not_found"
    assert f"no lease {h.lease_id} for tenant 'mallory'" in reason
    code, reason = await refused(forged(h, offset=h.offset + 64 * 1024 * 1024))
    assert code == "bad_request"
    assert "outside" in reason
    code, reason = await refused(forged(h, lease_id="nope.1"))
    assert code == "not_found"
    code, reason = await refused(forged(h, pool="elsewhere"))
    assert code == "invalid_input"
    assert "no memory broker is running on node 'elsewhere'" in reason
    code, reason = await refused(forged(h, nbytes=h.nbytes - 4))
    assert code == "invalid_input"
    # Released: the same handle is now stale.
    await client.release([good])
    code, reason = await refused(good)
    assert code == "not_found"
    assert "released" in reason
    # Through all of that, nothing leaked and the platform serves the next request.
    await wait_leases(client, 0)
    np.testing.assert_array_equal((await client.invoke("double", {"x": x}))["y"], x * 2)


async def test_an_input_handle_naming_no_node_is_a_bad_request(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await deploy_and_wait(nc, DOUBLE)
    x = np.ones(N, np.float32)
    good = await client.put("x", x)
    assert good.handle is not None
    for pool in ("bad.pool", "a*"):
        with pytest.raises(GfaasError) as refused:
            await client.invoke("double", [forged(good.handle, pool=pool)])
        assert refused.value.code == "bad_request", refused.value
        assert f"pool {pool!r} is not a node name" in refused.value.reason
    await client.release([good])
    await wait_leases(client, 0)


async def test_lease_requests_beyond_the_pool_are_refused(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    with platform_at(nats_server.url, tmp_path / "s", pool_cap_mb=8, slab_mb=4):
        client = Client(nc)
        broker = BrokerClient(nc, "local")
        with pytest.raises(GfaasError) as info:
            await broker.lease([16 * 1024 * 1024], owner="t")
        assert info.value.code == "payload_too_large"
        held = await broker.lease([4 * 1024 * 1024, 4 * 1024 * 1024], owner="t")
        with pytest.raises(GfaasError) as info:
            await broker.lease([1024], owner="t")
        assert info.value.code == "overloaded"
        assert "exhausted" in info.value.reason
        # A batch that cannot be served takes nothing.
        await broker.release(held[:1], "t", "default")
        with pytest.raises(GfaasError):
            await broker.lease([1024, 8 * 1024 * 1024], owner="t")
        assert (await broker_details(client))["leases"] == 1
        # A malformed request gets a reason, not silence.
        msg = await nc.request(subjects.broker("local", "lease"), b"\xc1junk", timeout=2)
        assert b"bad_request" in msg.data
        msg = await nc.request(subjects.broker("local", "frobnicate"), b"", timeout=2)
        assert b"unknown broker operation" in msg.data
        await broker.release(held[1:], "t", "default")
        await wait_leases(client, 0)


async def test_undeclared_outputs_are_a_handler_error_and_the_prepared_buffer_goes_back(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    # The spec fixes `ids` (leased before the run); whoami returns four outputs more,
    # which the spec does not declare: the run fails before any of them is leased.
    whoami = FunctionSpec(
        name="whoami",
        handler="tests.funcs:whoami",
        outputs=[TensorSpec(name="ids", dtype=DType.INT64, shape=[3])],
    )
    with platform_at(nats_server.url, tmp_path / "s", tenant_max_leases=3):
        await deploy_and_wait(nc, whoami)
        client = Client(nc, tenant="t1")
        path = np.frombuffer(b"/etc/hostname", np.uint8).copy()
        with pytest.raises(GfaasError) as info:
            await client.invoke("whoami", {"path": path}, outputs_by=OutputMode.HANDLE)
        assert info.value.code == "handler_error", info.value
        assert "does not declare" in info.value.reason
        # The prepared `ids` buffer went back with the failed run: nothing is held, and
        # the tenant has its whole quota again.
        await wait_leases(client, 0, timeout=3.0)
        held = [await client.put("z", np.zeros(4, np.float32)) for _ in range(3)]
        await client.release(held)
        await wait_leases(client, 0)


async def test_outputs_by_handle_that_disagree_with_the_spec_are_a_handler_error(
    platform: Platform, nc: NATS
) -> None:
    # `y` is declared float32[N]: the worker prepares that buffer before the run. An
    # int32[N] has its size exactly, yet is not what the model's metadata says; nor is
    # a float32 of another shape (leased after the run, were it not refused first).
    wrong_dtype = FunctionSpec(
        name="as-int32",
        handler="tests.funcs:as_int32",
        inputs=DOUBLE.inputs,
        outputs=DOUBLE.outputs,
    )
    wrong_shape = FunctionSpec(
        name="echo-fixed",
        handler="tests.funcs:echo",
        inputs=[TensorSpec(name="x", dtype=DType.FLOAT32, shape=[-1])],
        outputs=DOUBLE.outputs,
    )
    await deploy_and_wait(nc, wrong_dtype, wrong_shape)
    client = Client(nc)
    x = np.arange(N, dtype=np.float32)
    for mode in (OutputMode.HANDLE, OutputMode.AUTO):
        with pytest.raises(GfaasError) as info:
            await client.invoke("as-int32", {"x": x}, outputs_by=mode)
        assert info.value.code == "handler_error", info.value
        assert "'y'" in info.value.reason
        assert "int32" in info.value.reason
        assert "declared float32" in info.value.reason
        with pytest.raises(GfaasError) as info:
            await client.invoke("echo-fixed", {"x": x[:8]}, outputs_by=mode)
        assert info.value.code == "handler_error", info.value
        assert "shape [8]" in info.value.reason
        assert f"[{N}]" in info.value.reason
    await wait_leases(client, 0, timeout=3.0)
    # Outputs that agree still come back by handle.
    outputs = await client.invoke("echo-fixed", {"x": x}, outputs_by=OutputMode.HANDLE)
    np.testing.assert_array_equal(outputs["y"], x)


async def test_a_scalar_output_keeps_its_declared_shape_by_value_and_by_handle(
    platform: Platform, nc: NATS
) -> None:
    # A 0-d numpy output is shape [], as declared (and as a 0-d torch tensor is), not
    # [1]: which the check against the declared outputs would refuse.
    total = FunctionSpec(
        name="total",
        handler="tests.funcs:numpy_total",
        outputs=[TensorSpec(name="y", dtype=DType.FLOAT32, shape=[])],
    )
    await deploy_and_wait(nc, total)
    client = Client(nc)
    x = np.arange(4, dtype=np.float32)
    for mode in (OutputMode.VALUE, OutputMode.HANDLE):
        reply = await client.invoke_reply("total", {"x": x}, outputs_by=mode)
        (y,) = reply.outputs
        assert y.shape == [], y
        assert outputs_of(reply)["y"] == 6.0
        await client.release(reply.outputs)
    await wait_leases(client, 0, timeout=3.0)


async def test_a_dead_workers_leases_are_reclaimed(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    with doomed_platform(nats_server.url, tmp_path) as (_, proc):
        client = Client(nc)
        await deploy_and_wait(nc, HOLD)
        await wait_for_worker(client, "doomed")
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with pytest.raises(GfaasError) as info:
                    await client.invoke(
                        "hold",
                        {"seconds": np.array(30.0)},
                        outputs_by=OutputMode.HANDLE,
                        timeout=20,
                    )
                assert info.value.code == "worker_lost"

            tg.start_soon(call)
            # The worker leased its output buffer before running the handler.
            await wait_leases(client, 1)
            proc.send_signal(signal.SIGKILL)
        details = await wait_leases(client, 0)
        assert details["reclaimed"] == 1


async def test_broker_copies_through_the_link_scheduler_and_accounts_for_it(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    broker = BrokerClient(nc, "local")
    x = np.arange(3 * 1024 * 1024, dtype=np.float32)  # 12 MiB: several 2 MiB chunks
    source = await client.put("x", x)
    assert source.handle is not None
    request = CopyRequest(source=source.handle, device="cpu", owner="t", flow="fn-a")
    copy = await broker.copy(request, "default")
    assert copy.lease_id != source.handle.lease_id
    view = open_tensor(Tensor(name="x", dtype=DType.FLOAT32, shape=list(x.shape), handle=copy))
    np.testing.assert_array_equal(view.numpy(), x)
    link = (await broker_details(client))["links"]["cpu->cpu"]
    assert link["bytes"] == x.nbytes
    assert link["bytes_by_flow"] == {"fn-a": x.nbytes}
    with pytest.raises(GfaasError) as info:
        await broker.copy(request, "mallory")
    assert info.value.code == "not_found"  # another tenant's lease: "no lease"
    await broker.release([copy], "t", "default")
    await client.release([source])
    await wait_leases(client, 0)


async def test_inputs_over_the_bus_limit_go_by_handle_from_a_client_on_the_node(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await deploy_and_wait(nc, ECHO)
    x = np.random.default_rng(0).standard_normal(1024 * 1024).astype(np.float32)  # 4 MiB
    out = await client.invoke("echo", {"x": x}, outputs_by=OutputMode.AUTO)
    np.testing.assert_array_equal(out["y"], x)
    await wait_leases(client, 0)


async def test_a_handle_from_another_node_is_read_in_chunks_from_that_nodes_broker(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    with platform_at(nats_server.url, tmp_path / "s") as p:
        # A second node's broker: its pool cannot be mapped by the worker's node in
        # production; here both are on one machine, and the node name decides.
        p.start("broker-b", serve_broker, settings_for(nats_server.url, tmp_path / "b", node="b"))
        on_b = Client(nc, node="b")
        await deploy_and_wait(nc, ECHO)
        x = np.random.default_rng(1).standard_normal(512 * 1024).astype(np.float32)  # 2 MiB
        arg = await on_b.put("x", x)
        assert arg.handle is not None
        assert arg.handle.pool == "b"
        out = await on_b.invoke("echo", [arg], outputs_by=OutputMode.AUTO)
        np.testing.assert_array_equal(out["y"], x)
        assert (await on_b.status("gpu-worker")).details["remote_reads"] == 1
        # Another tenant is refused by the owning node's broker: no such lease for it.
        with pytest.raises(GfaasError) as info:
            await Client(nc, tenant="mallory", node="b").invoke("echo", [arg])
        assert info.value.code == "not_found"
        assert "for tenant 'mallory'" in info.value.reason
        await on_b.release([arg])


async def test_a_parked_lease_is_read_by_nobody_until_its_holder_unparks_it(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    broker = BrokerClient(nc, "local")
    (h,) = await broker.lease([4096], owner="run", tenant="default")
    await broker.check([h], "default")
    await broker.park([h], "run", "default", next_use_s=2.5)
    with pytest.raises(GfaasError) as parked:
        await broker.check([h], "default")
    assert "parked" in parked.value.reason
    with pytest.raises(GfaasError) as stranger:
        await broker.unpark([h], "stranger", "default")
    assert stranger.value.code == "bad_request"
    assert "holds no reference" in stranger.value.reason
    with pytest.raises(GfaasError) as foreign:
        await broker.park([h], "run", "mallory")
    assert foreign.value.code == "not_found"
    assert (await broker_details(client))["parked"] == 1
    (back,) = await broker.unpark([h], "run", "default")
    assert back.lease_id == h.lease_id
    await broker.check([back], "default")
    await broker.release([h], "run", "default")  # the handle from before works for this
    await wait_leases(client, 0)


async def test_references_of_an_ingress_that_falls_silent_are_reclaimed(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    broker = BrokerClient(nc, "local")
    # As an ingress does: its own references, and a workflow run's under its name.
    await nc.publish("gfaas.v1.alive.ingress-gone", b"")
    (_own, run) = await broker.lease([4096, 4096], owner="ingress-gone", tenant="default")
    await broker.transfer([run], "ingress-gone", "ingress-gone/wf-1", "default")
    (kept,) = await broker.lease([4096], owner="ingress-gone", tenant="default")
    await broker.retain([kept], "someone-else", "default")
    assert (await broker_details(client))["leases"] == 3
    details = await wait_leases(client, 1, timeout=5)  # worker_timeout_s is 1 s here
    assert details["reclaimed"] == 2
    await broker.release([kept], "someone-else", "default")
    await wait_leases(client, 0)


async def test_inputs_moved_into_the_pool_are_released_when_the_request_is_still_too_large(
    platform: Platform, nc: NATS
) -> None:
    # The large input moves into the pool, yet the small ones (each under the
    # by-handle size, so they stay by value) still fill more than one message: the
    # call is refused before it is sent, and what it leased must not stay behind.
    client = Client(nc)
    small = {f"s{i}": np.zeros(60 * 1024 // 4, np.float32) for i in range(20)}
    inputs = {"big": np.zeros(512 * 1024, np.float32), **small}
    with pytest.raises(GfaasError) as info:
        await client.invoke("echo", inputs)
    assert info.value.code == "payload_too_large"
    await wait_leases(client, 0, timeout=2.0)

"""gRPC (Open Inference Protocol, `inference.GRPCInferenceService`) against the running
platform, through the unmodified Triton gRPC client and its generated stubs."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import anyio
import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from services.ingress import grpc_codec
from shared.errors import GfaasError
from shared.natsd import NatsServer
from shared.schema import DType, ErrorCode, FunctionSpec, Tensor, TensorSpec
from shared.tensors import validate_inputs
from tests.helpers import deploy_and_wait
from tests.platform import Platform, platform_at

pytestmark = pytest.mark.nats

ADD_ONE = FunctionSpec(
    name="add-one",
    handler="tests.funcs:add_one",
    inputs=[TensorSpec(name="x", dtype=DType.FLOAT32, shape=[-1, 3])],
    outputs=[TensorSpec(name="y", dtype=DType.FLOAT32, shape=[-1, 3])],
)
BOOM = FunctionSpec(name="boom", handler="tests.funcs:boom")


async def _deploy(url: str, *specs: FunctionSpec) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        await deploy_and_wait(nc, *specs)
    finally:
        await nc.drain()


def connected_client(platform: Platform, *specs: FunctionSpec) -> triton.InferenceServerClient:
    """A Triton gRPC client once ingress serves `specs` (default: add-one)."""
    anyio.run(_deploy, platform.url, *(specs or (ADD_ONE,)))
    client = triton.InferenceServerClient(url=f"127.0.0.1:{platform.grpc_port}")
    deadline = time.monotonic() + 10
    while True:
        try:
            if client.is_server_ready():
                return client
        except InferenceServerException:
            pass
        assert time.monotonic() < deadline, "the gRPC front never became ready"
        time.sleep(0.05)


def test_triton_grpc_client_works_unchanged(platform: Platform) -> None:
    client = connected_client(platform)
    try:
        assert client.is_server_live()
        assert client.is_model_ready("add-one")
        assert not client.is_model_ready("nope")
        server = client.get_server_metadata(as_json=True)
        assert server["name"] == "gfaas"
        assert "system_shared_memory" in server["extensions"]
        meta = client.get_model_metadata("add-one", as_json=True)
        assert meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "3"]}]
        index = client.get_model_repository_index(as_json=True)["models"]
        assert {"name": "add-one", "version": "1", "state": "READY"} in index

        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        inp = triton.InferInput("x", [2, 3], "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("add-one", [inp], outputs=[triton.InferRequestedOutput("y")])
        np.testing.assert_array_equal(result.as_numpy("y"), x + 1)
        # Without outputs named: every output the function produces.
        np.testing.assert_array_equal(client.infer("add-one", [inp]).as_numpy("y"), x + 1)

        stats = client.get_inference_statistics("add-one", as_json=True)
        (model,) = stats["model_stats"]
        assert model["inference_stats"]["success"]["count"] == "2"
        config = client.get_model_config("add-one", as_json=True)["config"]
        assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": ["-1", "3"]}]
    finally:
        client.close()


def test_grpc_errors_map_to_status_codes(platform: Platform) -> None:
    client = connected_client(platform, ADD_ONE, BOOM)
    x = np.ones((1, 3), dtype=np.float32)
    inp = triton.InferInput("x", [1, 3], "FP32")
    inp.set_data_from_numpy(x)
    try:
        with pytest.raises(InferenceServerException, match="'nope'") as unknown:
            client.infer("nope", [inp])
        assert unknown.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException, match="'nope'"):
            client.get_model_metadata("nope")

        wrong = triton.InferInput("x", [1, 3], "FP64")
        wrong.set_data_from_numpy(x.astype(np.float64))
        with pytest.raises(InferenceServerException, match="invalid_input") as invalid:
            client.infer("add-one", [wrong])
        assert invalid.value.status() == "StatusCode.INVALID_ARGUMENT"

        short = triton.InferInput("x", [2, 3], "FP32")
        short._raw_content = x.tobytes()  # 12 bytes for a [2, 3] FP32 tensor
        with pytest.raises(InferenceServerException, match="do not match") as bad:
            client.infer("add-one", [short])
        assert bad.value.status() == "StatusCode.INVALID_ARGUMENT"

        with pytest.raises(InferenceServerException, match="handler_error") as failed:
            client.infer("boom", [inp])
        assert failed.value.status() == "StatusCode.INTERNAL"
    finally:
        client.close()


def test_typed_contents_are_read_as_raw_ones_are(platform: Platform) -> None:
    connected_client(platform).close()
    request = service_pb2.ModelInferRequest(model_name="add-one", id="typed")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    with grpc.insecure_channel(f"127.0.0.1:{platform.grpc_port}") as channel:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert reply.id == "typed"
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [("y", "FP32", [1, 3])]
    np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], "<f4"), [2, 3, 4])


ECHO_ANY = FunctionSpec(
    name="echo-any",
    handler="tests.funcs:echo",
    inputs=[TensorSpec(name="x", dtype=DType.FLOAT32, shape=[-1, -1])],
    outputs=[TensorSpec(name="y", dtype=DType.FLOAT32, shape=[-1, -1])],
)


@pytest.mark.parametrize("shape", [[0, 2**63 - 1], [0, 2**61], [2**61, 0, 3]])
def test_a_shape_no_array_can_have_is_refused_at_admission_on_both_fronts(
    platform: Platform, shape: list[int]
) -> None:
    """Each dimension fits int64 and the bytes match (none: a dimension is 0), but
    numpy/torch refuse the shape: a caller's error from admission, not the worker's."""
    client = connected_client(platform, ECHO_ANY)
    try:
        data = triton.InferInput("x", shape, "FP32")
        data._raw_content = b""
        with pytest.raises(InferenceServerException, match="too large for any float32") as bad:
            client.infer("echo-any", [data])
        assert bad.value.status() == "StatusCode.INVALID_ARGUMENT"
        # The HTTP front, through the same admission.
        body = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": []}]}
        r = httpx.post(f"http://127.0.0.1:{platform.http_port}/v2/models/echo-any/infer", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith("invalid_input: "), r.text
        assert "too large for any float32 array" in r.json()["error"], r.text
        # The largest shape an array can have still runs.
        ok = triton.InferInput("x", [0, 2**61 - 1], "FP32")
        ok._raw_content = b""
        assert list(client.infer("echo-any", [ok]).get_output("y").shape) == [0, 2**61 - 1]
    finally:
        client.close()


def test_too_many_dimensions_are_refused_at_admission() -> None:
    spec = FunctionSpec(name="any", handler="tests.funcs:echo")  # no declared inputs
    tensor = Tensor(name="x", dtype=DType.FLOAT32, shape=[1] * 33, data=b"\0" * 4)
    with pytest.raises(GfaasError, match="rank 33 is over the 32") as caught:
        validate_inputs(spec, [tensor])
    assert caught.value.code == ErrorCode.INVALID_INPUT


def test_a_region_without_a_name_is_refused_over_grpc(platform: Platform) -> None:
    """No request could name it and `name=""` unregisters every region: the HTTP route
    always has a name, the gRPC request must too."""
    import tritonclient.utils.shared_memory as shm

    connected_client(platform).close()
    key = f"/grpc-noname-{time.monotonic_ns()}"
    region = shm.create_shared_memory_region("noname", key, 16)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{platform.grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            register = service_pb2.SystemSharedMemoryRegisterRequest(
                name="", key=key, offset=0, byte_size=16
            )
            with pytest.raises(grpc.RpcError) as refused:
                stub.SystemSharedMemoryRegister(register, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "needs a name" in (refused.value.details() or "")
            status = stub.SystemSharedMemoryStatus(
                service_pb2.SystemSharedMemoryStatusRequest(), timeout=10
            )
            assert dict(status.regions) == {}
    finally:
        shm.destroy_shared_memory_region(region)


def test_triton_system_shared_memory_over_grpc(platform: Platform) -> None:
    import tritonclient.utils.shared_memory as shm

    client = connected_client(platform)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    nbytes = x.nbytes
    key_in, key_out = (
        f"/gfaas-grpc-in-{platform.grpc_port}",
        f"/gfaas-grpc-out-{platform.grpc_port}",
    )
    region_in = shm.create_shared_memory_region("input", key_in, nbytes)
    region_out = shm.create_shared_memory_region("output", key_out, nbytes)
    try:
        shm.set_shared_memory_region(region_in, [x])
        client.register_system_shared_memory("input", key_in, nbytes)
        client.register_system_shared_memory("output", key_out, nbytes)
        status = client.get_system_shared_memory_status(as_json=True)
        assert set(status["regions"]) == {"input", "output"}
        inp = triton.InferInput("x", [2, 3], "FP32")
        inp.set_shared_memory("input", nbytes)
        out = triton.InferRequestedOutput("y")
        out.set_shared_memory("output", nbytes)
        result = client.infer("add-one", [inp], outputs=[out])
        # The message, not as_json: tritonclient's get_output(as_json=True) returns None.
        answer = result.get_output("y")
        assert answer.parameters["shared_memory_region"].string_param == "output"
        y = shm.get_contents_as_numpy(region_out, np.float32, [2, 3])
        np.testing.assert_array_equal(y, x + 1)
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}
    finally:
        shm.destroy_shared_memory_region(region_in)
        shm.destroy_shared_memory_region(region_out)
        client.close()


# -- the codec alone ---------------------------------------------------------------------


def _request(**fields: object) -> service_pb2.ModelInferRequest:
    return service_pb2.ModelInferRequest(model_name="m", **fields)


@pytest.mark.unit
def test_typed_integers_outside_the_datatype_are_refused() -> None:
    request = _request()
    tensor = request.inputs.add(name="x", datatype="INT8", shape=[2])
    tensor.contents.int_contents.extend([1, 300])
    with pytest.raises(GfaasError, match="INT8 range") as caught:
        grpc_codec.parse_infer_request(request)
    assert caught.value.code == ErrorCode.BAD_REQUEST


@pytest.mark.unit
def test_raw_contents_must_cover_every_input_not_in_shared_memory() -> None:
    request = _request(raw_input_contents=[b"\0" * 4, b"\0" * 4])
    request.inputs.add(name="x", datatype="FP32", shape=[1])
    with pytest.raises(GfaasError, match="2 entries for 1 inputs"):
        grpc_codec.parse_infer_request(request)


@pytest.mark.unit
def test_the_grpc_deadline_becomes_the_invocation_timeout() -> None:
    request = _request(raw_input_contents=[b"\0" * 4])
    request.inputs.add(name="x", datatype="FP32", shape=[1])
    parsed = grpc_codec.parse_infer_request(request)
    assert grpc_codec.with_deadline(parsed, 2.5).invoke.timeout_ms == 2500
    assert grpc_codec.with_deadline(parsed, None).invoke.timeout_ms == 0


@pytest.mark.parametrize("name", ["m" * 20_000, "☃" * 3_000])
def test_a_long_reason_still_reaches_the_client_with_its_status(
    platform: Platform, name: str
) -> None:
    """The details ride in a trailer that clients refuse over 16 KiB (RESOURCE_EXHAUSTED
    "Stream removed", the status and reason lost): a reason quoting a long name is cut
    to fit, percent-encoding (non-ASCII: 3 bytes per byte) counted."""
    connected_client(platform).close()
    with grpc.insecure_channel(f"127.0.0.1:{platform.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as unknown:
            stub.ModelInfer(service_pb2.ModelInferRequest(model_name=name), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND, unknown.value.details()
    details = unknown.value.details() or ""
    assert details.startswith(f"unknown_function: model '{name[:100]}")
    assert details.endswith("more characters cut)")


def test_a_request_protobuf_cannot_parse_is_invalid_argument(platform: Platform) -> None:
    """Not a message, or a string field that is not UTF-8: the caller's mistake, which
    grpc itself would answer UNKNOWN "Unexpected DecodeError"."""
    connected_client(platform).close()
    with grpc.insecure_channel(f"127.0.0.1:{platform.grpc_port}") as channel:
        for method in ("ModelInfer", "SystemSharedMemoryRegister"):
            rpc = channel.unary_unary(
                f"/inference.GRPCInferenceService/{method}",
                request_serializer=lambda body: body,
                response_deserializer=lambda body: body,
            )
            # A truncated field; then field 1 (a name) as 2 bytes that are not UTF-8.
            for body in (b"\xff\xff\xff", b"\x0a\x02\xff\xfe"):
                with pytest.raises(grpc.RpcError) as refused:
                    rpc(body, timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, body
                assert (refused.value.details() or "").startswith(
                    f"bad_request: {method}: malformed request message: "
                )
        # The front still answers well-formed calls.
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live


HOLD = FunctionSpec(
    name="hold",
    handler="tests.funcs:hold",
    inputs=[TensorSpec(name="seconds", dtype=DType.FLOAT32, shape=[1])],
    outputs=[TensorSpec(name="y", dtype=DType.FLOAT32, shape=[256])],
)


async def _broker_leases(url: str) -> object:
    import nats

    from gfaas.client import Client

    nc = await nats.connect(url)
    try:
        return (await Client(nc).status("memory-broker")).details["leases"]
    finally:
        await nc.drain()


@pytest.mark.slow
def test_a_caller_gone_before_its_shared_memory_reply_leaves_no_lease(platform: Platform) -> None:
    """A gRPC deadline cancels the handler while the function still runs (its
    `timeout` is longer): the reply that comes after, its output in a buffer leased
    under ingress's name, must still have that buffer released."""
    import tritonclient.utils.shared_memory as shm

    connected_client(platform, HOLD).close()
    key = f"/grpc-gone-{time.monotonic_ns()}"
    region = shm.create_shared_memory_region("seconds", key, 4)
    shm.set_shared_memory_region(region, [np.array([1.5], dtype=np.float32)])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{platform.grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            register = service_pb2.SystemSharedMemoryRegisterRequest(
                name="seconds", key=key, byte_size=4
            )
            stub.SystemSharedMemoryRegister(register, timeout=10)
            request = service_pb2.ModelInferRequest(model_name="hold")
            request.parameters["timeout"].int64_param = 10_000_000  # µs
            tensor = request.inputs.add(name="seconds", datatype="FP32", shape=[1])
            tensor.parameters["shared_memory_region"].string_param = "seconds"
            tensor.parameters["shared_memory_byte_size"].int64_param = 4
            with pytest.raises(grpc.RpcError) as late:
                stub.ModelInfer(request, timeout=0.5)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The function is done 1.5 s in; its output's lease goes with its reply.
            deadline = time.monotonic() + 10
            while (leases := anyio.run(_broker_leases, platform.url)) != 0:
                assert time.monotonic() < deadline, f"{leases} leases still held"
                time.sleep(0.1)
    finally:
        shm.destroy_shared_memory_region(region)


def test_both_fronts_read_their_statuses_from_one_table() -> None:
    from services.ingress import grpc_front, http
    from services.ingress.statuses import STATUSES

    # `pending` is a result lookup's answer, never an inference's.
    assert set(STATUSES) == set(ErrorCode) - {ErrorCode.PENDING}
    for code, statuses in STATUSES.items():
        assert (http.status_for(code), grpc_front.status_for(code)) == statuses
    assert STATUSES[ErrorCode.MODEL_UNAVAILABLE] == (503, grpc.StatusCode.UNAVAILABLE)


SLEEPY = FunctionSpec(
    name="sleepy",
    handler="tests.funcs:sleep",
    inputs=[TensorSpec(name="seconds", dtype=DType.FLOAT32, shape=[1])],
    outputs=[TensorSpec(name="slept", dtype=DType.FLOAT32, shape=[1])],
)


async def _ingress_accepted(url: str) -> int:
    import nats

    from gfaas.client import Client

    nc = await nats.connect(url)
    try:
        return int((await Client(nc).status("ingress")).details["accepted"])
    finally:
        await nc.drain()


def test_an_output_region_that_cannot_take_it_is_refused_before_the_function_runs(
    platform: Platform,
) -> None:
    """An output named into a region not registered, or one its claimed size does not
    fit, is the caller's mistake to refuse up front, as the inputs' are: not after
    the function ran (its work done, the caller kept waiting the whole call)."""
    import tritonclient.utils.shared_memory as shm

    client = connected_client(platform, SLEEPY)
    key = f"/grpc-outfirst-{time.monotonic_ns()}"
    region = shm.create_shared_memory_region("out", key, 4)
    try:
        client.register_system_shared_memory("out", key, 4)
        seconds = triton.InferInput("seconds", [1], "FP32")
        seconds.set_data_from_numpy(np.array([2.0], dtype=np.float32))
        before = anyio.run(_ingress_accepted, platform.url)
        for name, size, match in [
            ("nope", 4, "no shared-memory region 'nope' is registered"),
            ("out", 8, "do not fit"),
        ]:
            out = triton.InferRequestedOutput("slept")
            out.set_shared_memory(name, size)
            started = time.monotonic()
            with pytest.raises(InferenceServerException, match=match) as refused:
                client.infer("sleepy", [seconds], outputs=[out])
            assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert time.monotonic() - started < 1.5, "the function ran first"
        assert anyio.run(_ingress_accepted, platform.url) == before
        # A region that takes it still gets the output.
        out = triton.InferRequestedOutput("slept")
        out.set_shared_memory("out", 4)
        seconds.set_data_from_numpy(np.array([0.0], dtype=np.float32))
        client.infer("sleepy", [seconds], outputs=[out])
        assert shm.get_contents_as_numpy(region, np.float32, [1]).tolist() == [0.0]
        client.unregister_system_shared_memory()
    finally:
        shm.destroy_shared_memory_region(region)
        client.close()


@pytest.mark.unit
def test_registered_regions_are_bounded_per_tenant_and_by_descriptors() -> None:
    """Each system region keeps a descriptor open: unbounded, a client looping over
    register took every descriptor ingress had (and with them its connections)."""
    from services.ingress.shm_regions import ShmRegions

    key = f"/grpc-cap-{time.monotonic_ns()}"
    path = f"/dev/shm{key}"
    with open(path, "wb") as f:
        f.write(b"\0" * 16)
    try:
        regions = ShmRegions(tenant_max=2, max_open=3)
        a, b = regions.of("a"), regions.of("b")
        a.register("r1", key, 0, 16)
        a.register("r2", key, 0, 16)
        with pytest.raises(GfaasError, match="the tenant holds 2 regions") as over:
            a.register("r3", key, 0, 16)
        assert over.value.code == ErrorCode.QUOTA_EXCEEDED
        assert "'r3'" in over.value.reason
        # The same name again is still "already registered", not the cap.
        with pytest.raises(GfaasError, match="already registered"):
            a.register("r1", key, 0, 16)
        # Another tenant has its own share, until the descriptors run short.
        b.register("r1", key, 0, 16)
        with pytest.raises(GfaasError, match="open-file limit") as full:
            b.register("r2", key, 0, 16)
        assert full.value.code == ErrorCode.UNAVAILABLE
        a.unregister("r2")
        b.register("r2", key, 0, 16)
        assert [r.name for r in b.status()] == ["r1", "r2"]
        regions.close()
    finally:
        os.unlink(path)


def test_a_tenant_over_its_region_cap_is_resource_exhausted_over_grpc(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    import tritonclient.utils.shared_memory as shm

    with platform_at(nats_server.url, tmp_path / "s", tenant_max_shm_regions=2) as p:
        client = connected_client(p)
        key = f"/grpc-capped-{time.monotonic_ns()}"
        region = shm.create_shared_memory_region("r", key, 16)
        try:
            client.register_system_shared_memory("r1", key, 16)
            client.register_system_shared_memory("r2", key, 16)
            with pytest.raises(InferenceServerException, match="quota_exceeded") as over:
                client.register_system_shared_memory("r3", key, 16)
            assert over.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            # Another tenant's registrations are its own.
            client.register_system_shared_memory("r1", key, 16, headers={"gfaas-tenant": "t2"})
            client.unregister_system_shared_memory("r1")
            client.register_system_shared_memory("r3", key, 16)
            client.unregister_system_shared_memory()
            client.unregister_system_shared_memory(headers={"gfaas-tenant": "t2"})
        finally:
            shm.destroy_shared_memory_region(region)
            client.close()


async def _cpu_pool(url: str) -> dict[str, object]:
    import nats

    from gfaas.client import Client

    nc = await nats.connect(url)
    try:
        pools = (await Client(nc).status("memory-broker")).details["pools"]
        assert isinstance(pools, dict)
        return dict(pools.get("cpu") or {})
    finally:
        await nc.drain()


def test_a_shared_memory_input_the_model_refuses_is_refused_before_staging(
    platform: Platform,
) -> None:
    """An input in shared memory that admission refuses (another dtype, a name the
    model lacks, a shape it does not take) is refused before its bytes are leased
    and copied: no slab of the claim is created, to be kept for its cool-down."""
    import tritonclient.utils.shared_memory as shm

    client = connected_client(platform)
    nbytes = 8 * 1024 * 1024
    key = f"/grpc-refused-{time.monotonic_ns()}"
    region = shm.create_shared_memory_region("in", key, nbytes)
    try:
        client.register_system_shared_memory("in", key, nbytes)
        rows = nbytes // 24
        for name, shape, datatype, match in [
            ("x", [rows, 3], "FP64", "dtype float64, expected float32"),
            ("q", [rows, 3], "FP32", "has no input(s) ['q']"),
            ("x", [rows * 3], "FP32", "input 'x'"),
        ]:
            inp = triton.InferInput(name, shape, datatype)
            size = rows * 3 * (8 if datatype == "FP64" else 4)
            inp.set_shared_memory("in", size)
            with pytest.raises(InferenceServerException, match=re.escape(match)) as refused:
                client.infer("add-one", [inp])
            assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert "invalid_input" in str(refused.value)
        pool = anyio.run(_cpu_pool, platform.url)
        assert (pool.get("held", 0), pool.get("slabs_created", 0)) == (0, 0), pool
        # The same region still serves a request the model takes.
        inp = triton.InferInput("x", [2, 3], "FP32")
        inp.set_shared_memory("in", 24)
        np.testing.assert_array_equal(client.infer("add-one", [inp]).as_numpy("y"), np.ones((2, 3)))
        client.unregister_system_shared_memory()
    finally:
        shm.destroy_shared_memory_region(region)
        client.close()


def test_a_tenant_header_that_is_no_tenant_name_is_refused_by_the_regions(
    platform: Platform,
) -> None:
    """Unauthenticated, the tenant is the caller's header: "a/b" filed its regions
    among tenant "a"'s ("a/b/r"), which "a" then listed as its own "b/r"."""
    import tritonclient.utils.shared_memory as shm

    client = connected_client(platform)
    key = f"/grpc-tenant-{time.monotonic_ns()}"
    region = shm.create_shared_memory_region("r", key, 16)
    try:
        with pytest.raises(InferenceServerException, match="tenant name 'a/b' must") as bad:
            client.register_system_shared_memory("r", key, 16, headers={"gfaas-tenant": "a/b"})
        assert bad.value.status() == "StatusCode.INVALID_ARGUMENT"
        with pytest.raises(InferenceServerException, match="tenant name 'a/b' must"):
            client.get_system_shared_memory_status(headers={"gfaas-tenant": "a/b"})
        assert client.get_system_shared_memory_status(headers={"gfaas-tenant": "a"}) is not None
        status = client.get_system_shared_memory_status(as_json=True, headers={"gfaas-tenant": "a"})
        assert status.get("regions", {}) == {}
    finally:
        shm.destroy_shared_memory_region(region)
        client.close()


def _rows(name: str) -> TensorSpec:
    return TensorSpec(name=name, dtype=DType.FLOAT32, shape=[-1, 3])


# Declares z, but its handler (add_one) returns y alone.
SHORT = FunctionSpec(
    name="short",
    handler="tests.funcs:add_one",
    inputs=[_rows("x")],
    outputs=[_rows("y"), _rows("z")],
)


def test_a_declared_output_the_model_did_not_produce_is_the_models_failure(
    platform: Platform,
) -> None:
    """Asking for an output the model declares is a good request: the model not
    producing it is its failure (INTERNAL / 500), not the caller's (INVALID_ARGUMENT
    / 400, "do not retry, fix your request"). A name it does not declare still is.
    Its worker finds the declared output missing whatever was asked for: asking for
    `y` alone gets the same failure, not a reply that disagrees with the metadata."""
    client = connected_client(platform, SHORT)
    inp = triton.InferInput("x", [1, 3], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3), np.float32))
    try:
        with pytest.raises(InferenceServerException, match="handler_error") as failed:
            client.infer("short", [inp], outputs=[triton.InferRequestedOutput("z")])
        assert failed.value.status() == "StatusCode.INTERNAL"
        assert "declares output 'z' but did not produce it (it produced: y)" in str(failed.value)
        with pytest.raises(InferenceServerException, match="has no output 'q'") as unknown:
            client.infer("short", [inp], outputs=[triton.InferRequestedOutput("q")])
        assert unknown.value.status() == "StatusCode.INVALID_ARGUMENT"
        with pytest.raises(InferenceServerException, match="handler_error") as failed:
            client.infer("short", [inp], outputs=[triton.InferRequestedOutput("y")])
        assert failed.value.status() == "StatusCode.INTERNAL"
        assert "declares output 'z' but did not produce it" in str(failed.value)
    finally:
        client.close()
    body = {
        "inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0, 0, 0]}],
        "outputs": [{"name": "z"}],
    }
    r = httpx.post(f"http://127.0.0.1:{platform.http_port}/v2/models/short/infer", json=body)
    assert r.status_code == 500, r.text
    assert r.json()["error"].startswith("handler_error: model 'short' declares output 'z'")

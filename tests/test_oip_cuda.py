"""The OIP CUDA shared-memory extension (`/v2/cudasharedmemory`) against the running platform.

On a node without CUDA the routes answer and register refuses with the reason;
malformed requests are refused for their own reason before any handle is opened.
The registration bookkeeping and the staging path are exercised here with the
handle opener replaced; the real device-to-device path runs where CUDA is present.
"""

from __future__ import annotations

import base64
import json
import subprocess
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
import torch
from nats.aio.client import Client as NATS

from services.ingress import cuda_regions
from tests.helpers import deploy_and_wait
from tests.platform import PYTHON, Platform, subprocess_env
from tests.test_http import ADD_ONE, _broker_leases, _deploy, base, wait_http

pytestmark = [pytest.mark.nats]

CUDA = "/v2/cudasharedmemory"
X = np.arange(6, dtype=np.float32).reshape(2, 3)
NBYTES = X.nbytes


def handle_b64(raw: bytes = bytes(range(64))) -> str:
    return base64.b64encode(raw).decode()


def register_body(raw: bytes = bytes(range(64)), **fields: Any) -> dict[str, Any]:
    return {"raw_handle": {"b64": handle_b64(raw)}, "device_id": 0, "byte_size": NBYTES, **fields}


def x_in(region: str) -> dict[str, Any]:
    parameters = {"shared_memory_region": region, "shared_memory_byte_size": NBYTES}
    return {"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": parameters}


def y_in(region: str, size: int = NBYTES) -> dict[str, Any]:
    return {
        "name": "y",
        "parameters": {"shared_memory_region": region, "shared_memory_byte_size": size},
    }


async def ready_client(platform: Platform, nc: NATS) -> httpx.AsyncClient:
    await deploy_and_wait(nc, ADD_ONE)
    await wait_http(base(platform))
    return httpx.AsyncClient(base_url=base(platform))


async def infer_by_value(http: httpx.AsyncClient) -> None:
    """A plain JSON inference still works: nothing above broke the service."""
    r = await http.post(
        "/v2/models/add-one/infer",
        json={"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
    )
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [2.0, 3.0, 4.0]


# -- on any node ------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a node without CUDA")
async def test_without_cuda_status_is_empty_and_register_says_why(
    platform: Platform, nc: NATS
) -> None:
    async with await ready_client(platform, nc) as http:
        assert "cuda_shared_memory" not in (await http.get("/v2")).json()["extensions"]
        status = await http.get(f"{CUDA}/status")
        assert status.status_code == 200
        assert status.json() == []
        r = await http.post(f"{CUDA}/region/gpu-in/register", json=register_body())
        assert r.status_code == 400
        assert r.json() == {
            "error": "bad_request: CUDA shared memory is not available on this node: no CUDA device"
        }
        assert (await http.get(f"{CUDA}/status")).json() == []
        unknown = await http.get(f"{CUDA}/region/gpu-in/status")
        assert unknown.status_code == 400
        assert "no CUDA shared-memory region 'gpu-in'" in unknown.json()["error"]
        await infer_by_value(http)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"not json", "invalid CUDA shared-memory register request"),
        (b'{"device_id": 0, "byte_size": 24}', "missing required field `raw_handle`"),
        (
            json.dumps({"raw_handle": {"b64": handle_b64()}, "byte_size": 24}).encode(),
            "missing required field `device_id`",
        ),
        (
            json.dumps({"raw_handle": {"b64": handle_b64()}, "device_id": 0}).encode(),
            "missing required field `byte_size`",
        ),
        (
            json.dumps({"raw_handle": handle_b64(), "device_id": 0, "byte_size": 24}).encode(),
            "at `$.raw_handle`",
        ),
        (json.dumps(register_body(byte_size=-1)).encode(), "at `$.byte_size`"),
        (json.dumps(register_body(device_id=-1)).encode(), "at `$.device_id`"),
        (
            json.dumps({**register_body(), "raw_handle": {"b64": "not base64!"}}).encode(),
            "raw_handle.b64 is not valid base64",
        ),
        (
            json.dumps(register_body(raw=b"\x01" * 10)).encode(),
            "raw_handle is 10 bytes; a CUDA IPC handle (cudaIpcMemHandle_t) is 64",
        ),
    ],
)
async def test_malformed_register_requests_get_400_with_their_reason(
    platform: Platform, nc: NATS, body: bytes, fragment: str
) -> None:
    async with await ready_client(platform, nc) as http:
        r = await http.post(
            f"{CUDA}/region/gpu-in/register",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith("bad_request: ")
        assert fragment in r.json()["error"]
        assert (await http.get(f"{CUDA}/status")).json() == []


@pytest.mark.anyio
async def test_unregistering_unknown_regions_or_all_of_them_is_fine(
    platform: Platform, nc: NATS
) -> None:
    async with await ready_client(platform, nc) as http:
        assert (await http.post(f"{CUDA}/region/nope/unregister")).status_code == 200
        assert (await http.post(f"{CUDA}/unregister")).status_code == 200
        assert (await http.get(f"{CUDA}/status")).json() == []
        assert (await http.get(f"{CUDA}/region/nope/register")).status_code == 405


@pytest.mark.anyio
async def test_a_name_held_by_a_system_region_cannot_be_a_cuda_region(
    platform: Platform, nc: NATS
) -> None:
    import tritonclient.utils.shared_memory as shm

    key = f"/gfaas-test-cuda-ns-{platform.http_port}"
    region = shm.create_shared_memory_region("taken", key, NBYTES)
    try:
        async with await ready_client(platform, nc) as http:
            r = await http.post(
                "/v2/systemsharedmemory/region/taken/register",
                json={"key": key, "byte_size": NBYTES},
            )
            assert r.status_code == 200, r.text
            # Refused for the name before CUDA is even looked for.
            r = await http.post(f"{CUDA}/region/taken/register", json=register_body())
            assert r.status_code == 400
            assert "region 'taken' is already registered" in r.json()["error"]
            # The CUDA routes see only CUDA regions.
            assert (await http.get(f"{CUDA}/status")).json() == []
            await http.post(f"{CUDA}/unregister")
            sys_status = (await http.get("/v2/systemsharedmemory/status")).json()
            assert [s["name"] for s in sys_status] == ["taken"]
            await http.post("/v2/systemsharedmemory/unregister")
    finally:
        shm.destroy_shared_memory_region(region)


@pytest.mark.anyio
async def test_an_infer_naming_an_unregistered_region_gets_400_and_serving_goes_on(
    platform: Platform, nc: NATS
) -> None:
    async with await ready_client(platform, nc) as http:
        url = "/v2/models/add-one/infer"
        r = await http.post(url, json={"inputs": [x_in("gpu-in")]})
        assert r.status_code == 400
        assert "no shared-memory region 'gpu-in' is registered" in r.json()["error"]
        by_value = {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": X.tolist()}
        r = await http.post(url, json={"inputs": [by_value], "outputs": [y_in("gpu-out")]})
        assert r.status_code == 400
        assert "no shared-memory region 'gpu-out' is registered" in r.json()["error"]
        await infer_by_value(http)
    assert await _broker_leases(platform.url) == 0


# -- with the handle opener replaced: the bookkeeping, on any node -----------------------


class FakeCudaBackend:
    def __init__(self) -> None:
        self.closed: list[str] = []

    def close(self, segment: str) -> None:
        self.closed.append(segment)


def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeCudaBackend, list[tuple[int, str]]]:
    """One GPU as far as CUDA regions can tell, and handles that always open."""
    fake = FakeCudaBackend()
    opened: list[tuple[int, str]] = []

    def fake_open(device_id: int, segment: str) -> tuple[FakeCudaBackend, bool]:
        fresh = not any(s == segment for _, s in opened)
        opened.append((device_id, segment))
        return fake, fresh

    monkeypatch.setattr(cuda_regions, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(cuda_regions, "_open", fake_open)
    return fake, opened


@pytest.mark.anyio
async def test_registered_cuda_regions_are_listed_and_share_the_namespace(
    platform: Platform, nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, opened = fake_cuda(monkeypatch)
    raw = bytes(range(64))
    async with await ready_client(platform, nc) as http:
        r = await http.post(f"{CUDA}/region/gpu-in/register", json=register_body(raw))
        assert r.status_code == 200, r.text
        assert opened == [(0, raw.hex())]
        r = await http.post(f"{CUDA}/region/gpu-in/register", json=register_body(raw))
        assert r.status_code == 400
        assert "already registered" in r.json()["error"]
        r = await http.post(f"{CUDA}/region/gpu-9/register", json=register_body(device_id=9))
        assert r.status_code == 400
        assert "device_id 9 is not a CUDA device on this node (it has 1" in r.json()["error"]
        # The same allocation under a second name: one mapping, closed once, last.
        r = await http.post(
            f"{CUDA}/region/gpu-also/register", json=register_body(raw, byte_size=8)
        )
        assert r.status_code == 200, r.text
        # One namespace: a system region cannot take a CUDA region's name.
        r = await http.post(
            "/v2/systemsharedmemory/region/gpu-in/register",
            json={"key": "/whatever", "byte_size": 8},
        )
        assert r.status_code == 400
        assert "already registered" in r.json()["error"]

        status = await http.get(f"{CUDA}/status")
        assert status.json() == [
            {"name": "gpu-also", "device_id": 0, "byte_size": 8},
            {"name": "gpu-in", "device_id": 0, "byte_size": NBYTES},
        ]
        one = await http.get(f"{CUDA}/region/gpu-in/status")
        assert one.json() == [{"name": "gpu-in", "device_id": 0, "byte_size": NBYTES}]
        assert (await http.get("/v2/systemsharedmemory/status")).json() == []

        assert (await http.post(f"{CUDA}/region/gpu-in/unregister")).status_code == 200
        assert fake.closed == []  # still mapped for gpu-also
        assert (await http.post(f"{CUDA}/unregister")).status_code == 200
        assert fake.closed == [raw.hex()]
        assert (await http.get(f"{CUDA}/status")).json() == []
        await infer_by_value(http)


@pytest.mark.anyio
@pytest.mark.skipif(torch.cuda.is_available(), reason="the node pools GPU memory here")
async def test_a_cuda_input_on_a_node_without_a_gpu_pool_gets_a_clear_400(
    platform: Platform, nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_cuda(monkeypatch)
    async with await ready_client(platform, nc) as http:
        r = await http.post(f"{CUDA}/region/gpu-in/register", json=register_body())
        assert r.status_code == 200, r.text
        # The input is staged on the region's GPU; this node pools no GPU memory,
        # and the client is told so rather than getting a 500.
        r = await http.post("/v2/models/add-one/infer", json={"inputs": [x_in("gpu-in")]})
        assert r.status_code == 400
        error = r.json()["error"]
        assert "inputs in CUDA shared memory on cuda:0" in error
        assert "has no pool on device 'cuda:0'" in error
        await http.post(f"{CUDA}/unregister")
        await infer_by_value(http)
    assert await _broker_leases(platform.url) == 0


# -- with CUDA: a real region in another process, end to end ------------------------------

# The client side: a process of its own, because CUDA will not open an IPC handle in
# the process that exported it (and the platform runs in this one). Raw allocations,
# not cupy's pool: an IPC handle names a whole allocation.
REGION_OWNER = """
import base64, json, sys
import cupy as cp
import numpy as np

nbytes = int(sys.argv[1])
rt = cp.cuda.runtime
x = np.arange(nbytes // 4, dtype=np.float32)
regions = {name: cp.cuda.Memory(nbytes) for name in ("gpu-in", "gpu-out")}
rt.memcpy(regions["gpu-in"].ptr, x.ctypes.data, nbytes, rt.memcpyHostToDevice)
rt.memset(regions["gpu-out"].ptr, 0, nbytes)
rt.deviceSynchronize()
raw = {n: bytes(rt.ipcGetMemHandle(m.ptr)) for n, m in regions.items()}
print(json.dumps({n: base64.b64encode(h).decode() for n, h in raw.items()}), flush=True)
for _ in sys.stdin:
    y = np.empty(nbytes // 4, dtype=np.float32)
    rt.memcpy(y.ctypes.data, regions["gpu-out"].ptr, nbytes, rt.memcpyDeviceToHost)
    print(json.dumps(y.tolist()), flush=True)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_region_carries_input_and_output_end_to_end(platform: Platform) -> None:
    pytest.importorskip("cupy")
    anyio.run(_deploy, platform.url)
    anyio.run(wait_http, base(platform))
    owner = subprocess.Popen(
        [PYTHON, "-c", REGION_OWNER, str(NBYTES)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=subprocess_env(),
        text=True,
    )
    assert owner.stdin is not None
    assert owner.stdout is not None
    try:
        handles = json.loads(owner.stdout.readline())
        with httpx.Client(base_url=base(platform), timeout=30) as http:

            def register(name: str, allocation: str, byte_size: int = NBYTES) -> None:
                raw_handle = {"b64": handles[allocation]}
                body = {"raw_handle": raw_handle, "device_id": 0, "byte_size": byte_size}
                r = http.post(f"{CUDA}/region/{name}/register", json=body)
                assert r.status_code == 200, r.text

            assert "cuda_shared_memory" in http.get("/v2").json()["extensions"]
            register("gpu-in", "gpu-in")
            register("gpu-out", "gpu-out")
            assert http.get(f"{CUDA}/status").json() == [
                {"name": "gpu-in", "device_id": 0, "byte_size": NBYTES},
                {"name": "gpu-out", "device_id": 0, "byte_size": NBYTES},
            ]
            url = "/v2/models/add-one/infer"
            r = http.post(url, json={"inputs": [x_in("gpu-in")], "outputs": [y_in("gpu-out")]})
            assert r.status_code == 200, r.text
            (out,) = r.json()["outputs"]
            assert out["parameters"] == {
                "shared_memory_region": "gpu-out",
                "shared_memory_byte_size": NBYTES,
            }
            assert "data" not in out
            owner.stdin.write("read\n")
            owner.stdin.flush()
            y = np.array(json.loads(owner.stdout.readline()), dtype=np.float32)
            np.testing.assert_array_equal(y.reshape(2, 3), X + 1)

            # A CUDA input with the output by value.
            r = http.post(url, json={"inputs": [x_in("gpu-in")]})
            assert r.status_code == 200, r.text
            assert r.json()["outputs"][0]["data"] == (X + 1).reshape(-1).tolist()

            # An output too large for its region is refused, not written past its end
            # (the same allocation under a second, smaller name).
            register("gpu-small", "gpu-out", byte_size=8)
            r = http.post(url, json={"inputs": [x_in("gpu-in")], "outputs": [y_in("gpu-small", 8)]})
            assert r.status_code == 400
            assert "do not fit" in r.json()["error"]

            assert http.post(f"{CUDA}/unregister").status_code == 200
            assert http.get(f"{CUDA}/status").json() == []
    finally:
        owner.stdin.close()
        owner.wait(timeout=30)
    assert anyio.run(_broker_leases, platform.url) == 0


@pytest.mark.anyio
async def test_a_cuda_region_size_past_int64_is_refused_and_status_still_answers(
    platform: Platform, nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte_size no int64 holds (2**64 over HTTP, whose JSON has no bound) was
    registered: the gRPC status then failed INTERNAL for the tenant's every region
    (its byte_size field is 64-bit), and bounds were checked against the claim."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    fake_cuda(monkeypatch)
    async with await ready_client(platform, nc) as http:
        for size in (2**64, 2**63):
            r = await http.post(f"{CUDA}/region/huge/register", json=register_body(byte_size=size))
            assert r.status_code == 400, r.text
            assert "at `$.byte_size`" in r.json()["error"]
        r = await http.post(f"{CUDA}/region/fine/register", json=register_body())
        assert r.status_code == 200, r.text

        def grpc_status() -> list[str]:
            with grpc.insecure_channel(f"127.0.0.1:{platform.grpc_port}") as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                reply = stub.CudaSharedMemoryStatus(
                    service_pb2.CudaSharedMemoryStatusRequest(), timeout=10
                )
                return sorted(reply.regions)

        assert await anyio.to_thread.run_sync(grpc_status) == ["fine"]
        await http.post(f"{CUDA}/unregister")

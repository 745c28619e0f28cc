"""HTTP (Open Inference Protocol) against the running platform: curl-style JSON,
the binary extension, and the unmodified Triton HTTP client."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from anyio.from_thread import start_blocking_portal
from nats.aio.client import Client as NATS

from gfaas.client import Client
from services.gpu_worker.app import serve as serve_worker
from services.ingress import app as ingress_app
from services.memory_broker.app import serve as serve_broker
from shared.natsd import NatsServer
from shared.schema import DType, FunctionSpec, TensorSpec
from tests.helpers import deploy_and_wait, leases_on
from tests.platform import Platform, platform_at, settings_for

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

ADD_ONE = FunctionSpec(
    name="add-one",
    handler="tests.funcs:add_one",
    inputs=[TensorSpec(name="x", dtype=DType.FLOAT32, shape=[-1, 3])],
    outputs=[TensorSpec(name="y", dtype=DType.FLOAT32, shape=[-1, 3])],
)
BOOM = FunctionSpec(name="boom", handler="tests.funcs:boom")


def base(platform: Platform) -> str:
    return f"http://127.0.0.1:{platform.http_port}"


async def wait_http(url: str) -> None:
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(10):
            while True:
                try:
                    if (await http.get(f"{url}/v2/health/ready")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.05)


async def test_json_infer_over_http_runs_the_function(platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, ADD_ONE)
    url = base(platform)
    await wait_http(url)
    async with httpx.AsyncClient(base_url=url) as http:
        meta = (await http.get("/v2/models/add-one")).json()
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
        index = (await http.post("/v2/repository/index")).json()
        assert {"name": "add-one", "version": "1", "state": "READY"} in index
        r = await http.post(
            "/v2/models/add-one/infer",
            json={
                "inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]
            },
        )
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["name"] == "y"
        assert out["data"] == [2.0, 3.0, 4.0]


async def test_http_errors_map_to_status_codes(platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, ADD_ONE, BOOM)
    url = base(platform)
    await wait_http(url)
    x = {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}
    async with httpx.AsyncClient(base_url=url) as http:
        unknown = await http.post("/v2/models/nope/infer", json={"inputs": [x]})
        assert unknown.status_code == 404
        wrong = await http.post(
            "/v2/models/add-one/infer", json={"inputs": [{**x, "datatype": "FP64"}]}
        )
        assert wrong.status_code == 400
        assert "invalid_input" in wrong.json()["error"]
        failed = await http.post("/v2/models/boom/infer", json={"inputs": [x]})
        assert failed.status_code == 500
        assert "handler_error" in failed.json()["error"]


def test_triton_http_client_works_unchanged(platform: Platform) -> None:
    anyio.run(_deploy, platform.url)
    anyio.run(wait_http, base(platform))
    client = triton.InferenceServerClient(url=f"127.0.0.1:{platform.http_port}")
    assert client.is_server_live()
    assert client.is_model_ready("add-one")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    inp = triton.InferInput("x", [2, 3], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    out = triton.InferRequestedOutput("y", binary_data=True)
    result = client.infer("add-one", [inp], outputs=[out])
    np.testing.assert_array_equal(result.as_numpy("y"), x + 1)
    # Triton's statistics and model configuration extensions, as its client reads them.
    stats = client.get_inference_statistics("add-one")
    (model,) = stats["model_stats"]
    assert model["name"] == "add-one"
    assert model["inference_stats"]["success"]["count"] == 1
    assert model["inference_stats"]["success"]["ns"] > 0
    assert [m["name"] for m in client.get_inference_statistics()["model_stats"]] == ["add-one"]
    config = client.get_model_config("add-one")
    assert config["name"] == "add-one"
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 3]}]
    client.close()


async def _deploy(url: str) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        await deploy_and_wait(nc, ADD_ONE)
    finally:
        await nc.drain()


def test_triton_system_shared_memory_moves_tensors_without_the_bus(platform: Platform) -> None:
    import tritonclient.utils.shared_memory as shm

    anyio.run(_deploy, platform.url)
    anyio.run(wait_http, base(platform))
    client = triton.InferenceServerClient(url=f"127.0.0.1:{platform.http_port}")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    nbytes = x.nbytes
    key_in, key_out = (
        f"/gfaas-test-in-{platform.http_port}",
        f"/gfaas-test-out-{platform.http_port}",
    )
    region_in = shm.create_shared_memory_region("input", key_in, nbytes)
    region_out = shm.create_shared_memory_region("output", key_out, nbytes)
    try:
        shm.set_shared_memory_region(region_in, [x])
        client.register_system_shared_memory("input", key_in, nbytes)
        client.register_system_shared_memory("output", key_out, nbytes)
        status = client.get_system_shared_memory_status()
        assert {r["name"] for r in status} == {"input", "output"}
        inp = triton.InferInput("x", [2, 3], "FP32")
        inp.set_shared_memory("input", nbytes)
        out = triton.InferRequestedOutput("y", binary_data=True)
        out.set_shared_memory("output", nbytes)
        result = client.infer("add-one", [inp], outputs=[out])
        answer = result.get_output("y")
        assert answer["parameters"]["shared_memory_region"] == "output"
        y = shm.get_contents_as_numpy(region_out, np.float32, [2, 3])
        np.testing.assert_array_equal(y, x + 1)
        # An output region too small is refused with a reason, not written past its end.
        client.unregister_system_shared_memory("output")
        client.register_system_shared_memory("output", key_out, nbytes // 2)
        with pytest.raises(triton.InferenceServerException, match="do not fit"):
            client.infer("add-one", [inp], outputs=[out])
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status() == []
    finally:
        shm.destroy_shared_memory_region(region_in)
        shm.destroy_shared_memory_region(region_out)
        client.close()
    leases = anyio.run(_broker_leases, platform.url)
    assert leases == 0


async def _broker_leases(url: str) -> int:
    import nats

    from gfaas.client import Client

    nc = await nats.connect(url)
    try:
        with anyio.fail_after(5):
            while (leases := (await Client(nc).status("memory-broker")).details["leases"]) != 0:
                await anyio.sleep(0.05)
        return int(leases)
    finally:
        await nc.drain()


async def test_shared_memory_outputs_of_a_function_run_on_another_node(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    # Ingress on node `local`, the only worker on node `b`: the function's outputs
    # come back by handle in b's pool. Staging copied them out and released them at
    # ingress's own broker, which knows none of them: the release was refused (the
    # caller got not_found after the function had run) and the outputs stayed leased
    # at b until their TTL. Now they are read through b's broker, in chunks (the big
    # one takes two), and released there. The inputs, staged in local's pool, reach
    # b by value: the worker reads them through local's broker.
    with platform_at(nats_server.url, tmp_path / "s", workers=0) as p:
        url = nats_server.url
        p.start("broker-b", serve_broker, settings_for(url, tmp_path / "b", node="b"))
        wb = settings_for(url, tmp_path / "wb", node="b", worker_id="wb")
        p.start("worker-b", serve_worker, wb)
        await deploy_and_wait(nc, ADD_ONE, handler_check=False)
        big = np.arange(3 * 100_000, dtype=np.float32).reshape(-1, 3)  # over a message
        small = np.arange(6, dtype=np.float32).reshape(2, 3)
        arrays = {"in": big, "out": np.zeros_like(big), "small": small}
        segments = {n: Path("/dev/shm") / f"gfaas-test-{n}-b-{p.http_port}" for n in arrays}

        def shm_input(region: str, x: np.ndarray[Any, Any]) -> dict[str, Any]:
            where = {"shared_memory_region": region, "shared_memory_byte_size": x.nbytes}
            return {"name": "x", "datatype": "FP32", "shape": list(x.shape), "parameters": where}

        try:
            for n, path in segments.items():
                path.write_bytes(arrays[n].tobytes())
            async with httpx.AsyncClient(base_url=base(p), timeout=10) as http:
                await wait_http(base(p))
                for n, path in segments.items():
                    r = await http.post(
                        f"/v2/systemsharedmemory/region/{n}/register",
                        json={"key": path.name, "byte_size": arrays[n].nbytes},
                    )
                    assert r.status_code == 200, r.text
                where = {"shared_memory_region": "out", "shared_memory_byte_size": big.nbytes}
                into = {
                    "inputs": [shm_input("in", big)],
                    "outputs": [{"name": "y", "parameters": where}],
                }
                r = await http.post("/v2/models/add-one/infer", json=into)
                assert r.status_code == 200, r.text
                got = np.frombuffer(segments["out"].read_bytes(), np.float32)
                np.testing.assert_array_equal(got.reshape(big.shape), big + 1)
                # Not asked for in a region: its bytes read through b's broker.
                r = await http.post(
                    "/v2/models/add-one/infer", json={"inputs": [shm_input("small", small)]}
                )
                assert r.status_code == 200, r.text
                assert r.json()["outputs"][0]["data"] == (small + 1).ravel().tolist()
                await http.post("/v2/systemsharedmemory/unregister")
            (worker,) = await Client(nc).status_all("gpu-worker", timeout=1.0)
            assert worker.details["remote_reads"] == 2  # both inputs, from local's pool
            with anyio.fail_after(5):
                while (await leases_on(nc, "b"), await leases_on(nc, "local")) != (0, 0):
                    await anyio.sleep(0.05)
        finally:
            for path in segments.values():
                path.unlink(missing_ok=True)


async def test_a_workflow_is_a_model_over_http(platform: Platform, nc: NATS) -> None:
    from gfaas.client import Client
    from shared.schema import StageSpec, WorkflowSpec

    x_spec = [TensorSpec(name="x", dtype=DType.FLOAT32, shape=[-1, 3])]
    inc = FunctionSpec(
        name="inc",
        handler="tests.funcs:add_one",
        inputs=x_spec,
        outputs=[TensorSpec(name="y", dtype=DType.FLOAT32, shape=[-1, 3])],
    )
    twice = WorkflowSpec(
        name="twice",
        inputs=x_spec,
        stages=[
            StageSpec(name="a", function="inc", inputs={"x": "$in.x"}),
            StageSpec(name="b", function="inc", inputs={"x": "a.y"}),
        ],
        outputs={"z": "b.y"},
    )
    await deploy_and_wait(nc, inc)
    await Client(nc).deploy(twice)
    url = base(platform)
    await wait_http(url)
    async with httpx.AsyncClient(base_url=url) as http:
        with anyio.fail_after(5):  # until ingress's workflow registry has it
            while (meta := await http.get("/v2/models/twice")).status_code != 200:
                await anyio.sleep(0.05)
        assert meta.json()["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
        assert meta.json()["outputs"] == [{"name": "z", "datatype": "FP32", "shape": [-1, 3]}]
        assert (await http.get("/v2/models/twice/ready")).json()["ready"] is True
        index = (await http.post("/v2/repository/index", json={})).json()
        assert {m["name"] for m in index} == {"inc", "twice"}
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
        r = await http.post("/v2/models/twice/infer", json=body)
        assert r.status_code == 200, r.text
        (z,) = r.json()["outputs"]
        assert z["name"] == "z"
        assert z["data"] == [3.0, 4.0, 5.0]


def test_a_client_stalled_midway_through_its_body_does_not_hold_ingress_stop(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bound under test, shortened: ingress stops within it, whatever clients do.
    monkeypatch.setattr(ingress_app, "HTTP_GRACE_S", 1)
    settings = settings_for(nats_server.url, tmp_path / "state")
    with start_blocking_portal("asyncio") as portal:
        platform = Platform(
            portal=portal,
            url=nats_server.url,
            http_port=settings.http_port,
            state_dir=tmp_path / "state",
        )
        platform.start("ingress", ingress_app.serve, settings)
        anyio.run(wait_http, base(platform))
        with socket.create_connection(("127.0.0.1", settings.http_port)) as stalled:
            # Headers promise 100 bytes; one comes, then nothing (a slow or vanished client).
            stalled.sendall(
                b"POST /v2/repository/index HTTP/1.1\r\nHost: gfaas\r\nContent-Length: 100\r\n\r\n{"
            )
            time.sleep(0.3)  # read by ingress, which now waits for the rest
            started = time.monotonic()
            try:
                platform.stop("ingress", timeout=10)
            finally:
                stalled.close()  # lets an ingress that did not stop end the test
                platform.stop_all()
        assert time.monotonic() - started < 5


async def _deploy_unchecked(url: str, *specs: FunctionSpec) -> None:
    import nats

    nc = await nats.connect(url)
    try:  # tests.funcs's handlers are known good: no handler check's subprocess
        await deploy_and_wait(nc, *specs, handler_check=False)
    finally:
        await nc.drain()


def test_a_caller_set_deadline_is_cut_to_the_configured_maximum(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # A caller asking a minute (OIP `timeout`, in µs) of a function whose own timeout
    # is 0.2 s gets the ingress's max_deadline_s (0.3 s), not its minute: before the cap,
    # its call held its slot for as long as it liked (here: the handler's 1.2 s).
    sleepy = FunctionSpec(name="sleepy", handler="tests.funcs:sleep", timeout_ms=200)
    with platform_at(nats_server.url, tmp_path / "state", max_deadline_s=0.3) as platform:
        anyio.run(_deploy_unchecked, platform.url, sleepy)
        anyio.run(wait_http, base(platform))
        seconds = {"name": "seconds", "shape": [1], "datatype": "FP32", "data": [1.2]}
        started = time.monotonic()
        r = httpx.post(
            f"{base(platform)}/v2/models/sleepy/infer",
            json={"inputs": [seconds], "parameters": {"timeout": 60_000_000}},
            timeout=10,
        )
        took = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert r.json()["error"].startswith("deadline_exceeded: ")
    assert took < 1.0, took


async def _registered(url: str, spec: FunctionSpec) -> None:
    """`spec` in the registry, once ingress knows it (no scheduler needed)."""
    import nats

    from gfaas.client import Client

    nc = await nats.connect(url)
    try:
        client = Client(nc)
        await (await client.registry()).put(spec)
        with anyio.fail_after(5):
            while spec.name not in (await client.status("ingress")).details["functions"]:
                await anyio.sleep(0.02)
    finally:
        await nc.drain()


def _stalled_answer(port: int, path: str) -> tuple[bytes, float]:
    """What ingress sends a client whose body stops after its first byte, read until
    ingress closes the connection, and how long that took."""
    with socket.create_connection(("127.0.0.1", port)) as stalled:
        stalled.settimeout(5)
        started = time.monotonic()
        stalled.sendall(
            f"POST {path} HTTP/1.1\r\nHost: gfaas\r\nContent-Length: 100\r\n\r\n{{".encode()
        )
        answer = b""
        try:
            while chunk := stalled.recv(65536):
                answer += chunk
        except TimeoutError:
            pass  # still open: the answer so far
        return answer, time.monotonic() - started


def test_a_body_that_stops_coming_is_answered_408_and_its_connection_closed(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # Before, uvicorn waited for the other 99 bytes for good, holding the connection
    # (and its request) open for as long as the client kept it.
    settings = settings_for(nats_server.url, tmp_path / "state", http_body_idle_s=0.3)
    with start_blocking_portal("asyncio") as portal:
        platform = Platform(
            portal=portal,
            url=nats_server.url,
            http_port=settings.http_port,
            state_dir=tmp_path / "state",
        )
        platform.start("ingress", ingress_app.serve, settings)
        try:
            anyio.run(_registered, nats_server.url, ADD_ONE)
            anyio.run(wait_http, base(platform))
            # The inference route (answered before Starlette) and one through its router.
            for path in ("/v2/models/add-one/infer", "/v2/repository/index"):
                answer, took = _stalled_answer(settings.http_port, path)
                assert answer.startswith(b"HTTP/1.1 408 "), (path, answer)
                assert b"the request body stopped coming" in answer, answer
                assert took < 2, (path, took)
        finally:
            platform.stop_all()


# -- region copies off the event loop -------------------------------------------------

# Rows of add-one's [-1, 3] float32 input: 1.5 MiB, over shm_regions.THREAD_COPY_MIN.
_ROWS = 1 << 17
_COPY_S = 2.0  # how long the slowed input copy takes


class _SlowCopy:
    """shm_regions._pread made deliberately slow (chunks, a sleep before each): a copy
    long enough that a loop it blocked is seen for sure on a loaded machine. Every
    chunk is read through the descriptor afresh, as a large copy's next pread is."""

    chunk = 1 << 16

    def __init__(self) -> None:
        import threading

        self.started = threading.Event()
        self.finished = threading.Event()

    def __call__(self, fd: int, target: memoryview, position: int) -> int:
        import os

        self.started.set()
        pause = _COPY_S / max(1, len(target) // self.chunk)
        done = 0
        try:
            while done < len(target):
                time.sleep(pause)
                got = os.preadv(fd, [target[done : done + self.chunk]], position + done)
                if got == 0:
                    break
                done += got
        finally:
            self.finished.set()
        return done


def _region_fds(path: str) -> int:
    """This process's descriptors open on `path` (ingress runs in it)."""
    import os

    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile (listdir's own)
            count += os.readlink(f"/proc/self/fd/{fd}") == path
    return count


def _shm_infer_body(nbytes: int) -> dict[str, object]:
    region = {"shared_memory_region": "input", "shared_memory_byte_size": nbytes}
    out = {"shared_memory_region": "output", "shared_memory_byte_size": nbytes}
    return {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [_ROWS, 3], "parameters": region}],
        "outputs": [{"name": "y", "parameters": out}],
    }


async def _during_a_slow_copy(
    platform: Platform, slow: _SlowCopy, nbytes: int, during: Any
) -> httpx.Response:
    """An infer whose input copy is `slow`, and `during(http)` run while it copies."""
    url = base(platform)
    async with httpx.AsyncClient(timeout=30) as http:
        answer: list[httpx.Response] = []

        async def infer() -> None:
            answer.append(
                await http.post(f"{url}/v2/models/add-one/infer", json=_shm_infer_body(nbytes))
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(infer)
            with anyio.fail_after(10):
                while not slow.started.is_set():
                    await anyio.sleep(0.005)
            await during(http)
        return answer[0]


def _slow_copy_platform(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> tuple[_SlowCopy, int, Any, Any, str, int]:
    import tritonclient.utils.shared_memory as shm

    from services.ingress import shm_regions

    anyio.run(_deploy, platform.url)
    anyio.run(wait_http, base(platform))
    x = np.arange(_ROWS * 3, dtype=np.float32).reshape(_ROWS, 3)
    assert x.nbytes >= getattr(shm_regions, "THREAD_COPY_MIN", 0)
    key_in, key_out = (
        f"/gfaas-test-slow-in-{platform.http_port}",
        f"/gfaas-test-slow-out-{platform.http_port}",
    )
    region_in = shm.create_shared_memory_region("input", key_in, x.nbytes)
    region_out = shm.create_shared_memory_region("output", key_out, x.nbytes)
    shm.set_shared_memory_region(region_in, [x])
    path = f"/dev/shm{key_in}"
    baseline = _region_fds(path)  # the test's own (it is ingress's process too)
    client = triton.InferenceServerClient(url=f"127.0.0.1:{platform.http_port}")
    client.register_system_shared_memory("input", key_in, x.nbytes)
    client.register_system_shared_memory("output", key_out, x.nbytes)
    client.close()
    slow = _SlowCopy()
    monkeypatch.setattr(shm_regions, "_pread", slow)
    assert _region_fds(path) == baseline + 1  # ingress's, registered
    return slow, x.nbytes, region_in, region_out, path, baseline


@pytest.mark.slow
def test_a_large_region_copy_does_not_stall_other_calls_on_the_ingress(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy ran on ingress's event loop: while one caller's tensor moved, no
    other call (a health check here; any HTTP, gRPC or NATS call) was answered."""
    import tritonclient.utils.shared_memory as shm

    slow, nbytes, region_in, region_out, *_ = _slow_copy_platform(platform, monkeypatch)
    took: list[float] = []
    try:

        async def health(http: httpx.AsyncClient) -> None:
            started = time.monotonic()
            reply = await http.get(f"{base(platform)}/v2/health/ready")
            took.append(time.monotonic() - started)
            assert reply.status_code == 200
            # Answered while the copy was still under way, not once it was done.
            assert not slow.finished.is_set()

        answer = anyio.run(_during_a_slow_copy, platform, slow, nbytes, health)
        assert answer.status_code == 200, answer.text
        y = shm.get_contents_as_numpy(region_out, np.float32, [_ROWS, 3])
        np.testing.assert_array_equal(y, np.arange(_ROWS * 3, dtype=np.float32).reshape(-1, 3) + 1)
        assert took[0] < _COPY_S / 4, took
    finally:
        shm.destroy_shared_memory_region(region_in)
        shm.destroy_shared_memory_region(region_out)
    assert anyio.run(_broker_leases, platform.url) == 0


@pytest.mark.slow
def test_a_region_unregistered_during_its_copy_is_neither_closed_under_it_nor_leaked(
    platform: Platform, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Unregister is answered while the copy runs (it waited for it before); the
    copy keeps the descriptor it reads through (closed under it, its next pread
    found EBADF, or the number reused by the next open: someone else's bytes), and
    the last copy using it closes it: none is left open on the segment."""
    import os

    import tritonclient.utils.shared_memory as shm

    slow, nbytes, region_in, region_out, path, baseline = _slow_copy_platform(platform, monkeypatch)
    other = tmp_path / "other"
    other.write_bytes(b"\xff" * nbytes)
    reused: list[int] = []
    try:

        async def unregister(http: httpx.AsyncClient) -> None:
            reply = await http.post(
                f"{base(platform)}/v2/systemsharedmemory/region/input/unregister"
            )
            assert reply.status_code == 200, reply.text
            assert not slow.finished.is_set()  # answered during the copy
            # The next open takes the lowest free number: a region's own, had
            # unregister closed it.
            reused.append(os.open(other, os.O_RDONLY))

        answer = anyio.run(_during_a_slow_copy, platform, slow, nbytes, unregister)
        # The copy went on with the region's own bytes: the answer is right.
        assert answer.status_code == 200, answer.text
        y = shm.get_contents_as_numpy(region_out, np.float32, [_ROWS, 3])
        np.testing.assert_array_equal(y, np.arange(_ROWS * 3, dtype=np.float32).reshape(-1, 3) + 1)
        assert _region_fds(path) == baseline  # the copy closed it, being the last
        status = httpx.get(f"{base(platform)}/v2/systemsharedmemory/status")
        assert [r["name"] for r in status.json()] == ["output"]
    finally:
        for fd in reused:
            os.close(fd)
        shm.destroy_shared_memory_region(region_in)
        shm.destroy_shared_memory_region(region_out)
    assert anyio.run(_broker_leases, platform.url) == 0

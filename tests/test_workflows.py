"""Workflows live: stages through the scheduler, intermediates by handle, released."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import nats.errors
import numpy as np
import pytest
import tritonclient.grpc as triton
from nats.aio.client import Client as NATS

from examples.specs import example_spec_paths, example_workflow_paths
from examples.weights import write_all
from gfaas.client import Client
from services.gpu_worker.app import serve as serve_worker
from services.ingress.workflow import _Run
from services.memory_broker.app import serve as serve_broker
from shared.dataplane.backend import BackendUnavailable
from shared.errors import GfaasError
from shared.natsd import NatsServer
from shared.schema import (
    H_DEADLINE,
    DType,
    FunctionSpec,
    InvokeRequest,
    OutputMode,
    StageSpec,
    Tensor,
    TensorSpec,
    WorkflowSpec,
    encode,
)
from shared.spec import load_any, load_spec
from tests.helpers import body, leases_on, request
from tests.platform import Platform, platform_at, settings_for

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

X = [TensorSpec(name="x", dtype=DType.FLOAT32, shape=[-1])]
FUNCS = [
    FunctionSpec(name="add-one", handler="tests.funcs:add_one", inputs=X, concurrency=4),
    FunctionSpec(name="double", handler="tests.funcs:double", inputs=X, concurrency=4),
    FunctionSpec(name="echo", handler="tests.funcs:echo", inputs=X, concurrency=4),
    FunctionSpec(
        name="add",
        handler="tests.funcs:add",
        inputs=[
            TensorSpec(name="a", dtype=DType.FLOAT32, shape=[-1]),
            TensorSpec(name="b", dtype=DType.FLOAT32, shape=[-1]),
        ],
        concurrency=4,
    ),
    FunctionSpec(name="boom", handler="tests.funcs:boom", inputs=X),
    FunctionSpec(name="slow-echo", handler="tests.funcs:slow_echo", inputs=X, concurrency=4),
]
# a fans out to b and c; d joins them. a's output is also a workflow output.
DIAMOND = WorkflowSpec(
    name="diamond",
    inputs=X,
    stages=[
        StageSpec(name="a", function="add-one", inputs={"x": "$in.x"}),
        StageSpec(name="b", function="double", inputs={"x": "a.y"}),
        StageSpec(name="c", function="echo", inputs={"x": "a.y"}),
        StageSpec(name="d", function="add", inputs={"a": "b.y", "b": "c.y"}),
    ],
    outputs={"sum": "d.y", "plus_one": "a.y"},
)
# d joins a fast branch and a slow one: a's output waits, parked, for the slow one.
UNEVEN = WorkflowSpec(
    name="uneven",
    inputs=X,
    stages=[
        StageSpec(name="a", function="add-one", inputs={"x": "$in.x"}),
        StageSpec(name="s", function="slow-echo", inputs={"x": "$in.x"}),
        StageSpec(name="d", function="add", inputs={"a": "a.y", "b": "s.y"}),
    ],
    outputs={"y": "d.y"},
)
FAILING = WorkflowSpec(
    name="failing",
    inputs=X,
    stages=[
        StageSpec(name="a", function="add-one", inputs={"x": "$in.x"}),
        StageSpec(name="b", function="boom", inputs={"x": "a.y"}),
    ],
    outputs={"y": "b.y"},
)


async def deploy_all(
    client: Client, *specs: FunctionSpec | WorkflowSpec, handler_check: bool = True
) -> None:
    """Deploy and wait until ingress has them all. Without `handler_check` no handler
    is dry-run in a sandbox first (a few seconds each on a busy host)."""
    for spec in specs:
        await client.deploy(spec, handler_check=handler_check)
    names = {s.name for s in specs}
    with anyio.fail_after(5):
        while True:
            details = (await client.status("ingress")).details
            if names <= set(details["functions"]) | set(details["workflows"]):
                return
            await anyio.sleep(0.02)


async def broker(client: Client) -> dict[str, Any]:
    return (await client.status("memory-broker")).details


async def leases_settle_at(client: Client, count: int) -> dict[str, Any]:
    """The broker's details once `count` leases are live: runs publish their releases
    without waiting, and the broker answers status beside its ordered ops."""
    with anyio.fail_after(5):
        while (details := await broker(client))["leases"] != count:
            await anyio.sleep(0.02)
    return details


async def no_leases_left(client: Client) -> None:
    await leases_settle_at(client, 0)


async def test_a_diamond_workflow_runs_with_intermediates_by_handle(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await deploy_all(client, *FUNCS, DIAMOND)
    x = np.arange(6, dtype=np.float32)
    # Exactly as a user would: plain nats-py, MessagePack body.
    _, reply = await request(nc, "diamond", body(x=x))
    assert "error" not in reply, reply
    outs = {t["name"]: np.frombuffer(t["data"], np.float32) for t in reply["outputs"]}
    np.testing.assert_array_equal(outs["plus_one"], x + 1)
    np.testing.assert_array_equal(outs["sum"], 3 * (x + 1))
    details = (await client.status("ingress")).details
    assert details["workflow_runs"] == 1
    assert details["workflow_stages"] == 4
    # Three intermediates went through the pool, and every lease is gone again.
    pools = (await broker(client))["pools"]["cpu"]
    assert pools["slabs_created"] >= 1
    await no_leases_left(client)


async def test_an_intermediate_waiting_for_a_slow_branch_is_parked_then_read(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await deploy_all(client, *FUNCS, UNEVEN)
    x = np.arange(4, dtype=np.float32)
    _, reply = await request(nc, "uneven", body(x=x))
    assert "error" not in reply, reply
    (out,) = reply["outputs"]
    np.testing.assert_array_equal(np.frombuffer(out["data"], np.float32), 2 * x + 1)
    details = await leases_settle_at(client, 0)
    # a.y was parked while d waited for s (the broker could have spilled it), and
    # unparked before d ran; on a GPU node a full device sends it to host memory.
    assert details["parks"] == 1
    assert details["parked"] == 0


async def test_workflow_outputs_by_handle_belong_to_the_caller(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await deploy_all(client, *FUNCS, DIAMOND)
    x = np.ones(4, np.float32)
    reply = await client.invoke_reply("diamond", {"x": x}, outputs_by=OutputMode.HANDLE)
    assert reply.error is None
    assert all(t.handle is not None for t in reply.outputs)
    # The run released its own references; the caller's keep the outputs alive.
    await leases_settle_at(client, 2)
    await anyio.sleep(0.2)
    assert (await broker(client))["leases"] == 2
    await client.release(reply.outputs)
    await no_leases_left(client)


async def test_a_failing_stage_fails_the_workflow_and_releases_everything(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await deploy_all(client, *FUNCS, FAILING)
    with pytest.raises(GfaasError) as info:
        await client.invoke("failing", {"x": np.ones(3, np.float32)})
    assert info.value.code == "handler_error"
    assert "stage b (boom)" in info.value.reason
    await no_leases_left(client)
    out = await client.invoke("add-one", {"x": np.ones(2, np.float32)})
    assert out["y"].tolist() == [2.0, 2.0]


async def test_a_workflow_over_a_missing_function_is_refused(platform: Platform, nc: NATS) -> None:
    client = Client(nc)
    lonely = msgspec.structs.replace(DIAMOND, name="lonely")
    # Deploy refuses it while a stage's function is missing (test_deploy_checks.py);
    # one removed by force afterwards is refused when the workflow runs.
    with pytest.raises(ValueError, match="not deployed"):
        await deploy_all(client, FUNCS[0], lonely)
    await deploy_all(client, *FUNCS, lonely)
    used = {s.function for s in lonely.stages} - {FUNCS[0].name}
    for name in used:
        assert await client.remove(name, force=True)
    with pytest.raises(GfaasError) as info:
        await client.invoke("lonely", {"x": np.ones(2, np.float32)})
    assert info.value.code == "unknown_function"
    assert "not deployed" in info.value.reason


async def test_a_workflow_is_ready_only_while_every_stage_function_is_deployed(
    platform: Platform, nc: NATS
) -> None:
    # Ready as its stage's function is ready (deployed, ingress serving) on both
    # fronts and in the repository index; one removed by force makes it unready.
    client = Client(nc)
    await deploy_all(client, INC_FIXED, INC_TWICE, handler_check=False)
    grpc = triton.InferenceServerClient(url=f"127.0.0.1:{platform.grpc_port}")

    async def index(http: httpx.AsyncClient, **body: bool) -> dict[str, dict[str, str]]:
        r = await http.post("/v2/repository/index", json=body)
        assert r.status_code == 200, r.text
        return {e["name"]: e for e in r.json()}

    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{platform.http_port}") as http:
            r = await http.get(f"/v2/models/{INC_TWICE.name}/ready")
            assert r.status_code == 200, r.text
            assert grpc.is_model_ready(INC_TWICE.name)
            assert (await index(http))[INC_TWICE.name]["state"] == "READY"
            assert await client.remove(INC_FIXED.name, force=True)
            with anyio.fail_after(5):
                while INC_FIXED.name in (await client.status("ingress")).details["functions"]:
                    await anyio.sleep(0.02)
            r = await http.get(f"/v2/models/{INC_TWICE.name}/ready")
            assert r.status_code == 400, r.text
            assert r.json()["ready"] is False
            assert "'inc-fixed'" in r.json()["error"]
            assert "not deployed" in r.json()["error"]
            assert not grpc.is_model_ready(INC_TWICE.name)
            entry = (await index(http))[INC_TWICE.name]
            assert entry["state"] == "UNAVAILABLE"
            assert "not deployed" in entry["reason"]
            assert INC_TWICE.name not in await index(http, ready=True)
            grpc_index = grpc.get_model_repository_index(as_json=True)["models"]
            (grpc_entry,) = [m for m in grpc_index if m["name"] == INC_TWICE.name]
            assert grpc_entry["state"] == "UNAVAILABLE"
            # Deployed again, the workflow is ready again.
            await deploy_all(client, INC_FIXED, handler_check=False)
            assert (await http.get(f"/v2/models/{INC_TWICE.name}/ready")).status_code == 200
            assert grpc.is_model_ready(INC_TWICE.name)
            assert (await index(http, ready=True))[INC_TWICE.name]["state"] == "READY"
    finally:
        grpc.close()


async def test_deploy_refuses_bad_workflows_and_name_clashes(platform: Platform, nc: NATS) -> None:
    client = Client(nc)
    await deploy_all(client, *FUNCS)
    cyclic = WorkflowSpec(
        name="cyclic",
        stages=[
            StageSpec(name="a", function="echo", inputs={"x": "b.y"}),
            StageSpec(name="b", function="echo", inputs={"x": "a.y"}),
        ],
        outputs={"y": "b.y"},
    )
    with pytest.raises(ValueError, match="cycle"):
        await client.deploy(cyclic)
    with pytest.raises(ValueError, match="already a function"):
        await client.deploy(msgspec.structs.replace(DIAMOND, name="echo"))


async def test_the_example_image_workflow_matches_its_steps(platform: Platform, nc: NATS) -> None:
    client = Client(nc)
    for name, path in write_all(platform.state_dir / "w").items():
        await client.push_model(name, path)
    workflow = load_any(example_workflow_paths()[0])
    assert isinstance(workflow, WorkflowSpec)
    await deploy_all(client, *[load_spec(p) for p in example_spec_paths()], workflow)
    image = np.random.default_rng(3).integers(0, 256, size=(48, 40, 3), dtype=np.uint8)
    pixels = (await client.invoke("preprocess", {"image": image}))["pixels"]
    logits = (await client.invoke("classifier", {"pixels": pixels}))["logits"]
    top = await client.invoke("topk", {"logits": logits})
    whole = await client.invoke(workflow.name, {"image": image})
    np.testing.assert_array_equal(whole["classes"], top["classes"])
    np.testing.assert_allclose(whole["probs"], top["probs"], rtol=1e-5)
    await no_leases_left(client)


@pytest.mark.slow
async def test_soak_thousands_of_workflow_runs_leave_the_pool_at_its_baseline(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    with platform_at(nats_server.url, tmp_path / "s", capacity=32):
        client = Client(nc)
        await deploy_all(client, *FUNCS, DIAMOND)
        x = np.arange(256, dtype=np.float32)
        runs, in_flight = 2000, 16
        done = 0

        async def caller(n: int) -> None:
            nonlocal done
            for _ in range(n):
                out = await client.invoke("diamond", {"x": x})
                assert out["sum"][1] == 6.0
                done += 1

        async with anyio.create_task_group() as tg:
            for _ in range(in_flight):
                tg.start_soon(caller, runs // in_flight)
        assert done == runs
        details = await leases_settle_at(client, 0)
        assert details["bytes_leased"] == 0
        assert details["refused"] == 0
        # Every byte of the pool is free again, in one block per slab: nothing leaked
        # and nothing is fragmented.
        pool = details["pools"]["cpu"]
        assert pool["largest_free"] == pool["held"] // max(pool["slabs"], 1)


async def test_consecutive_stages_stay_on_the_worker_holding_their_inputs(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    # Round robin alone would alternate between the two workers stage by stage. A
    # chain, not the diamond: its two middle stages run at once, and spreading them
    # over both workers is right when one is busier.
    chain = WorkflowSpec(
        name="chain",
        inputs=X,
        stages=[
            StageSpec(name="a", function="add-one", inputs={"x": "$in.x"}),
            StageSpec(name="b", function="add-one", inputs={"x": "a.y"}),
            StageSpec(name="c", function="add-one", inputs={"x": "b.y"}),
        ],
        outputs={"y": "c.y"},
    )
    with platform_at(nats_server.url, tmp_path / "s", workers=2, policy="round_robin"):
        client = Client(nc)
        await deploy_all(client, *FUNCS, chain)
        with anyio.fail_after(10):
            while len((await client.status("scheduler")).details["workers"]) < 2:
                await anyio.sleep(0.05)
        for _ in range(3):
            reply = await client.invoke_reply("chain", {"x": np.ones(4, np.float32)})
            assert reply.error is None
            assert len(set(reply.worker.split(","))) == 1, reply.worker


async def test_a_large_workflow_input_enters_the_pool_once(platform: Platform, nc: NATS) -> None:
    client = Client(nc)
    await deploy_all(client, *FUNCS, DIAMOND)
    x = np.arange(128 * 1024, dtype=np.float32)  # 512 KiB: over POOL_INPUTS_ABOVE
    # Two 512 KiB outputs do not fit one reply: auto sends what must by handle.
    out = await client.invoke("diamond", {"x": x}, outputs_by=OutputMode.AUTO)
    np.testing.assert_array_equal(out["sum"], 3 * (x + 1))
    # Every stage input arrived by handle: a's (the pooled workflow input), b's and
    # c's (a's output), d's two; each checked by the broker, which kept it for the
    # worker while the stage ran (a sibling's failure would have the run release it).
    checks = (await client.status("gpu-worker")).details["handle_checks"]
    assert checks == {"local": 0, "remote": 5}
    await no_leases_left(client)


async def test_small_fixed_intermediates_go_by_value(platform: Platform, nc: NATS) -> None:
    client = Client(nc)
    fixed = [TensorSpec(name="x", dtype=DType.FLOAT32, shape=[1024])]
    double = FunctionSpec(
        name="double-fixed",
        handler="tests.funcs:double",
        inputs=fixed,
        outputs=[TensorSpec(name="y", dtype=DType.FLOAT32, shape=[1024])],
    )
    quad = WorkflowSpec(
        name="quad",
        inputs=fixed,
        stages=[
            StageSpec(name="a", function="double-fixed", inputs={"x": "$in.x"}),
            StageSpec(name="b", function="double-fixed", inputs={"x": "a.y"}),
        ],
        outputs={"y": "b.y"},
    )
    await deploy_all(client, double, quad)
    x = np.arange(1024, dtype=np.float32)
    out = await client.invoke("quad", {"x": x})
    np.testing.assert_array_equal(out["y"], 4 * x)
    # 4 KiB of fixed output: cheaper to carry than to lease, so no handle was made.
    assert (await client.status("gpu-worker")).details["handle_checks"]["local"] == 0
    assert (await broker(client))["pools"]["cpu"]["slabs_created"] == 0


# a's output is small and fixed: it goes to b by value, and is a workflow output too.
FIXED = [TensorSpec(name="x", dtype=DType.FLOAT32, shape=[1, 3])]
INC_FIXED = FunctionSpec(
    name="inc-fixed",
    handler="tests.funcs:add_one",
    inputs=FIXED,
    outputs=[TensorSpec(name="y", dtype=DType.FLOAT32, shape=[1, 3])],
)
INC_TWICE = WorkflowSpec(
    name="inc-twice",
    inputs=FIXED,
    stages=[
        StageSpec(name="a", function="inc-fixed", inputs={"x": "$in.x"}),
        StageSpec(name="b", function="inc-fixed", inputs={"x": "a.y"}),
    ],
    outputs={"mid": "a.y", "z": "b.y"},
)
STALE = np.full(3, -7.0, np.float32).tobytes()


@contextmanager
def output_segments(tag: str) -> Iterator[dict[str, Path]]:
    """One 12-byte system shared-memory segment per INC_TWICE output, holding STALE."""
    segments = {n: Path("/dev/shm") / f"wf-out-{n}-{tag}" for n in ("mid", "z")}
    try:
        for path in segments.values():
            path.write_bytes(STALE)
        yield segments
    finally:
        for path in segments.values():
            path.unlink(missing_ok=True)


def region_contents(segments: dict[str, Path]) -> dict[str, list[float]]:
    return {n: np.frombuffer(p.read_bytes(), np.float32).tolist() for n, p in segments.items()}


async def test_workflow_outputs_asked_for_in_shared_memory_are_written_there_over_http(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await deploy_all(client, INC_FIXED, INC_TWICE)
    x = {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}
    with output_segments(f"http-{platform.http_port}") as segments:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{platform.http_port}") as http:
            for n, path in segments.items():
                registered = await http.post(
                    f"/v2/systemsharedmemory/region/out-{n}/register",
                    json={"key": path.name, "byte_size": 12},
                )
                assert registered.status_code == 200, registered.text
            wanted = [
                {
                    "name": n,
                    "parameters": {
                        "shared_memory_region": f"out-{n}",
                        "shared_memory_byte_size": 12,
                    },
                }
                for n in segments
            ]
            r = await http.post(
                f"/v2/models/{INC_TWICE.name}/infer", json={"inputs": [x], "outputs": wanted}
            )
            assert r.status_code == 200, r.text
            said = {o["name"]: o["parameters"]["shared_memory_region"] for o in r.json()["outputs"]}
            assert said == {"mid": "out-mid", "z": "out-z"}
            # Both are in their regions, mid too (it went to stage b by value).
            assert region_contents(segments) == {"mid": [2.0, 3.0, 4.0], "z": [3.0, 4.0, 5.0]}
            await http.post("/v2/systemsharedmemory/unregister")
    await no_leases_left(client)


async def test_workflow_outputs_asked_for_in_shared_memory_are_written_there_over_grpc(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await deploy_all(client, INC_FIXED, INC_TWICE)

    def infer(segments: dict[str, Path]) -> set[str]:
        grpc = triton.InferenceServerClient(url=f"127.0.0.1:{platform.grpc_port}")
        try:
            for n, path in segments.items():
                grpc.register_system_shared_memory(f"out-{n}", f"/{path.name}", 12)
            inp = triton.InferInput("x", [1, 3], "FP32")
            inp.set_data_from_numpy(np.array([[1, 2, 3]], np.float32))
            outs = []
            for n in segments:
                out = triton.InferRequestedOutput(n)
                out.set_shared_memory(f"out-{n}", 12)
                outs.append(out)
            result = grpc.infer(INC_TWICE.name, [inp], outputs=outs)
            regions = {
                result.get_output(n).parameters["shared_memory_region"].string_param
                for n in segments
            }
            grpc.unregister_system_shared_memory()
            return regions
        finally:
            grpc.close()

    with output_segments(f"grpc-{platform.grpc_port}") as segments:
        regions = await anyio.to_thread.run_sync(infer, segments)
        assert regions == {"out-mid", "out-z"}
        assert region_contents(segments) == {"mid": [2.0, 3.0, 4.0], "z": [3.0, 4.0, 5.0]}
    await no_leases_left(client)


# b declares no outputs: the workflow's z has no dtype or shape to show in metadata.
INC_FREE = FunctionSpec(name="inc-free", handler="tests.funcs:add_one")
HALF_DECLARED = WorkflowSpec(
    name="half-declared",
    inputs=FIXED,
    stages=[
        StageSpec(name="a", function="inc-fixed", inputs={"x": "$in.x"}),
        StageSpec(name="b", function="inc-free", inputs={"x": "a.y"}),
    ],
    outputs={"mid": "a.y", "z": "b.y"},
)


async def test_a_workflow_output_left_out_of_metadata_can_still_be_asked_for(
    platform: Platform, nc: NATS
) -> None:
    """Metadata leaves out z (its stage declares no dtype) but the workflow produces
    it: asking for it by name is not refused as an output the model lacks, on either
    front; a name the workflow has no output of still is, before it runs."""
    await deploy_all(Client(nc), INC_FIXED, INC_FREE, HALF_DECLARED)

    def over_grpc() -> tuple[list[float], str]:
        grpc = triton.InferenceServerClient(url=f"127.0.0.1:{platform.grpc_port}")
        try:
            outputs = grpc.get_model_metadata(HALF_DECLARED.name, as_json=True)["outputs"]
            assert [o["name"] for o in outputs] == ["mid"]
            inp = triton.InferInput("x", [1, 3], "FP32")
            inp.set_data_from_numpy(np.array([[1, 2, 3]], np.float32))
            wanted = [triton.InferRequestedOutput("z")]
            z = grpc.infer(HALF_DECLARED.name, [inp], outputs=wanted).as_numpy("z")
            with pytest.raises(triton.InferenceServerException) as unknown:
                grpc.infer(HALF_DECLARED.name, [inp], outputs=[triton.InferRequestedOutput("q")])
            return z.reshape(-1).tolist(), str(unknown.value)
        finally:
            grpc.close()

    z, refused = await anyio.to_thread.run_sync(over_grpc)
    assert z == [3.0, 4.0, 5.0]
    assert "model 'half-declared' has no output 'q' (outputs: mid, z)" in refused
    x = {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{platform.http_port}") as http:
        r = await http.post(
            f"/v2/models/{HALF_DECLARED.name}/infer",
            json={"inputs": [x], "outputs": [{"name": "z"}]},
        )
    assert r.status_code == 200, r.text
    assert [(o["name"], o["data"]) for o in r.json()["outputs"]] == [("z", [3.0, 4.0, 5.0])]


# f fails at once while s is still running; s hands its output to the run later.
SIBLINGS = WorkflowSpec(
    name="siblings",
    inputs=X,
    stages=[
        StageSpec(name="f", function="boom", inputs={"x": "$in.x"}),
        StageSpec(name="s", function="slow-echo", inputs={"x": "$in.x"}),
        StageSpec(name="d", function="add", inputs={"a": "f.y", "b": "s.y"}),
    ],
    outputs={"y": "d.y"},
)


async def test_outputs_of_a_sibling_that_finishes_after_the_run_failed_are_released(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await deploy_all(client, *FUNCS, SIBLINGS)
    with pytest.raises(GfaasError) as info:
        await client.invoke("siblings", {"x": np.ones(3, np.float32)})
    assert info.value.code == "handler_error"
    assert "stage f (boom)" in info.value.reason
    # The run failed at once, before slow-echo (0.3 s) handed s.y to the run's holder.
    await anyio.sleep(0.8)
    await leases_settle_at(client, 0)


async def test_outputs_of_a_stage_that_finishes_past_the_deadline_are_released(
    platform: Platform, nc: NATS
) -> None:
    # `sleep` runs on the worker's loop once it is known to be quick, where no
    # deadline stops it: the slow call then ends well after the run gave up.
    nap = FunctionSpec(
        name="nap",
        handler="tests.funcs:sleep",
        inputs=[TensorSpec(name="seconds", dtype=DType.FLOAT32, shape=[1])],
    )
    late = WorkflowSpec(
        name="late",
        inputs=nap.inputs,
        stages=[
            StageSpec(name="a", function="nap", inputs={"seconds": "$in.seconds"}),
            StageSpec(name="b", function="echo", inputs={"x": "a.slept"}),
        ],
        outputs={"y": "b.y"},
    )
    client = Client(nc)
    await deploy_all(client, *FUNCS, nap, late)
    for _ in range(3):
        await client.invoke("nap", {"seconds": np.zeros(1, np.float32)})
    with pytest.raises(GfaasError) as info:
        await client.invoke("late", {"seconds": np.full(1, 0.6, np.float32)}, timeout=0.2)
    assert info.value.code == "deadline_exceeded", info.value
    await anyio.sleep(1.0)
    await leases_settle_at(client, 0)


async def test_a_run_holding_more_intermediates_than_one_broker_request_takes(
    platform: Platform, nc: NATS
) -> None:
    # 1,040 intermediates by handle: the run released them in one request, which the
    # broker client refuses past 1,024; the error escaped the run and ended the
    # ingress (its leases went only as the broker reclaimed a dead holder's).
    many = FunctionSpec(name="many", handler="tests.funcs:many_outputs", inputs=X)
    wide = WorkflowSpec(
        name="wide",
        inputs=X,
        stages=[
            StageSpec(name="a", function="many", inputs={"x": "$in.x"}),
            StageSpec(name="b", function="many", inputs={"x": "a.o0"}),
            StageSpec(name="c", function="echo", inputs={"x": "b.o1"}),
        ],
        outputs={"y": "c.y"},
    )
    client = Client(nc)
    echo = next(f for f in FUNCS if f.name == "echo")
    await deploy_all(client, echo, many, wide, handler_check=False)
    out = await client.invoke("wide", {"x": np.arange(3, dtype=np.float32)}, timeout=5)
    assert out["y"].tolist() == [0.0, 1.0, 2.0]
    details = await leases_settle_at(client, 0)
    assert details["reclaimed"] == 0  # released by the run, not reclaimed from the dead
    out = await client.invoke("echo", {"x": np.ones(2, np.float32)}, timeout=2)
    assert out["y"].tolist() == [1.0, 1.0]  # the ingress still serves


async def test_a_run_that_raises_is_answered_and_the_ingress_goes_on(
    platform: Platform, nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # plus_one (a.y) also feeds b and c, so it comes by handle and the ingress copies
    # it out for a caller asking by value. An ingress that cannot map the pool (a CUDA
    # handle, no CUDA here) raised BackendError there: no GfaasError, so it escaped
    # the run and ended the ingress's task group, the whole ingress with it.
    def unmappable(handle: object) -> None:
        raise BackendUnavailable("no CUDA driver here")

    monkeypatch.setattr("shared.dataplane.client.read_bytes", unmappable)
    client = Client(nc)
    wanted = {"add-one", "double", "echo", "add"}
    functions = [f for f in FUNCS if f.name in wanted]
    await deploy_all(client, *functions, DIAMOND, handler_check=False)
    with pytest.raises(GfaasError) as info:
        await client.invoke("diamond", {"x": np.ones(3, np.float32)}, timeout=3)
    assert info.value.code == "internal", info.value
    assert "no CUDA driver here" in info.value.reason
    await no_leases_left(client)
    out = await client.invoke("echo", {"x": np.ones(2, np.float32)}, timeout=2)
    assert out["y"].tolist() == [1.0, 1.0]  # the ingress still serves


async def test_a_run_waiting_for_a_workflow_slot_is_answered_at_its_deadline(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    # One slot, held by a run of about 0.9 s. The second run waited for it without
    # bound: its caller, whose deadline was 0.3 s, was answered only once the first
    # run ended (and its run then sent its first stage past the deadline).
    slow = WorkflowSpec(
        name="slow",
        inputs=X,
        stages=[
            StageSpec(name="a", function="slow-echo", inputs={"x": "$in.x"}),
            StageSpec(name="b", function="slow-echo", inputs={"x": "a.y"}),
            StageSpec(name="c", function="slow-echo", inputs={"x": "b.y"}),
        ],
        outputs={"y": "c.y"},
    )
    with platform_at(nats_server.url, tmp_path / "s", async_concurrency=1):
        client = Client(nc)
        slow_echo = next(f for f in FUNCS if f.name == "slow-echo")
        await deploy_all(client, slow_echo, slow, handler_check=False)
        x = np.ones(2, np.float32)
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.invoke, "slow", {"x": x})
            await anyio.sleep(0.1)  # the first run has the slot
            deadline = int(time.time() * 1000) + 300
            started = time.monotonic()
            msg = await nc.request(
                "gfaas.v1.invoke.slow", body(x=x), timeout=3, headers={H_DEADLINE: str(deadline)}
            )
            waited = time.monotonic() - started
        reply = msgspec.msgpack.decode(msg.data)
        assert reply["error"]["code"] == "deadline_exceeded", reply
        assert "workflow slots" in reply["error"]["reason"]
        assert waited < 0.6, waited


async def test_a_workflow_published_without_a_reply_subject_is_not_run(
    platform: Platform, nc: NATS
) -> None:
    # A function so invoked is not called (invoke_async is for fire-and-forget); a
    # workflow was run all the same, its stages' work and its answer for nobody.
    client = Client(nc)
    wanted = {"add-one", "double", "echo", "add"}
    await deploy_all(client, *[f for f in FUNCS if f.name in wanted], DIAMOND, handler_check=False)
    await nc.publish("gfaas.v1.invoke.diamond", body(x=np.ones(3, np.float32)))
    await nc.flush()
    await anyio.sleep(0.5)
    details = (await client.status("ingress")).details
    assert details["workflow_runs"] == 0
    assert details["workflow_stages"] == 0
    out = await client.invoke("diamond", {"x": np.ones(3, np.float32)}, timeout=3)
    assert out["sum"].tolist() == [6.0, 6.0, 6.0]
    assert (await client.status("ingress")).details["workflow_runs"] == 1


async def test_a_workflow_reply_the_bus_refuses_leaves_the_ingress_and_no_outputs(
    platform: Platform, nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ingress publishes a sync run's reply itself, in its own task group: a publish
    # that raised (the bus down, its buffer full) ended the ingress, and the outputs
    # the caller was to hold by handle stayed leased until their TTL.
    refused = []

    async def full(*args: object, **kwargs: object) -> None:
        refused.append(args)
        raise nats.errors.OutboundBufferLimitError

    monkeypatch.setattr("services.ingress.app.send_reply", full)
    client = Client(nc)
    wanted = {"add-one", "double", "echo", "add"}
    await deploy_all(client, *[f for f in FUNCS if f.name in wanted], DIAMOND, handler_check=False)
    x = {"x": np.ones(3, np.float32)}
    with pytest.raises(GfaasError) as info:
        await client.invoke_reply("diamond", x, outputs_by=OutputMode.HANDLE, timeout=1)
    assert info.value.code == "deadline_exceeded"
    assert len(refused) == 1
    await no_leases_left(client)
    out = await client.invoke("echo", x, timeout=2)
    assert out["y"].tolist() == [1.0, 1.0, 1.0]  # the ingress still serves


async def test_a_workflow_whose_stages_run_on_another_node(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    # Ingress on node `local`, the only worker on node `b`: stage outputs are in b's
    # pool. Every broker op on them went to ingress's own broker, which knows none:
    # unparking b.y for d failed the run (not_found), the caller's reference on a
    # by-handle output could not be taken, and the run's releases were refused, so
    # each run left its intermediates leased at b until their TTL.
    with platform_at(nats_server.url, tmp_path / "s", workers=0) as p:
        url = nats_server.url
        p.start("broker-b", serve_broker, settings_for(url, tmp_path / "b", node="b"))
        worker = settings_for(url, tmp_path / "wb", node="b", worker_id="wb")
        p.start("worker-b", serve_worker, worker)
        client = Client(nc)
        wanted = {"add-one", "double", "echo", "add"}
        functions = [f for f in FUNCS if f.name in wanted]
        await deploy_all(client, *functions, DIAMOND, handler_check=False)
        x = {"x": np.ones(3, np.float32)}
        out = await client.invoke("diamond", x, timeout=5)
        assert out["sum"].tolist() == [6.0, 6.0, 6.0]
        assert out["plus_one"].tolist() == [2.0, 2.0, 2.0]  # read from b's broker
        reply = await client.invoke_reply("diamond", x, outputs_by=OutputMode.HANDLE, timeout=5)
        assert reply.error is None, reply.error
        assert {t.handle.pool for t in reply.outputs if t.handle is not None} == {"b"}
        with anyio.fail_after(5):
            while await leases_on(nc, "b") != 2:  # the caller's two outputs, no more
                await anyio.sleep(0.05)
        await client.release(reply.outputs)  # at b, by their pool
        with anyio.fail_after(5):
            while await leases_on(nc, "b") != 0:
                await anyio.sleep(0.05)


async def test_a_wide_fan_in_of_small_outputs_goes_over_the_bus_limit_by_handle(
    platform: Platform, nc: NATS
) -> None:
    # 17 branches of 64 KiB each, fixed by their spec, so they go by value; together
    # they are over the bus's 1 MiB, and the stage joining them could not be sent
    # (MaxPayloadError: the run failed `internal`).
    ones = FunctionSpec(
        name="ones",
        handler="tests.funcs:ones_64k",
        inputs=X,
        outputs=[TensorSpec(name="y", dtype=DType.FLOAT32, shape=[16384])],
        concurrency=4,
    )
    total = FunctionSpec(name="total", handler="tests.funcs:sum_all", concurrency=4)
    branches = [f"b{i}" for i in range(17)]
    wide = WorkflowSpec(
        name="wide-in",
        inputs=X,
        stages=[
            *(StageSpec(name=b, function="ones", inputs={"x": "$in.x"}) for b in branches),
            StageSpec(name="t", function="total", inputs={b: f"{b}.y" for b in branches}),
        ],
        outputs={"y": "t.y"},
    )
    client = Client(nc)
    await deploy_all(client, ones, total, wide, handler_check=False)
    out = await client.invoke("wide-in", {"x": np.ones(1, np.float32)}, timeout=5)
    assert out["y"].shape == (16384,)
    assert set(out["y"].tolist()) == {17.0}
    await no_leases_left(client)


async def test_a_run_past_its_deadline_sends_no_stage_and_gives_no_outputs(
    platform: Platform, nc: NATS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each stage's bookkeeping made slow (0.5 s), the deadline 0.3 s: stage a ends in
    # time, the rest of the run does not. A one-stage run then answered with its
    # outputs, by handle for a caller already gone, who never releases them; in a
    # two-stage run, b was still sent, only for its worker to refuse it.
    original = _Run._park_unread

    async def slow(self: _Run, stage: str) -> None:
        await original(self, stage)
        await anyio.sleep(0.5)

    monkeypatch.setattr(_Run, "_park_unread", slow)
    one = WorkflowSpec(
        name="one",
        inputs=X,
        stages=[StageSpec(name="a", function="echo", inputs={"x": "$in.x"})],
        outputs={"y": "a.y"},
    )
    two = WorkflowSpec(
        name="two",
        inputs=X,
        stages=[
            StageSpec(name="a", function="echo", inputs={"x": "$in.x"}),
            StageSpec(name="b", function="echo", inputs={"x": "a.y"}),
        ],
        outputs={"y": "b.y"},
    )
    client = Client(nc)
    echo = next(f for f in FUNCS if f.name == "echo")
    await deploy_all(client, echo, one, two, handler_check=False)
    x = np.ones(3, np.float32)
    request = InvokeRequest(
        inputs=[Tensor(name="x", dtype=DType.FLOAT32, shape=[3], data=x.tobytes())],
        outputs_by=OutputMode.HANDLE,
        holder="gone-caller",
    )
    for name, stages in (("one", 1), ("two", 1)):
        before = (await client.status("ingress")).details["workflow_stages"]
        deadline = int(time.time() * 1000) + 300
        # The caller waits longer than its deadline, to hear what the run answers.
        msg = await nc.request(
            f"gfaas.v1.invoke.{name}",
            encode(request),
            timeout=3,
            headers={H_DEADLINE: str(deadline)},
        )
        reply = msgspec.msgpack.decode(msg.data)
        assert reply.get("error") is not None, reply  # not its outputs, too late
        assert reply["error"]["code"] == "deadline_exceeded", reply
        await anyio.sleep(0.3)
        after = (await client.status("ingress")).details["workflow_stages"]
        assert after - before == stages, name
        await no_leases_left(client)

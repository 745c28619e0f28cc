"""Workflows live: stages through the scheduler, intermediates by handle, released."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import numpy as np
import pytest
import tritonclient.grpc as triton
from nats.aio.client import Client as NATS

from examples.specs import example_spec_paths, example_workflow_paths
from examples.weights import write_all
from gfaas.client import Client
from shared.errors import GfaasError
from shared.natsd import NatsServer
from shared.schema import DType, FunctionSpec, OutputMode, StageSpec, TensorSpec, WorkflowSpec
from shared.spec import load_any, load_spec
from tests.helpers import body, request
from tests.platform import Platform, platform_at

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


async def deploy_all(client: Client, *specs: FunctionSpec | WorkflowSpec) -> None:
    for spec in specs:
        await client.deploy(spec)
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

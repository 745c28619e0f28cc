"""GPU paths: run wherever CUDA is present, skip cleanly without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from examples.specs import example_spec_paths
from examples.vision.classifier import Classifier
from examples.weights import make_vision_weights
from services.gpu_worker.device import memory_info, pick_device
from shared.function import LoadContext
from shared.spec import load_spec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_worker_picks_the_gpu_and_reports_its_memory() -> None:
    device = pick_device("auto")
    assert device == "cuda:0"
    mem = memory_info(device)
    assert mem.total > 0
    assert 0 < mem.free <= mem.total


def test_classifier_runs_on_the_gpu_and_matches_the_cpu(tmp_path: Path) -> None:
    spec = next(load_spec(p) for p in example_spec_paths() if p.stem == "classifier")
    weights = make_vision_weights(tmp_path / "cnn.pt")
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        gpu = Classifier(LoadContext(spec=spec, device="cuda:0", weights_path=weights))
        cpu = Classifier(LoadContext(spec=spec, device="cpu", weights_path=weights))
        on_gpu = gpu({"pixels": pixels})["logits"]
        on_cpu = cpu({"pixels": pixels})["logits"]
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-3, atol=1e-3)


async def _outputs_by_handle_on_the_gpu(url: str) -> None:
    import nats
    import numpy as np

    from gfaas.client import Client, outputs_of
    from shared.schema import DType, FunctionKind, FunctionSpec, OutputMode, TensorSpec
    from tests.helpers import deploy_and_wait

    spec = FunctionSpec(
        name="double",
        handler="tests.funcs:double",
        kind=FunctionKind.GPU,
        inputs=[TensorSpec(name="x", dtype=DType.FLOAT32, shape=[1024])],
        outputs=[TensorSpec(name="y", dtype=DType.FLOAT32, shape=[1024])],
    )
    nc = await nats.connect(url)
    try:
        client = Client(nc)
        await deploy_and_wait(nc, spec)
        x = np.arange(1024, dtype=np.float32)
        reply = await client.invoke_reply("double", {"x": x}, outputs_by=OutputMode.HANDLE)
        (out,) = reply.outputs
        assert out.handle is not None
        # A CUDA slab when the broker pools GPU memory (cupy), host memory otherwise.
        assert (out.handle.backend, out.handle.device) in {("cuda", "cuda:0"), ("shm", "cpu")}
        np.testing.assert_array_equal(outputs_of(reply)["y"], x * 2)
        await client.release(reply.outputs)
        broker = (await client.status("memory-broker")).details
        if "cuda:0" in broker["pools"]:
            # An input in host memory reaches the GPU through the broker's copy, on
            # the cpu->cuda:0 link's scheduler.
            arg = await client.put("x", x)
            doubled = await client.invoke("double", [arg])
            np.testing.assert_array_equal(doubled["y"], x * 2)
            links = (await client.status("memory-broker")).details["links"]
            assert links["cpu->cuda:0"]["bytes"] == x.nbytes
            await client.release([arg])
    finally:
        await nc.drain()


def test_outputs_by_handle_on_a_gpu_worker(tmp_path: Path) -> None:
    import anyio

    from shared.natsd import nats_server
    from tests.platform import platform_at

    with nats_server(tmp_path / "nats") as server, platform_at(server.url, tmp_path / "s"):
        anyio.run(_outputs_by_handle_on_the_gpu, server.url)

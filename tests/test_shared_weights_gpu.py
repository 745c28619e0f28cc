"""Shared read-only weights on a real GPU (issue 9): one device copy per model that
the agent exports over CUDA IPC and every instance of the model maps. Skipped
without CUDA; scripts/gpu_check.sh runs them on a device."""

from __future__ import annotations

import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from nats.aio.client import Client as NATS

from bench.live_models import mlp, write_mlp
from gfaas.client import Client
from shared.modelswap import HostTier
from shared.modelswap.device_share import DeviceCopies
from shared.modelswap.pipeline import instantiate
from shared.natsd import NatsServer
from shared.schema import encode
from tests.helpers import agent_details
from tests.platform import PYTHON, Platform, platform_at, subprocess_env
from tests.test_shared_weights import two_answering_instances

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

MB = 1024 * 1024


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[tuple[HostTier, Path]]:
    weights = tmp_path / "m8.pt"
    write_mlp(weights, 8, seed=5)
    host_tier = HostTier(f"gfaas-swg{tmp_path.name[-6:]}-model-")
    try:
        yield host_tier, weights
    finally:
        host_tier.purge()


def test_a_device_copy_opened_in_another_process_is_the_models_weights(
    tier: tuple[HostTier, Path], tmp_path: Path
) -> None:
    host_tier, weights = tier
    host = host_tier.get_or_load("m8", "d1", lambda: weights)
    copies = DeviceCopies()
    exported = copies.hold("p1", host, "cuda:0")
    assert copies.hold("p2", host, "cuda:0").segment == exported.segment
    assert copies.made == 1
    assert copies.report() == {"m8": {"bytes": host.segment_bytes, "copies": 1, "holders": 2}}
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(1))
    expected, _ = instantiate(lambda: mlp(8), host, "cpu", pipelined=False)
    with torch.inference_mode():
        want = expected(x)
    (tmp_path / "export.msgpack").write_bytes(encode(exported))
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from bench.live_models import mlp
        from shared.modelswap import HostTier
        from shared.modelswap.pipeline import instantiate
        from shared.schema import DeviceWeights, decode
        exported = decode(open({str(tmp_path / "export.msgpack")!r}, "rb").read(), DeviceWeights)
        host = HostTier({host_tier.prefix!r}).cached("m8", "d1")
        model, landed = instantiate(
            lambda: mlp(8), host, "cuda:0", shared=True, device_weights=exported
        )
        assert landed.done and not landed.groups
        before = torch.cuda.memory_allocated()
        x = torch.load({str(tmp_path / "x.pt")!r}).cuda()
        with torch.inference_mode():
            y = model(x)
        torch.save(y.cpu(), {str(tmp_path / "y.pt")!r})
        # Its weights are the agent's copy: this process allocated none of them.
        print("own", before)
        """
    )
    done = subprocess.run(
        [PYTHON, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "own 0" in done.stdout, done.stdout
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want, rtol=1e-4, atol=1e-5)
    copies.release("p1")
    assert copies.report()["m8"]["holders"] == 1
    copies.release("p2")
    assert copies.report() == {}


@pytest.fixture
def gpu_platform(nats_server: NatsServer, tmp_path: Path) -> Iterator[Platform]:
    with platform_at(
        nats_server.url, tmp_path / "state", device="cuda:0", agent_memory_mb=400
    ) as p:
        yield p


@pytest.mark.nats
@pytest.mark.anyio
async def test_two_cuda_instances_of_one_function_share_one_device_copy(
    gpu_platform: Platform, nc: NATS, tmp_path: Path
) -> None:
    # As on a CPU, only one copy lets both 150 MiB budgets fit in 400 MiB.
    await two_answering_instances(nc, tmp_path, "mlp-shared-g", ready_s=120, tolerance=1e-5)
    client = Client(nc)
    agent = await agent_details(client)
    assert agent["shares_weights"] is True
    copies = agent["device_copies"]
    assert list(copies) == ["m40"]
    assert copies["m40"]["copies"] == 1
    assert copies["m40"]["holders"] == 2
    assert 40 * MB < copies["m40"]["bytes"] < 41 * MB

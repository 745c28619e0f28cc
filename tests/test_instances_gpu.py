"""Function instances on a real GPU (issue 8): memory caps and MPS shares enforced.
Skipped without CUDA; scripts/gpu_check.sh runs them on a device."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest
import torch
from nats.aio.client import Client as NATS

from gfaas.client import Client
from shared.errors import GfaasError
from shared.natsd import NatsServer
from shared.schema import DType, ErrorCode, FunctionKind, FunctionSpec, TensorSpec
from tests.helpers import agent_details, deploy_and_wait
from tests.platform import Platform, platform_at

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.nats,
    pytest.mark.anyio,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

MB_IN = [TensorSpec(name="mb", dtype=DType.FLOAT32, shape=[1])]


@pytest.fixture
def gpu_platform(nats_server: NatsServer, tmp_path: Path) -> Iterator[Platform]:
    with platform_at(
        nats_server.url, tmp_path / "state", device="cuda:0", agent_memory_mb=8192
    ) as p:
        yield p


async def test_an_instance_cannot_allocate_past_its_memory_budget(
    gpu_platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    spec = FunctionSpec(
        name="alloc-g",
        handler="tests.funcs:allocate",
        kind=FunctionKind.GPU,
        memory_mb=1024,
        max_instances=1,
        inputs=MB_IN,
    )
    await deploy_and_wait(nc, spec)
    small = await client.invoke("alloc-g", {"mb": np.array([256.0], dtype=np.float32)}, timeout=60)
    assert int(small["bytes"][0]) == 256 * 1024 * 1024
    with pytest.raises(GfaasError) as err:
        await client.invoke("alloc-g", {"mb": np.array([4096.0], dtype=np.float32)}, timeout=60)
    assert err.value.code is ErrorCode.HANDLER_ERROR
    assert "memory" in err.value.reason.lower()


async def test_mps_shares_slow_a_compute_bound_instance_in_proportion(
    gpu_platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    spatial = str((await agent_details(client))["spatial"])
    if spatial != "mps":
        pytest.skip(f"MPS is not available on this node: {spatial}")
    specs = [
        FunctionSpec(
            name=f"mm-{int(share * 100)}",
            handler="bench.sharing_funcs:gpu_big",
            kind=FunctionKind.GPU,
            sm_share=share,
            time_quota=1.0,
            min_instances=1,
            max_instances=1,
            slo_ms=60_000,
            memory_mb=1024,
        )
        for share in (0.25, 1.0)
    ]
    # One at a time (each alone on the device): the share, not contention, is measured.
    took = {}
    for spec in specs:
        await deploy_and_wait(nc, spec)
        x = {"x": np.array([0.0], dtype=np.float32)}
        await client.invoke(spec.name, x, timeout=120)  # warm: context, kernels
        started = time.perf_counter()
        for _ in range(10):
            await client.invoke(spec.name, x, timeout=120)
        took[spec.name] = time.perf_counter() - started
        await client.remove(spec.name, force=True)
        await anyio.sleep(0.5)
    slowdown = took["mm-25"] / took["mm-100"]
    print(f"25% of the SMs vs all: {slowdown:.2f}x the time ({took})")
    assert slowdown > 1.8, took


async def test_a_gpu_profile_measures_each_sm_share_under_mps(
    gpu_platform: Platform, nc: NATS
) -> None:
    """Under MPS each SM share of the grid is profiled in a process with that share
    (Agent.profile_per_share): a compute-bound function's rows at a quarter of the
    SMs are slower than at all of them, measured, not scaled."""
    client = Client(nc)
    spatial = str((await agent_details(client))["spatial"])
    if spatial != "mps":
        pytest.skip(f"MPS is not available on this node: {spatial}")
    spec = FunctionSpec(
        name="mm-prof",
        handler="bench.sharing_funcs:gpu_big",
        kind=FunctionKind.GPU,
        max_instances=1,
        memory_mb=1024,
        inputs=[TensorSpec(name="x", dtype=DType.FLOAT32, shape=[1])],
    )
    await deploy_and_wait(nc, spec)
    profile = await client.profile("mm-prof", timeout=300)
    assert profile.spatial == "mps"
    p50 = {(r.sm_share, r.time_quota): r.p50_ms for r in profile.rows}
    assert {s for s, _ in p50} == {0.25, 0.5, 1.0}, p50
    print(f"p50 ms by (SM share, quota): {p50}")
    assert p50[(0.25, 1.0)] > 1.5 * p50[(1.0, 1.0)], p50

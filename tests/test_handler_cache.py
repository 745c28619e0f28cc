"""The worker's device tier on its own (no NATS): loads under way are reported and pinned."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import torch

from services.gpu_worker.models import HandlerCache
from shared.errors import GfaasError
from shared.modelswap import HostTier, tier_prefix
from shared.schema import FunctionSpec
from tests import funcs

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

MIB = 1024 * 1024


@pytest.fixture
def tier() -> Iterator[HostTier]:
    host = HostTier(tier_prefix(f"gfaas-t{secrets.token_hex(4)}"))
    try:
        yield host
    finally:
        host.purge()


def weights(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.pt"
    torch.save({"factor": torch.ones(MIB // 4)}, path)  # 1 MiB
    return path


async def test_a_model_being_loaded_is_reported_and_never_evicted(
    tier: HostTier, tmp_path: Path
) -> None:
    async def fetch(name: str) -> Path:
        return weights(tmp_path, name)

    cache = HandlerCache(
        device="cpu", threads=1, capacity_bytes=MIB + MIB // 2, fetch_weights=fetch, host_tier=tier
    )
    slow = FunctionSpec(name="slow", handler="tests.funcs:GatedScale", model="a")
    other = FunctionSpec(name="other", handler="tests.funcs:Scale", model="b")
    funcs.BUILD_GATE.clear()
    async with anyio.create_task_group() as tg:

        async def load_slow() -> None:
            async with cache.use(slow):
                pass

        tg.start_soon(load_slow)
        with anyio.fail_after(10):
            while cache.report().loading != ["a"]:
                await anyio.sleep(0.01)
        assert cache.report().sizes == {"a": MIB}
        # "a" is half-built: "b" must wait for memory, not evict it.
        with pytest.raises(GfaasError) as info:
            async with cache.use(other, wait_s=0.2):
                pass
        assert info.value.code == "deadline_exceeded"
        assert "in use" in info.value.reason
        assert cache.report().sizes == {"a": MIB}

        async def load_other() -> None:
            async with cache.use(other):
                pass

        # Without a deadline "b" queues, and loads once "a" is built and released.
        tg.start_soon(load_other)
        with anyio.fail_after(10):
            while cache.room_waits < 2:
                await anyio.sleep(0.01)
        assert cache.loads == 0
        funcs.BUILD_GATE.set()
    report = cache.report()
    assert (report.sizes, report.loading) == ({"b": MIB}, [])
    assert report.load_s["b"] > 0.0
    assert cache.loads == 2
    assert cache.evictions == 1

"""The worker's tiers live: device cache eviction, host tier reuse, bad models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from examples.specs import example_spec_paths
from examples.text.tokenize import tokenize
from examples.weights import write_all
from gfaas.client import Client
from shared.dataplane.shm import list_segments
from shared.errors import GfaasError
from shared.modelswap import tier_prefix
from shared.modelswap.host_tier import LOCK_DIR
from shared.natsd import NatsServer
from shared.spec import load_spec
from tests.helpers import deploy_and_wait
from tests.platform import Platform, platform_at

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

SPECS = {load_spec(p).name: load_spec(p) for p in example_spec_paths()}
PIXELS = np.zeros((1, 3, 64, 64), np.float32)


@pytest.fixture
def small_cache(nats_server: NatsServer, tmp_path: Path) -> Iterator[Platform]:
    # 13 MiB: the 12.3 MB classifier and the 1.8 MB encoder do not fit together.
    with platform_at(nats_server.url, tmp_path / "s", device_cache_mb=13) as p:
        yield p


async def push_examples(client: Client, tmp_path: Path) -> None:
    for name, path in write_all(tmp_path / "w").items():
        await client.push_model(name, path)


async def worker_details(client: Client) -> dict[str, object]:
    return (await client.status("gpu-worker")).details


async def test_eviction_keeps_the_device_cache_within_its_size(
    small_cache: Platform, nc: NATS, tmp_path: Path
) -> None:
    client = Client(nc)
    await push_examples(client, tmp_path)
    await deploy_and_wait(nc, SPECS["classifier"], SPECS["text-encoder"])
    first = await client.invoke("classifier", {"pixels": PIXELS})
    await client.invoke("text-encoder", {"tokens": tokenize("evict the cnn")})
    details = await worker_details(client)
    assert details["models"] == ["text-encoder"]
    assert details["evictions"] == 1
    again = await client.invoke("classifier", {"pixels": PIXELS})
    np.testing.assert_allclose(again["logits"], first["logits"], rtol=1e-5)
    details = await worker_details(client)
    # The second swap-in of the CNN came from the host tier, not the object store.
    assert details["host_tier_loads"] == 2
    assert details["model_loads"] == 3
    cache = details["device_cache"]
    assert isinstance(cache, dict)
    assert cache["used"] <= cache["capacity"]


async def test_model_bigger_than_the_device_is_refused_clearly(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    with platform_at(nats_server.url, tmp_path / "s", device_cache_mb=4):
        client = Client(nc)
        await push_examples(client, tmp_path)
        await deploy_and_wait(nc, SPECS["classifier"], SPECS["noop"])
        with pytest.raises(GfaasError) as info:
            await client.invoke("classifier", {"pixels": PIXELS})
        assert info.value.code == "model_unavailable"
        assert "vision-cnn" in info.value.reason or "classifier" in info.value.reason
        out = await client.invoke("noop", {"x": np.ones(2, np.float32)})
        assert out["y"].tolist() == [1.0, 1.0]


async def test_corrupt_weights_give_model_unavailable(
    platform: Platform, nc: NATS, tmp_path: Path
) -> None:
    client = Client(nc)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file" * 100)
    await client.push_model("vision-cnn", garbage)
    await deploy_and_wait(nc, SPECS["classifier"])
    with pytest.raises(GfaasError) as info:
        await client.invoke("classifier", {"pixels": PIXELS})
    assert info.value.code == "model_unavailable"
    assert "cannot be read" in info.value.reason
    with anyio.fail_after(5):
        assert (await worker_details(client))["inflight"] == 0


async def test_host_tier_segments_do_not_outlive_the_platform(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    namespace = "gfaas-tier-cleanup"
    with platform_at(nats_server.url, tmp_path / "s", shm_namespace=namespace):
        client = Client(nc)
        await push_examples(client, tmp_path)
        await deploy_and_wait(nc, SPECS["text-encoder"])
        await client.invoke("text-encoder", {"tokens": tokenize("stay in shared memory")})
        assert len(list_segments(tier_prefix(namespace))) == 1
    assert list_segments(tier_prefix(namespace)) == []
    assert list(LOCK_DIR.glob(f"{tier_prefix(namespace)}*")) == []

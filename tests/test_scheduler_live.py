"""The live scheduler runs the simulator's policies on views built from heartbeats."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from examples.specs import example_spec_paths
from examples.text.tokenize import tokenize
from examples.weights import write_all
from gfaas.client import Client
from shared import subjects
from shared.errors import GfaasError
from shared.natsd import NatsServer
from shared.schema import FunctionSpec
from shared.spec import load_spec
from tests.helpers import deploy_and_wait
from tests.platform import Platform, platform_at
from tests.specs import ECHO

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

SPECS = {load_spec(p).name: load_spec(p) for p in example_spec_paths()}
PIXELS = np.zeros((1, 3, 64, 64), np.float32)
TOKENS = tokenize("keep me warm")
# Sleeps as long as asked; an SLO of 5 ms that a 50 ms call can never meet.
SLOW = FunctionSpec(name="slow", handler="tests.funcs:sleep", slo_ms=5.0, concurrency=4)


@pytest.fixture
def locality(nats_server: NatsServer, tmp_path: Path) -> Iterator[Platform]:
    # 13 MiB per worker: the 12.3 MB CNN and the 1.8 MB encoder never fit together.
    with platform_at(
        nats_server.url, tmp_path / "s", workers=2, device_cache_mb=13, policy="locality"
    ) as p:
        yield p


@pytest.fixture
def slo(nats_server: NatsServer, tmp_path: Path) -> Iterator[Platform]:
    with platform_at(nats_server.url, tmp_path / "s", workers=2, policy="slo") as p:
        yield p


async def scheduler_details(client: Client) -> dict[str, Any]:
    return (await client.status("scheduler")).details


async def settled(client: Client) -> dict[str, Any]:
    """The scheduler's details once it has seen every invocation it sent finish."""
    while True:
        details = await scheduler_details(client)
        if not any(w["outstanding"] for w in details["workers"].values()):
            return details
        await anyio.sleep(0.01)


async def test_locality_sends_each_model_to_the_worker_that_holds_it(
    locality: Platform, nc: NATS, tmp_path: Path
) -> None:
    client = Client(nc)
    for name, path in write_all(tmp_path / "w").items():
        await client.push_model(name, path)
    await deploy_and_wait(nc, SPECS["classifier"], SPECS["text-encoder"])
    served: dict[str, set[str]] = {"classifier": set(), "text-encoder": set()}
    for _ in range(6):
        reply = await client.invoke_reply("classifier", {"pixels": PIXELS})
        assert reply.error is None
        served["classifier"].add(reply.worker)
        reply = await client.invoke_reply("text-encoder", {"tokens": TOKENS})
        assert reply.error is None
        served["text-encoder"].add(reply.worker)
    # Each model stayed on one worker, and not the same one: one load each, no thrashing.
    assert len(served["classifier"]) == 1
    assert len(served["text-encoder"]) == 1
    assert served["classifier"] != served["text-encoder"]
    details = await Client(nc).statuses("gpu-worker", expect=2)
    assert len(details) == 2
    assert sum(d["model_loads"] for d in details.values()) == 2
    assert sum(d["evictions"] for d in details.values()) == 0
    assert sum(d["model_hits"] for d in details.values()) == 10
    # The scheduler learned the sizes it placed by (object store, then heartbeats).
    sizes = (await scheduler_details(client))["model_bytes"]
    assert sizes["vision-cnn"] > 12_000_000
    assert 1_000_000 < sizes["text-encoder"] < 2_000_000


async def test_slo_refuses_a_function_no_worker_can_serve_in_time_and_serves_the_rest(
    slo: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await deploy_and_wait(nc, SLOW, ECHO)
    half = {"seconds": np.array(0.05, np.float64)}
    # Unprofiled, calls run: the scheduler cannot predict them until one has run
    # warm (the first one also loaded the handler, which says nothing of its speed).
    with anyio.fail_after(10):
        while "slow" not in (await settled(client))["exec_ms"]:
            await client.invoke("slow", half)
    details = await Client(nc).statuses("gpu-worker", expect=2)
    assert len(details) == 2
    completed = sum(d["completed"] for d in details.values())
    for _ in range(3):
        with pytest.raises(GfaasError) as info:
            await client.invoke("slow", half)
        assert info.value.code == "overloaded"
        assert "'slow' cannot meet its SLO of 5 ms" in info.value.reason
        out = await client.invoke("echo", {"x": np.arange(3, dtype=np.float32)})
        assert out["y"].tolist() == [0.0, 1.0, 2.0]
    # The refused calls never reached a worker; the echoes did (a worker counts a
    # call before it tells the scheduler, so once the scheduler has settled, they agree).
    await settled(client)
    details = await Client(nc).statuses("gpu-worker", expect=2)
    assert len(details) == 2
    assert sum(d["completed"] for d in details.values()) == completed + 3
    assert (await scheduler_details(client))["rejected"] == 3


async def test_heartbeats_carry_the_device_tier(locality: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, ECHO)
    await Client(nc).invoke("echo", {"x": np.ones(3, np.float32)})
    sub = await nc.subscribe(subjects.HEARTBEAT_ALL)
    with anyio.fail_after(5):
        while True:
            raw = msgspec.msgpack.decode((await sub.next_msg(timeout=5)).data)
            if "echo" in raw.get("model_bytes", {}):
                break
    await sub.unsubscribe()
    assert raw["cache_capacity"] == 13 * 1024 * 1024
    assert raw["model_bytes"]["echo"] == 0
    assert raw["model_load_s"]["echo"] > 0.0

"""Spill and prefetch: parked intermediates leave a full device pool for host memory,
furthest next reader first, and come back before their reader runs.

Library level (the broker's NodePools) with two shared-memory pools standing in for
a device and host memory: the same code moves device slabs on a GPU node."""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from gfaas.client import Client
from services.memory_broker.pools import NodePools
from shared.dataplane.backend import tensor_from_handle
from shared.dataplane.client import BrokerClient
from shared.dataplane.elastic import ElasticConfig
from shared.dataplane.leases import Fault, LeaseError
from shared.dataplane.shm import ShmBackend
from shared.errors import GfaasError
from shared.natsd import NatsServer
from shared.schema import Handle
from tests.platform import platform_at

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

MB = 1024 * 1024
DEV = "dev:0"


class InPlace:
    """The pools' links, copying in place with whatever copy a test gives."""

    def __init__(self) -> None:
        self.copy: Callable[[Handle, Handle], Awaitable[None]] = memcpy

    async def move(self, src: Handle, dst: Handle) -> None:
        await self.copy(src, dst)


@pytest.fixture
def link() -> InPlace:
    return InPlace()


@pytest.fixture
def pools(link: InPlace) -> Iterator[NodePools]:
    prefix = f"gfaas-test-spill-{os.getpid()}-"
    p = NodePools(node="t", instance="i", default_ttl_s=60.0, links=link)
    p.add_device(DEV, ShmBackend(DEV, prefix=prefix), ElasticConfig(slab_size=MB, max_bytes=2 * MB))
    p.add_device("cpu", ShmBackend(prefix=prefix), ElasticConfig(slab_size=MB, max_bytes=64 * MB))
    try:
        yield p
    finally:
        p.close()


def lease(pools: NodePools, fill: int) -> Handle:
    (h,) = pools.lease([MB], DEV, "run", "default", 0.0, now=0.0)
    tensor_from_handle(h, "uint8", [MB]).fill_(fill)
    return h


async def memcpy(src: Handle, dst: Handle) -> None:
    """What the broker does through its link scheduler, done in place here."""
    copies.append((src.device, dst.device))
    tensor_from_handle(dst, "uint8", [dst.nbytes]).copy_(
        tensor_from_handle(src, "uint8", [src.nbytes])
    )


copies: list[tuple[str, str]] = []


def content(h: Handle) -> set[int]:
    return set(np.unique(tensor_from_handle(h, "uint8", [h.nbytes]).numpy()).tolist())


async def test_a_full_device_spills_parked_data_furthest_next_use_first(pools: NodePools) -> None:
    a, b = lease(pools, 1), lease(pools, 2)
    with pytest.raises(LeaseError) as refused:  # full, and nothing may move
        await pools.lease_or_spill([MB], DEV, "run", "default", 0.0, 0.0)
    assert refused.value.fault is Fault.EXHAUSTED
    pools.park([a], "run", "default", next_use=math.inf)  # no reader queued
    pools.park([b], "run", "default", next_use=5.0)  # a reader due at t=5
    (c,) = await pools.lease_or_spill([MB], DEV, "run", "default", 0.0, 1.0)
    assert c.device == DEV
    moved = {x.lease_id: x for x in pools.table}
    assert moved[a.lease_id].device == "cpu"  # furthest next use went
    assert moved[b.lease_id].device == DEV
    # Parked data is never read, wherever it is.
    with pytest.raises(LeaseError) as parked:
        pools.check([a], "default")
    assert parked.value.fault is Fault.PARKED
    assert pools.stats()["spills"] == 1


async def test_unparking_brings_data_back_intact_making_room_if_needed(pools: NodePools) -> None:
    a, b = lease(pools, 1), lease(pools, 2)
    # a is needed last, so it is the one spilled for c (lease ids are random: the
    # order must not rest on them).
    pools.park([a], "run", "default", next_use=math.inf)
    pools.park([b], "run", "default", next_use=1e9)
    (c,) = await pools.lease_or_spill([MB], DEV, "run", "default", 0.0, 1.0)
    (back,) = await pools.unpark([a], "run", "default")
    # The device held b (parked) and c (in use): b made room for a.
    assert back.device == DEV
    assert content(back) == {1}
    assert {x.lease_id: x.device for x in pools.table}[b.lease_id] == "cpu"
    pools.check([back], "default")
    with pytest.raises(LeaseError) as stale:  # the old place is not readable
        pools.check([a], "default")
    assert stale.value.fault is Fault.STALE
    # No room on the device and nothing parked there: b is readable in host memory.
    (b_now,) = await pools.unpark([b], "run", "default")
    assert b_now.device == "cpu"
    assert content(b_now) == {2}
    pools.check([b_now], "default")
    # References still work with the handles minted before the moves.
    pools.release([a, b, c], "run", "default", now=3.0)
    assert len(pools.table) == 0
    assert pools.table.usage(DEV).bytes_leased == 0
    assert pools.table.usage("cpu").bytes_leased == 0


async def test_data_whose_reader_is_due_is_prefetched_ahead_of_it(pools: NodePools) -> None:
    a, b = lease(pools, 1), lease(pools, 2)
    pools.park([a], "run", "default", next_use=math.inf)
    (c,) = await pools.lease_or_spill([MB], DEV, "run", "default", 0.0, 1.0)
    assert {x.lease_id: x.device for x in pools.table}[a.lease_id] == "cpu"
    await pools.prefetch(1.5)  # no room on the device: a stays in host memory
    pools.release([c], "run", "default", now=2.0)
    pools.park([a], "run", "default", next_use=10.0)  # its reader is due at t=10
    await pools.prefetch(2.0)  # not within the horizon yet
    assert {x.lease_id: x.device for x in pools.table}[a.lease_id] == "cpu"
    assert await pools.prefetch(9.5) == 1
    assert {x.lease_id: x.device for x in pools.table}[a.lease_id] == DEV
    assert pools.stats()["restores"] == 1
    (back,) = await pools.unpark([a], "run", "default")
    assert content(back) == {1}
    pools.release([back, b], "run", "default", now=10.0)


async def test_only_a_holder_parks_and_nothing_unparked_moves(pools: NodePools) -> None:
    a = lease(pools, 1)
    with pytest.raises(LeaseError) as not_holder:
        pools.park([a], "stranger", "default", next_use=math.inf)
    assert not_holder.value.fault is Fault.NOT_HOLDER
    with pytest.raises(LeaseError) as foreign:
        pools.park([a], "run", "other-tenant", next_use=math.inf)
    assert foreign.value.fault is Fault.FOREIGN_TENANT
    with pytest.raises(LeaseError) as in_use:
        pools.table.relocate(a.lease_id, "cpu")
    assert in_use.value.fault is Fault.PARKED


async def test_a_lease_released_during_its_move_frees_both_places_after_the_copy(
    pools: NodePools, link: InPlace
) -> None:
    a, b = lease(pools, 1), lease(pools, 2)
    pools.park([a], "run", "default", next_use=math.inf)

    async def release_meanwhile(src: Handle, dst: Handle) -> None:
        pools.release([a], "run", "default", now=1.0)  # an op served during the copy
        # Neither place may be handed out while the copy still writes.
        assert pools.table.usage("cpu").alloc.used == MB
        await memcpy(src, dst)

    link.copy = release_meanwhile
    (c,) = await pools.lease_or_spill([MB], DEV, "run", "default", 0.0, 1.0)
    assert pools.table.usage("cpu").alloc.used == 0
    pools.release([b, c], "run", "default", now=2.0)
    assert pools.table.usage(DEV).alloc.used == 0


async def test_a_failed_copy_leaves_the_lease_where_it_was(pools: NodePools, link: InPlace) -> None:
    a, _ = lease(pools, 1), lease(pools, 2)
    pools.park([a], "run", "default", next_use=math.inf)

    async def broken(src: Handle, dst: Handle) -> None:
        raise RuntimeError("link failed")

    link.copy = broken
    with pytest.raises(RuntimeError):
        await pools.lease_or_spill([MB], DEV, "run", "default", 0.0, 1.0)
    link.copy = memcpy
    (back,) = await pools.unpark([a], "run", "default")
    place = (back.device, back.segment, back.offset, back.generation)
    assert place == (a.device, a.segment, a.offset, a.generation)
    assert content(back) == {1}
    assert pools.table.usage("cpu").alloc.used == 0


# -- through the live broker, with an emulated device pool beside host memory --------------


@pytest.mark.nats
async def test_the_broker_spills_and_brings_back_over_its_link_scheduler(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    overrides = {"pool_devices": "emu:0", "pool_cap_mb": 2, "host_pool_cap_mb": 64, "slab_mb": 1}
    with platform_at(nats_server.url, tmp_path / "s", workers=0, **overrides):
        client = Client(nc)
        broker = BrokerClient(nc, "local")
        with anyio.fail_after(10):
            while True:
                try:
                    a, b = await broker.lease([MB, MB], owner="run", device="emu:0")
                    break
                except GfaasError:  # the broker is still starting
                    await anyio.sleep(0.05)
        for h, fill in ((a, 1), (b, 2)):
            tensor_from_handle(h, "uint8", [MB]).fill_(fill)
        with pytest.raises(GfaasError) as full:
            await broker.lease([MB], owner="run", device="emu:0")
        assert full.value.code == "overloaded"
        await broker.park([a], "run", "default", wait=False)
        (c,) = await broker.lease([MB], owner="run", device="emu:0")  # a made room
        (a_now,) = await broker.unpark([a], "run", "default")
        assert a_now.device == "cpu"  # b and c are in use: a is read from host memory
        assert content(a_now) == {1}
        await broker.park([a_now, b], "run", "default", wait=False)
        (a_back,) = await broker.unpark([a_now], "run", "default")
        assert a_back.device == "emu:0"  # b went to host memory to make room
        assert content(a_back) == {1}
        details = (await client.status("memory-broker")).details
        assert (details["spills"], details["restores"]) == (2, 1)
        links = details["links"]
        assert links["emu:0->cpu"]["bytes_by_flow"] == {"gfaas-spill": 2 * MB}
        assert links["cpu->emu:0"]["bytes_by_flow"] == {"gfaas-spill": MB}
        await broker.release([a, b, c], "run", "default")
        assert (await client.status("memory-broker")).details["leases"] == 0

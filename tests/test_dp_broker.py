"""The broker's ops against its own pools and links (the real copier threads),
wired as app.py wires them but without the bus: a copy's source released mid-copy,
batch releases with a stale handle, duplicate transfers, empty owners, mapping
pruning and caller mistakes (the defects a review of the data plane found)."""

from __future__ import annotations

import math
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from services.memory_broker.app import Broker
from services.memory_broker.handlers import Handlers
from services.memory_broker.links import Links
from services.memory_broker.pools import NodePools
from shared.config import Settings
from shared.dataplane.backend import (
    BackendUnavailable,
    SlabRef,
    select_backend,
    tensor_from_handle,
)
from shared.dataplane.bandwidth import Mode
from shared.dataplane.board import board_name
from shared.dataplane.client import BrokerClient
from shared.dataplane.cuda import cuda_available
from shared.dataplane.elastic import ElasticConfig
from shared.dataplane.shm import ShmBackend, list_segments, unlink_segment
from shared.errors import GfaasError
from shared.schema import (
    CopyRequest,
    ErrorCode,
    Handle,
    LeaseRequest,
    ReadRequest,
    ReleaseRequest,
    RetainRequest,
    TransferRequest,
)

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

MB = 1024 * 1024
N = 8 * MB


@pytest.fixture
async def broker() -> AsyncIterator[Handlers]:
    prefix = f"gfaas-test-dpb-{os.getpid()}-"
    # Small chunks: a copy takes many turns of the copier, so a test acts during it.
    links = Links(chunk_bytes=4096, mode=Mode.FAIR)
    pools = NodePools(node="n", instance="i", default_ttl_s=60.0, links=links)
    config = ElasticConfig(slab_size=N, max_bytes=2 * N)
    pools.add_device("cpu", ShmBackend("cpu", prefix=prefix), config)
    pools.add_device("emu:0", ShmBackend("emu:0", prefix=prefix), config)
    try:
        yield Handlers(pools, links, max_payload=MB)
    finally:
        links.close()
        pools.close()
        for name in list_segments(prefix):
            unlink_segment(name)


async def test_a_source_released_during_its_copy_is_not_leased_to_another_tenant(
    broker: Handlers,
) -> None:
    lease_a = LeaseRequest(sizes=[N], owner="prod-a", device="cpu")
    (src,) = (await broker.lease(lease_a, "tenant-a")).handles
    tensor_from_handle(src, "uint8", [N]).fill_(0xAA)
    async with anyio.create_task_group() as tg:
        copied: list[np.ndarray] = []

        async def copy() -> None:
            request = CopyRequest(source=src, device="emu:0", owner="w")
            (dst,) = (await broker.copy(request, "tenant-a")).handles
            copied.append(tensor_from_handle(dst, "uint8", [N]).numpy().copy())

        tg.start_soon(copy)
        with anyio.fail_after(10):
            while not (c := broker.links.copiers.get("cpu->emu:0")) or not (
                c.scheduler.stats().bytes_done
            ):
                await anyio.sleep(0.001)
        assert c.scheduler.stats().bytes_done < N  # still copying
        await broker.release(ReleaseRequest(handles=[src], holder="prod-a"), "tenant-a")
        # Another tenant leases that size now: not the block the copy still reads.
        lease_b = LeaseRequest(sizes=[N], owner="prod-b", device="cpu")
        (b,) = (await broker.lease(lease_b, "tenant-b")).handles
        assert (b.segment, b.offset) != (src.segment, src.offset)
        tensor_from_handle(b, "uint8", [N]).fill_(0xBB)
    (out,) = copied
    assert set(np.unique(out).tolist()) == {0xAA}
    # Once the copy is done, the source's block is free for the next lease.
    (again,) = (await broker.lease(lease_b, "tenant-b")).handles
    assert (again.segment, again.offset) == (src.segment, src.offset)


async def test_a_stale_handle_in_a_batch_release_does_not_keep_the_others(
    broker: Handlers,
) -> None:
    request = LeaseRequest(sizes=[1024, 1024, 1024], owner="w", device="cpu")
    a, b, c = (await broker.lease(request, "default")).handles
    await broker.release(ReleaseRequest(handles=[a], holder="w"), "default")
    # `a` went already (its TTL, say): the rest of the worker's inputs go all the same.
    with pytest.raises(GfaasError) as refused:
        await broker.release(ReleaseRequest(handles=[b, a, c], holder="w"), "default")
    assert refused.value.code == ErrorCode.NOT_FOUND
    assert "released 2 of 3" in refused.value.reason
    assert a.lease_id in refused.value.reason
    assert len(broker.pools.table) == 0


async def test_a_lease_or_copy_for_no_owner_is_refused_before_anything_is_leased(
    broker: Handlers,
) -> None:
    (src,) = (await broker.lease(LeaseRequest(sizes=[1024], owner="w"), "default")).handles
    with pytest.raises(GfaasError) as lease:
        await broker.lease(LeaseRequest(sizes=[1024], owner=""), "default")
    with pytest.raises(GfaasError) as copy:
        await broker.copy(CopyRequest(source=src, device="emu:0", owner=""), "default")
    for refused in (lease.value, copy.value):
        assert refused.code == ErrorCode.BAD_REQUEST
        assert "owner must be named" in refused.reason
    assert [x.lease_id for x in broker.pools.table] == [src.lease_id]


async def test_a_transfer_naming_a_handle_twice_is_refused_changing_nothing(
    broker: Handlers,
) -> None:
    (h,) = (await broker.lease(LeaseRequest(sizes=[1024], owner="worker-1"), "default")).handles
    twice = TransferRequest(handles=[h, h], holder="worker-1", to="client-1")
    with pytest.raises(GfaasError) as refused:
        await broker.transfer(twice, "default")
    assert refused.value.code == ErrorCode.BAD_REQUEST
    assert broker.pools.table.get(h.lease_id).holders == (("worker-1", 1),)
    # With two references, both move.
    await broker.retain(RetainRequest(handles=[h], holder="worker-1"), "default")
    await broker.transfer(twice, "default")
    assert broker.pools.table.get(h.lease_id).holders == (("client-1", 2),)


async def test_slabs_the_pool_gives_back_are_unmapped_from_the_broker_too() -> None:
    prefix = f"gfaas-test-dpb-{os.getpid()}-"
    links = Links(chunk_bytes=MB, mode=Mode.FAIR)
    pools = NodePools(node="n", instance="i", default_ttl_s=60.0, links=links)
    config = ElasticConfig(slab_size=4 * MB, max_bytes=16 * MB, cooldown_s=0.0)
    pools.add_device("cpu", ShmBackend("cpu", prefix=prefix), config)
    pools.add_device("emu:0", ShmBackend("emu:0", prefix=prefix), config)
    broker = Handlers(pools, links, max_payload=MB)
    shared = select_backend("cpu")  # the process's mapping cache, as read and copy use it
    try:
        (x,) = (await broker.lease(LeaseRequest(sizes=[MB], owner="o"), "default")).handles
        await broker.read(ReadRequest(handle=x, offset=0, nbytes=1024), "default")
        request = CopyRequest(source=x, device="emu:0", owner="o")
        (y,) = (await broker.copy(request, "default")).handles
        assert shared.is_open(x.segment)
        assert shared.is_open(y.segment)
        await broker.release(ReleaseRequest(handles=[x, y], holder="o"), "default")
        later = time.monotonic() + 1000.0  # the broker's clock, past the cool-down
        for now in (later, later + 1.0):  # idle: the slabs go back
            pools.tick(now)
        assert not set(list_segments(prefix)) & {x.segment, y.segment}
        assert not shared.is_open(x.segment)
        assert not shared.is_open(y.segment)
    finally:
        links.close()
        pools.close()
        for name in list_segments(prefix):
            unlink_segment(name)


async def test_a_lease_larger_than_the_idle_slabs_filling_the_cap_is_served(
    broker: Handlers,
) -> None:
    # Two slab-sized leases fill the cap; released, their slabs wait out the
    # cool-down. A lease of the whole cap fits it, and nothing is leased: the empty
    # slabs (too small for it, blocks never span slabs) make way for one that fits.
    two = await broker.lease(LeaseRequest(sizes=[N, N], owner="o"), "default")
    await broker.release(ReleaseRequest(handles=two.handles, holder="o"), "default")
    (big,) = (await broker.lease(LeaseRequest(sizes=[2 * N], owner="o"), "default")).handles
    assert big.nbytes == 2 * N
    assert not set(list_segments()) & {h.segment for h in two.handles}
    assert len(broker.pools.devices["cpu"].segments) == 1


class NoRoomBackend(ShmBackend):
    """A device whose memory another process took: its next slab cannot be made."""

    fail: type[BaseException] | None = None

    def create_slab(self, size: int, pool: str, *, prefault: bool = False) -> SlabRef:
        if self.fail is not None:
            raise self.fail("out of memory")  # as cupy's OutOfMemoryError is a MemoryError
        return super().create_slab(size, pool, prefault=prefault)


async def test_a_slab_the_device_cannot_make_refuses_the_batch_taking_nothing() -> None:
    prefix = f"gfaas-test-dpb-{os.getpid()}-"
    links = Links(chunk_bytes=MB, mode=Mode.FAIR)
    pools = NodePools(node="n", instance="i", default_ttl_s=60.0, links=links)
    backend = NoRoomBackend("cpu", prefix=prefix)
    pools.add_device("cpu", backend, ElasticConfig(slab_size=N, max_bytes=4 * N))
    broker = Handlers(pools, links, max_payload=MB)
    try:
        await broker.lease(LeaseRequest(sizes=[N // 2], owner="o"), "default")
        taken = pools.table.held("default")
        # The first fits the slab there is; the second needs a slab the device cannot
        # make: a full pool's answer, and the first is not left leased to nobody.
        backend.fail = MemoryError
        with pytest.raises(GfaasError) as refused:
            await broker.lease(LeaseRequest(sizes=[1000, N], owner="o2"), "default")
        assert refused.value.code is ErrorCode.OVERLOADED
        assert pools.table.held("default") == taken
        # Whatever else stops a batch, what it took so far goes back too.
        backend.fail = RuntimeError
        with pytest.raises(RuntimeError):
            await broker.lease(LeaseRequest(sizes=[1000, N], owner="o2"), "default")
        assert pools.table.held("default") == taken
        assert [x.owner for x in pools.table] == ["o"]
    finally:
        backend.fail = None
        links.close()
        pools.close()
        for name in list_segments(prefix):
            unlink_segment(name)


async def test_a_device_that_cannot_make_its_slabs_does_not_stop_the_others_ticking() -> None:
    # The periodic resize grows a pool towards its demand; when the device cannot
    # make the slab (its memory went to instances), the tick raised: every later
    # pool missed its resize round after round (idle slabs never given back), as
    # did the broker's prefetch and metrics after it.
    prefix = f"gfaas-test-dpb-{os.getpid()}-"
    links = Links(chunk_bytes=MB, mode=Mode.FAIR)
    pools = NodePools(node="n", instance="i", default_ttl_s=60.0, links=links)
    full = NoRoomBackend("emu:0", prefix=prefix)
    pools.add_device("emu:0", full, ElasticConfig(slab_size=MB, max_bytes=4 * MB, min_slabs=1))
    pools.add_device(
        "cpu", ShmBackend("cpu", prefix=prefix), ElasticConfig(slab_size=MB, max_bytes=4 * MB)
    )
    try:
        (x,) = pools.lease([1024], "cpu", "o", "default", 0.0, now=0.0)
        pools.release([x], "o", "default", now=1.0)
        full.fail = MemoryError
        for now in (1000.0, 1100.0):  # idle past the cool-down: the cpu slab goes back
            pools.tick(now)
        assert pools.devices["cpu"].segments == {}
        assert x.segment not in list_segments(prefix)
        assert pools.devices["emu:0"].segments == {}
        full.fail = None
        pools.tick(1101.0)  # room again: the pool grows as it should
        assert len(pools.devices["emu:0"].segments) == 1
    finally:
        full.fail = None
        links.close()
        pools.close()
        for name in list_segments(prefix):
            unlink_segment(name)


@pytest.mark.nats
async def test_a_broker_that_cannot_start_leaves_no_board_behind(nc: NATS, tmp_path: Path) -> None:
    # A device nothing backs; and, on a node without CUDA, a GPU (the reported case).
    for devices in ["cpu,tpu:0"] + ([] if cuda_available() else ["cpu,cuda:0"]):
        namespace = f"gfaas-t{secrets.token_hex(4)}"
        settings = Settings(state_dir=tmp_path, shm_namespace=namespace, pool_devices=devices)
        with pytest.raises(BackendUnavailable):
            Broker(nc, settings, "x")
        assert list_segments(f"{namespace}-") == [], devices


@pytest.mark.nats
async def test_a_restarted_broker_s_board_replaces_the_dead_one_s_for_its_clients(
    nc: NATS, tmp_path: Path
) -> None:
    namespace = f"gfaas-t{secrets.token_hex(4)}"
    settings = Settings(state_dir=tmp_path, shm_namespace=namespace, pool_devices="cpu")
    client = BrokerClient(nc, settings.node, board=board_name(namespace, settings.node))
    dead = Broker(nc, settings, "a")
    try:
        (gone,) = (await dead.handlers.lease(LeaseRequest(sizes=[1024], owner="w"), "t")).handles
        assert client.unverified([gone], "t") == []
        # The broker is killed (nothing of it closes) and a new one starts on the node.
        broker = Broker(nc, settings, "b")
        try:
            # Its predecessor's leases are gone: the board the client still maps must
            # not vouch for them (the broker then refuses them: not_found).
            assert client.unverified([gone], "t") == [gone]
            (live,) = (
                await broker.handlers.lease(LeaseRequest(sizes=[1024], owner="w"), "t")
            ).handles
            assert live.slot == gone.slot
            assert client.unverified([live], "t") == []
        finally:
            broker.close()
    finally:
        client._drop_board()
        # What the dead broker still maps, without its close (which would unlink the
        # name the new broker's board has now).
        dead.links.close()
        dead.pools.close()
        dead.board._segment.close()
        for name in list_segments(f"{namespace}-"):
            unlink_segment(name)
    assert list_segments(f"{namespace}-") == []


async def test_caller_mistakes_in_a_copy_or_read_are_bad_requests(broker: Handlers) -> None:
    (src,) = (await broker.lease(LeaseRequest(sizes=[1024], owner="w"), "default")).handles
    for weight in (0.0, -1.0, math.nan, math.inf):
        request = CopyRequest(source=src, device="emu:0", owner="w", weight=weight)
        with pytest.raises(GfaasError) as refused:
            await broker.copy(request, "default")
        assert refused.value.code == ErrorCode.BAD_REQUEST, weight
        assert "weight" in refused.value.reason
    # A budget or compute time that is no time: NaN, say, would have asked for the
    # whole link (a budget spent), ahead of every other flow.
    for key in ("budget_ms", "compute_ms"):
        for value in (-1.0, math.nan, math.inf):
            request = msgspec.structs.replace(
                CopyRequest(source=src, device="emu:0", owner="w"), **{key: value}
            )
            with pytest.raises(GfaasError) as refused:
                await broker.copy(request, "default")
            assert refused.value.code == ErrorCode.BAD_REQUEST, (key, value)
            assert f"{key} must be" in refused.value.reason
    bogus = msgspec.structs.replace(src, backend="bogus")
    with pytest.raises(GfaasError) as copy:
        await broker.copy(CopyRequest(source=bogus, device="emu:0", owner="w"), "default")
    with pytest.raises(GfaasError) as read:
        await broker.read(ReadRequest(handle=bogus, offset=0, nbytes=16), "default")
    for refused_ in (copy.value, read.value):
        assert refused_.code == ErrorCode.BAD_REQUEST
        assert "backend 'bogus'" in refused_.reason
    assert [x.lease_id for x in broker.pools.table] == [src.lease_id]  # nothing leaked


class NoMoves:
    async def move(self, src: Handle, dst: Handle) -> None:
        raise AssertionError("nothing parked, nothing moves")


def test_an_input_a_worker_holds_outlives_its_ttl_on_the_broker() -> None:
    prefix = f"gfaas-test-dpb-{os.getpid()}-"
    pools = NodePools(node="n", instance="i", default_ttl_s=60.0, links=NoMoves(), max_ttl_s=3600.0)
    pools.add_device(
        "cpu", ShmBackend("cpu", prefix=prefix), ElasticConfig(slab_size=MB, max_bytes=MB)
    )
    try:
        (a,) = pools.lease([MB], "cpu", "client-a", "tenant-a", 1.0, now=0.0)
        tensor_from_handle(a, "uint8", [MB]).fill_(1)
        pools.check([a], "tenant-a")
        pools.retain([a], "worker-1", "tenant-a")  # the worker's check + retain
        pools.tick(2.0)  # the TTL passes while the handler runs
        with pytest.raises(GfaasError) as full:  # nobody is leased that block meanwhile
            pools.lease([MB], "cpu", "client-b", "tenant-b", 0.0, now=2.0)
        assert full.value.code == ErrorCode.OVERLOADED
        assert set(tensor_from_handle(a, "uint8", [MB]).numpy().tolist()) == {1}
        pools.release([a], "worker-1", "tenant-a", now=3.0)
        assert len(pools.table) == 0
    finally:
        pools.close()
        for name in list_segments(prefix):
            unlink_segment(name)


async def test_a_cancelled_copy_keeps_its_blocks_until_the_copier_lets_go(
    broker: Handlers,
) -> None:
    (src,) = (await broker.lease(LeaseRequest(sizes=[N], owner="w"), "default")).handles
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            request = CopyRequest(source=src, device="emu:0", owner="w")
            tg.start_soon(broker.copy, request, "default")
            with anyio.fail_after(10):
                while not (c := broker.links.copiers.get("cpu->emu:0")) or not (
                    c.scheduler.stats().bytes_done
                ):
                    await anyio.sleep(0.001)
            scope.cancel()  # the broker stopping, say
    assert scope.cancelled_caught
    # The copy's destination went, but only once the copier thread was done with it.
    copier = broker.links.copiers["cpu->emu:0"]
    assert copier.scheduler.stats().bytes_done == N
    assert [x.lease_id for x in broker.pools.table] == [src.lease_id]


@pytest.mark.nats
async def test_a_broker_not_running_or_not_answering_is_unavailable_not_internal(
    nc: NATS,
) -> None:
    """A call while the node's memory broker is not up yet (or restarting, or stuck)
    was `internal`, a fault inside gfaas (HTTP 500): it is `unavailable`, a service
    the call needs missing (503), which callers retry."""
    from services.ingress.statuses import statuses_for
    from shared import subjects

    with pytest.raises(GfaasError) as raised:
        await BrokerClient(nc, "nobroker").lease([64], owner="w0")
    assert raised.value.code == ErrorCode.UNAVAILABLE
    assert "no memory broker is running on node 'nobroker'" in raised.value.reason
    assert statuses_for(raised.value.code).http == 503
    # One that hears the request and never answers.
    sub = await nc.subscribe(subjects.broker("stuck", "lease"))
    try:
        with pytest.raises(GfaasError) as raised:
            await BrokerClient(nc, "stuck", timeout=0.2).lease([64], owner="w0")
        assert raised.value.code == ErrorCode.UNAVAILABLE
        assert "did not answer lease" in raised.value.reason
    finally:
        await sub.unsubscribe()

"""Spill and prefetch: parked intermediates leave a full device pool for host memory,
furthest next reader first, and come back before their reader runs.

Library level (the broker's NodePools) with two shared-memory pools standing in for
a device and host memory: the same code moves device slabs on a GPU node."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import pytest

from services.memory_broker.pools import NodePools
from shared.dataplane.backend import tensor_from_handle
from shared.dataplane.elastic import ElasticConfig
from shared.dataplane.leases import Fault, LeaseError
from shared.dataplane.shm import ShmBackend
from shared.schema import Handle

pytestmark = pytest.mark.unit

MB = 1024 * 1024
DEV = "dev:0"


@pytest.fixture
def pools() -> Iterator[NodePools]:
    prefix = f"gfaas-test-spill-{os.getpid()}-"
    p = NodePools(node="t", instance="i", default_ttl_s=60.0)
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


def content(h: Handle) -> set[int]:
    return set(np.unique(tensor_from_handle(h, "uint8", [h.nbytes]).numpy()).tolist())


def test_a_full_device_spills_parked_data_furthest_next_use_first(pools: NodePools) -> None:
    a, b = lease(pools, 1), lease(pools, 2)
    with pytest.raises(LeaseError) as refused:  # full, and nothing may move
        pools.lease([MB], DEV, "run", "default", 0.0, now=0.0)
    assert refused.value.fault is Fault.EXHAUSTED
    pools.park([a], "run", "default", next_use=math.inf)  # no reader queued
    pools.park([b], "run", "default", next_use=5.0)  # a reader due at t=5
    (c,) = pools.lease([MB], DEV, "run", "default", 0.0, now=1.0)
    assert c.device == DEV
    moved = {x.lease_id: x for x in pools.table}
    assert moved[a.lease_id].device == "cpu"  # furthest next use went
    assert moved[b.lease_id].device == DEV
    # Parked data is never read, wherever it is.
    with pytest.raises(LeaseError) as parked:
        pools.check([a], "default")
    assert parked.value.fault is Fault.PARKED
    assert pools.stats()["spills"] == 1


def test_unparking_brings_data_back_intact_making_room_if_needed(pools: NodePools) -> None:
    a, b = lease(pools, 1), lease(pools, 2)
    pools.park([a, b], "run", "default", next_use=math.inf)
    (c,) = pools.lease([MB], DEV, "run", "default", 0.0, now=1.0)
    (back,) = pools.unpark([a], "run", "default")
    # The device held b (parked) and c (in use): b made room for a.
    assert back.device == DEV
    assert content(back) == {1}
    assert {x.lease_id: x.device for x in pools.table}[b.lease_id] == "cpu"
    pools.check([back], "default")
    with pytest.raises(LeaseError) as stale:  # the old place is not readable
        pools.check([a], "default")
    assert stale.value.fault is Fault.STALE
    # No room on the device and nothing parked there: b is readable in host memory.
    (b_now,) = pools.unpark([b], "run", "default")
    assert b_now.device == "cpu"
    assert content(b_now) == {2}
    pools.check([b_now], "default")
    # References still work with the handles minted before the moves.
    pools.release([a, b, c], "run", "default", now=3.0)
    assert len(pools.table) == 0
    assert pools.table.usage(DEV).bytes_leased == 0
    assert pools.table.usage("cpu").bytes_leased == 0


def test_data_whose_reader_is_due_is_prefetched_ahead_of_it(pools: NodePools) -> None:
    a, b = lease(pools, 1), lease(pools, 2)
    pools.park([a], "run", "default", next_use=math.inf)
    (c,) = pools.lease([MB], DEV, "run", "default", 0.0, now=1.0)
    assert {x.lease_id: x.device for x in pools.table}[a.lease_id] == "cpu"
    pools.tick(now=1.5)  # no room on the device: a stays in host memory
    pools.release([c], "run", "default", now=2.0)
    pools.park([a], "run", "default", next_use=10.0)  # its reader is due at t=10
    pools.tick(now=2.0)  # not within the horizon yet
    assert {x.lease_id: x.device for x in pools.table}[a.lease_id] == "cpu"
    pools.tick(now=9.5)
    assert {x.lease_id: x.device for x in pools.table}[a.lease_id] == DEV
    assert pools.stats()["restores"] == 1
    (back,) = pools.unpark([a], "run", "default")
    assert content(back) == {1}
    pools.release([back, b], "run", "default", now=10.0)


def test_only_a_holder_parks_and_nothing_unparked_moves(pools: NodePools) -> None:
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

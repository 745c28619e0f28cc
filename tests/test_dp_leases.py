from __future__ import annotations

import msgspec
import pytest

from shared.dataplane.allocator import AllocatorError
from shared.dataplane.leases import Fault, LeaseError, LeaseTable
from shared.schema import ErrorCode, Handle

pytestmark = pytest.mark.unit

MiB = 1 << 20


def table(cap: int = 8 * MiB, slabs: int = 1, slab_size: int = 4 * MiB) -> LeaseTable:
    t = LeaseTable(id_prefix="t")
    t.add_device("cpu", cap)
    for i in range(slabs):
        t.add_slab("cpu", slab_size, f"seg{i}")
    return t


def refused(t: LeaseTable, handle: Handle, tenant: str = "acme") -> LeaseError:
    with pytest.raises(LeaseError) as info:
        t.check(handle, tenant)
    return info.value


def test_a_fresh_handle_passes_its_check() -> None:
    t = table()
    lease = t.lease(1000, "cpu", "w1", tenant="acme", now=0.0)
    handle = t.to_handle(lease, backend="shm", pool="p")
    assert t.check(handle, "acme") == lease
    assert (handle.segment, handle.nbytes, handle.slab_size) == ("seg0", 1000, 4 * MiB)


def test_a_handle_survives_the_wire_and_still_checks() -> None:
    t = table()
    lease = t.lease(1000, "cpu", "w1", tenant="acme", now=0.0)
    wire = msgspec.msgpack.encode(t.to_handle(lease, backend="shm", pool="p"))
    assert t.check(msgspec.msgpack.decode(wire, type=Handle), "acme") == lease


def test_a_stale_generation_is_refused_after_the_block_is_reused() -> None:
    t = table()
    old = t.lease(1000, "cpu", "w1", tenant="acme", now=0.0)
    old_handle = t.to_handle(old, backend="shm", pool="p")
    t.release(old.lease_id, "w1")
    new = t.lease(1000, "cpu", "w2", tenant="acme", now=1.0)
    assert (new.block, new.generation) == (old.block, old.generation + 1)
    err = refused(t, old_handle)
    assert err.fault is Fault.STALE
    assert err.code is ErrorCode.NOT_FOUND
    assert "released" in err.reason
    forged = msgspec.structs.replace(old_handle, lease_id=new.lease_id)
    assert refused(t, forged).fault is Fault.STALE


def test_a_foreign_tenant_is_refused() -> None:
    t = table()
    lease = t.lease(1000, "cpu", "w1", tenant="acme", now=0.0)
    handle = t.to_handle(lease, backend="shm", pool="p")
    err = refused(t, handle, tenant="mallory")
    # Said as an unknown id is: nothing about the lease, its generation or its range.
    assert (err.fault, err.code) == (Fault.FOREIGN_TENANT, ErrorCode.NOT_FOUND)
    assert err.reason == f"no lease {lease.lease_id} for tenant 'mallory'"
    unknown = refused(t, msgspec.structs.replace(handle, lease_id="t" + "0" * 32), "mallory")
    assert (unknown.code, unknown.reason) == (
        err.code,
        err.reason.replace(lease.lease_id, "t" + "0" * 32),
    )
    relabelled = msgspec.structs.replace(handle, tenant="mallory")
    assert refused(t, relabelled, tenant="mallory").fault is Fault.FOREIGN_TENANT
    # Its own tenant, naming another's label, hears the same.
    assert refused(t, relabelled, tenant="acme").fault is Fault.FOREIGN_TENANT
    # Released, a stranger still hears "no lease"; the tenant hears why.
    t.release(lease.lease_id, "w1")
    assert refused(t, handle, tenant="mallory").reason == err.reason
    assert "released" in refused(t, handle, tenant="acme").reason


@pytest.mark.parametrize(("offset", "nbytes"), [(-256, 256), (0, 1001), (512, 600), (0, -1)])
def test_bytes_outside_the_lease_are_refused(offset: int, nbytes: int) -> None:
    t = table()
    t.lease(256, "cpu", "w0", tenant="acme", now=0.0)  # so the lease under test starts at 256
    lease = t.lease(1000, "cpu", "w1", tenant="acme", now=0.0)
    handle = t.to_handle(lease, backend="shm", pool="p")
    bad = msgspec.structs.replace(handle, offset=lease.offset + offset, nbytes=nbytes)
    err = refused(t, bad)
    assert err.fault is Fault.OUT_OF_BOUNDS
    assert "outside" in err.reason


def test_a_sub_range_of_the_lease_is_allowed() -> None:
    t = table()
    lease = t.lease(1000, "cpu", "w1", tenant="acme", now=0.0)
    handle = t.to_handle(lease, backend="shm", pool="p")
    part = msgspec.structs.replace(handle, offset=lease.offset + 100, nbytes=900)
    assert t.check(part, "acme") == lease


def test_another_segment_is_refused() -> None:
    t = table(slabs=2)
    lease = t.lease(1000, "cpu", "w1", tenant="acme", now=0.0)
    handle = msgspec.structs.replace(t.to_handle(lease, backend="shm", pool="p"), segment="seg1")
    assert refused(t, handle).fault is Fault.WRONG_PLACE


def test_an_unknown_lease_is_refused_as_not_found() -> None:
    t = table()
    lease = t.lease(1000, "cpu", "w1", tenant="acme", now=0.0)
    handle = msgspec.structs.replace(t.to_handle(lease, backend="shm", pool="p"), lease_id="nope")
    err = refused(t, handle)
    assert (err.fault, err.code) == (Fault.UNKNOWN, ErrorCode.NOT_FOUND)


def test_fan_out_frees_only_when_the_last_reference_goes() -> None:
    t = table()
    lease = t.lease(MiB, "cpu", "producer", now=0.0)
    t.retain(lease.lease_id, "consumer-a")
    t.retain(lease.lease_id, "consumer-b")
    assert t.get(lease.lease_id).refs == 3
    assert t.release(lease.lease_id, "producer") is None
    assert t.release(lease.lease_id, "consumer-a") is None
    assert t.usage("cpu").leases == 1
    freed = t.release(lease.lease_id, "consumer-b")
    assert freed is not None
    assert freed.lease_id == lease.lease_id
    assert t.usage("cpu").alloc.used == 0


def test_releasing_a_reference_one_does_not_hold_is_refused() -> None:
    t = table()
    lease = t.lease(MiB, "cpu", "producer", now=0.0)
    with pytest.raises(LeaseError) as info:
        t.release(lease.lease_id, "stranger")
    assert info.value.fault is Fault.NOT_HOLDER


def test_leases_expire_at_their_ttl_and_renewal_postpones_it() -> None:
    t = table()
    short = t.lease(MiB, "cpu", "w1", now=0.0, ttl=5.0)
    renewed = t.lease(MiB, "cpu", "w1", now=0.0, ttl=5.0)
    forever = t.lease(MiB, "cpu", "w1", now=0.0)
    t.renew(renewed.lease_id, now=4.0, ttl=5.0)
    assert t.expire(4.9) == []
    assert [x.lease_id for x in t.expire(5.0)] == [short.lease_id]
    assert [x.lease_id for x in t.expire(9.0)] == [renewed.lease_id]
    assert [x.lease_id for x in t] == [forever.lease_id]
    with pytest.raises(LeaseError, match="expired"):
        t.get(short.lease_id)


def test_released_leases_leave_nothing_behind_in_the_expiry_queue() -> None:
    # Every lease with a TTL (all of the broker's) queued an expiry entry that only
    # its TTL removed: a broker leasing and releasing 1000 a second under the 300 s
    # default kept 300 000 dead entries (lease ids and all), 3.6 million at the
    # longest TTL a caller may ask for.
    t = table()
    kept = t.lease(1024, "cpu", "w", now=0.0, ttl=3600.0)
    for i in range(20_000):
        x = t.lease(1024, "cpu", "w", now=float(i), ttl=3600.0)
        t.release(x.lease_id, "w")
        if i % 7 == 0:
            t.renew(kept.lease_id, now=float(i), ttl=3600.0)
    assert len(t._expiry) <= 2 * len(t) + 1024
    # Expiry is as it was: the live lease goes at its (renewed) TTL, not before.
    assert t.expire(19_999 + 3599.0) == []
    assert [x.lease_id for x in t.expire(19_999 + 3600.0)] == [kept.lease_id]
    assert t._expiry == []


def test_a_dead_owner_is_reclaimed_but_data_a_live_consumer_holds_stays() -> None:
    t = table()
    solo = t.lease(MiB, "cpu", "dead", now=0.0)
    shared = t.lease(MiB, "cpu", "dead", now=0.0)
    t.retain(shared.lease_id, "alive")
    other = t.lease(MiB, "cpu", "alive", now=0.0)
    freed = t.reclaim_owner("dead")
    assert [x.lease_id for x in freed] == [solo.lease_id]
    assert {x.lease_id for x in t} == {shared.lease_id, other.lease_id}
    assert dict(t.get(shared.lease_id).holders) == {"alive": 1}


def test_a_lease_larger_than_the_device_cap_is_too_large() -> None:
    t = table(cap=8 * MiB)
    with pytest.raises(LeaseError) as info:
        t.lease(9 * MiB, "cpu", "w1", now=0.0)
    assert (info.value.fault, info.value.code) == (Fault.TOO_LARGE, ErrorCode.PAYLOAD_TOO_LARGE)
    assert "cap" in info.value.reason


def test_an_exhausted_pool_says_so_with_its_numbers() -> None:
    t = table(cap=8 * MiB, slabs=1, slab_size=4 * MiB)
    t.lease(3 * MiB, "cpu", "w1", now=0.0)
    with pytest.raises(LeaseError) as info:
        t.lease(2 * MiB, "cpu", "w1", now=0.0)
    err = info.value
    assert (err.fault, err.code) == (Fault.EXHAUSTED, ErrorCode.OVERLOADED)
    assert "exhausted" in err.reason
    assert "largest free block 1048576" in err.reason


def test_an_unknown_device_is_refused() -> None:
    t = table()
    with pytest.raises(LeaseError) as info:
        t.lease(1, "cuda:7", "w1", now=0.0)
    assert info.value.fault is Fault.UNKNOWN_DEVICE


def test_only_an_empty_slab_can_be_removed() -> None:
    t = table(slabs=2)
    lease = t.lease(MiB, "cpu", "w1", now=0.0)
    with pytest.raises(AllocatorError, match="still holds"):
        t.remove_slab("cpu", lease.block.slab_id)
    empty = next(s for s in t.slabs("cpu") if s.slab_id != lease.block.slab_id)
    assert t.remove_slab("cpu", empty.slab_id) == empty
    assert [s.slab_id for s in t.slabs("cpu")] == [lease.block.slab_id]


def test_a_pinned_lease_keeps_its_block_past_its_release_until_unpinned() -> None:
    t = table(cap=4 * MiB, slab_size=4 * MiB)
    lease = t.lease(4 * MiB, "cpu", "w1", now=0.0)
    t.pin(lease.lease_id)
    t.park(lease.lease_id, "w1", next_use=1.0)
    with pytest.raises(LeaseError):  # a pinned lease is not moved either
        t.relocate(lease.lease_id, "cpu")
    assert t.release(lease.lease_id, "w1") is not None
    with pytest.raises(LeaseError) as full:  # the copier still reads that block
        t.lease(4 * MiB, "cpu", "w2", now=1.0)
    assert full.value.fault is Fault.EXHAUSTED
    t.unpin(lease.lease_id)
    assert t.lease(4 * MiB, "cpu", "w2", now=1.0).offset == lease.offset


def test_a_ttl_ends_the_owners_claim_but_not_a_readers_hold_which_is_bounded() -> None:
    t = table(cap=4 * MiB, slab_size=4 * MiB)
    held = t.lease(4 * MiB, "cpu", "client-a", now=0.0, ttl=1.0)
    t.retain(held.lease_id, "worker-1")  # the worker reads it (check + retain)
    assert t.expire(1.5) == []
    # The worker's view stays on tenant A's bytes: nobody else gets that block.
    assert dict(t.get(held.lease_id).holders) == {"worker-1": 1}
    with pytest.raises(LeaseError) as full:
        t.lease(4 * MiB, "cpu", "client-b", now=1.5)
    assert full.value.fault is Fault.EXHAUSTED
    freed = t.release(held.lease_id, "worker-1")
    assert freed is not None
    assert freed.lease_id == held.lease_id
    # A holder that never releases holds it one more TTL at most, or as long as the
    # table allows.
    pinned = t.lease(4 * MiB, "cpu", "client-a", now=3.0, ttl=1.0)
    t.retain(pinned.lease_id, "gone-client")
    assert t.expire(4.5) == []
    assert [x.lease_id for x in t.expire(5.0)] == [pinned.lease_id]
    t.hold_past_ttl_s = 10.0
    longer = t.lease(4 * MiB, "cpu", "client-a", now=5.0, ttl=1.0)
    t.retain(longer.lease_id, "worker-1")
    assert t.expire(15.9) == []
    assert [x.lease_id for x in t.expire(16.0)] == [longer.lease_id]


def test_a_transferred_reference_carries_the_ttl_claim() -> None:
    t = table()
    out = t.lease(MiB, "cpu", "worker-1", now=0.0, ttl=1.0)
    assert t.transfer(out.lease_id, "worker-1", "client-a") is None
    # The caller forgot its output: freed at its TTL, as before.
    assert [x.lease_id for x in t.expire(1.0)] == [out.lease_id]

"""The lease table: who may read which bytes of which slab, until when.

A lease is one block of one device's pool, named by a unique `lease_id` and a
`generation` that grows every time the same block location is leased again, so a
handle kept past its lease is refused instead of reading someone else's bytes.

A lease id is a capability: the broker's prefix, then 128 random bits, so nobody
names a lease they were not given. Every check starts with `owned`: a lease of
another tenant is refused exactly as one that does not exist ("no lease ..."), so a
refusal tells a stranger nothing (no generation, range, holder or tenant). A lease
whose block may still hold another tenant's bytes is marked `scrub` for the broker
to zero before anyone sees it; each tenant may hold at most a quota of pooled
bytes and leases (`quota_exceeded`).

The broker pins the leases it copies from or into: a pinned lease retired meanwhile
keeps its block until the last unpin, and is not moved.

A lease's TTL ends its claim, the reference of whoever the lease is for (its owner,
or whoever that reference was transferred to), not the references others took
meanwhile: a worker that retained it to read it keeps it until it releases it, so
nobody else is leased that block under the worker's open view. Nor can such a holder
pin it for ever (a client that retained and died is not reclaimed: only heartbeating
workers and ingresses are): `hold_past_ttl_s` after its expiry (the broker's is the
longest TTL a lease may ask for, GFAAS_MAX_LEASE_TTL_S; one more TTL where none is
given), the lease is freed for everyone. Without other holders, the lease is freed
at its TTL as before.

Holders are counted per holder (the producer, then one per fan-out consumer), so
a dead worker's references can be dropped without freeing data a live consumer
still reads. Time is always an argument.
"""

from __future__ import annotations

import heapq
import math
import secrets
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

from shared.dataplane.allocator import DEFAULT_ALIGNMENT, AllocStats, Block, SlabAllocator
from shared.errors import GfaasError
from shared.ids import Holder
from shared.schema import DEFAULT_TENANT, ErrorCode, Handle

# Remembered retired ids, so a late handle hears "released" rather than "unknown".
_RETIRED_MEMORY = 4096
# Dead entries the expiry queue may hold beyond twice the live leases (LeaseTable._queue_expiry).
_EXPIRY_SLACK = 1024


class Fault(StrEnum):
    """Why a lease operation was refused; each maps to one wire ErrorCode."""

    UNKNOWN = "unknown"  # never issued here
    STALE = "stale"  # released, expired, reclaimed, or an old generation
    FOREIGN_TENANT = "foreign_tenant"
    OUT_OF_BOUNDS = "out_of_bounds"
    WRONG_PLACE = "wrong_place"  # device or segment differs from the lease's
    TOO_LARGE = "too_large"  # larger than the device's cap: can never fit
    EXHAUSTED = "exhausted"  # fits the cap, not the free space now
    UNKNOWN_DEVICE = "unknown_device"
    NOT_HOLDER = "not_holder"
    PARKED = "parked"  # its holder said nobody reads it now: it may sit in host memory
    QUOTA = "quota_exceeded"  # the tenant's pooled bytes or leases would pass its quota


FAULT_CODES: dict[Fault, ErrorCode] = {
    Fault.UNKNOWN: ErrorCode.NOT_FOUND,
    Fault.STALE: ErrorCode.NOT_FOUND,
    # Said as UNKNOWN is, word for word: another tenant's lease is no business of ours.
    Fault.FOREIGN_TENANT: ErrorCode.NOT_FOUND,
    Fault.OUT_OF_BOUNDS: ErrorCode.BAD_REQUEST,
    Fault.WRONG_PLACE: ErrorCode.BAD_REQUEST,
    Fault.TOO_LARGE: ErrorCode.PAYLOAD_TOO_LARGE,
    Fault.EXHAUSTED: ErrorCode.OVERLOADED,
    Fault.UNKNOWN_DEVICE: ErrorCode.BAD_REQUEST,
    Fault.NOT_HOLDER: ErrorCode.BAD_REQUEST,
    Fault.PARKED: ErrorCode.BAD_REQUEST,
    Fault.QUOTA: ErrorCode.QUOTA_EXCEEDED,
}


class LeaseError(GfaasError):
    """A refused lease operation: `code` goes on the wire, `fault` is the precise cause."""

    def __init__(self, fault: Fault, reason: str) -> None:
        super().__init__(FAULT_CODES[fault], reason)
        self.fault = fault


class HandleLike(Protocol):
    """The fields of schema.Handle that a check reads."""

    @property
    def lease_id(self) -> str: ...
    @property
    def generation(self) -> int: ...
    @property
    def tenant(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def segment(self) -> str: ...
    @property
    def offset(self) -> int: ...
    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Lease:
    lease_id: str
    generation: int
    device: str
    segment: str
    block: Block
    # Requested bytes; `block.nbytes` is the aligned reservation.
    nbytes: int
    owner: str
    tenant: str
    created_at: float
    expires_at: float
    holders: tuple[tuple[str, int], ...]
    # Where it belongs (it was leased there); `device` differs while spilled.
    home: str = ""
    # Parked: its holder said no one reads it until unparked, so the broker may move
    # it. `next_use`: when its next reader is due (broker clock; inf: not known).
    parked: bool = False
    next_use: float = math.inf
    # Earlier (device, segment, generation) places: handles minted there still name
    # the lease for reference operations (release, retain), never for reading.
    moved_from: tuple[tuple[str, str, int], ...] = ()
    # Its block may hold bytes another tenant left in it (or a fresh device slab's
    # garbage): the broker zeroes it before the handle goes out.
    scrub: bool = False
    # The holder whose reference its TTL ends ("": the TTL passed, and `expires_at`
    # is now the bound on the other holders), and that TTL.
    claim: str = ""
    ttl: float = math.inf

    @property
    def offset(self) -> int:
        return self.block.offset

    @property
    def spilled(self) -> bool:
        return bool(self.home) and self.device != self.home

    @property
    def refs(self) -> int:
        return sum(n for _, n in self.holders)


@dataclass(frozen=True, slots=True)
class Slab:
    device: str
    slab_id: int
    size: int
    segment: str


@dataclass(slots=True)
class _Device:
    cap: int
    allocator: SlabAllocator
    slab_size: int = 0  # largest slab ever added, for "too large" hints
    generations: dict[tuple[int, int], int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeviceUsage:
    device: str
    cap: int
    leases: int
    bytes_leased: int
    alloc: AllocStats


class LeaseTable:
    def __init__(
        self,
        *,
        id_prefix: str = "L",
        alignment: int = DEFAULT_ALIGNMENT,
        tenant_bytes: int = 0,
        tenant_leases: int = 0,
        hold_past_ttl_s: float | None = None,
    ) -> None:
        # How long other holders may keep a lease past its TTL (None: its TTL again).
        self.hold_past_ttl_s = hold_past_ttl_s
        # The prefix says whose ids they are (the broker passes its node and instance);
        # the random rest makes each one unguessable.
        self._prefix = id_prefix
        self._alignment = alignment
        # Per tenant: most pooled bytes (aligned, over every device) and live leases
        # it may hold; 0: no limit.
        self.tenant_bytes = tenant_bytes
        self.tenant_leases = tenant_leases
        self._held: dict[str, list[int]] = {}  # tenant -> [bytes, leases]
        # Slab -> the tenants whose bytes it may hold ("" for unknown: a device slab
        # fresh from cudaMalloc); a lease there for anyone else is scrubbed.
        self._slab_tenants: dict[tuple[str, int], set[str]] = {}
        self._slab_seq = 0
        self._devices: dict[str, _Device] = {}
        self._slabs: dict[tuple[str, int], Slab] = {}
        self._leases: dict[str, Lease] = {}
        # Retired id -> (why, its tenant): a late handle of the tenant hears why.
        self._retired: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._expiry: list[tuple[float, str]] = []
        # Leases being copied to a new place -> blocks to free once the copy is done:
        # the old place, and the new one too should the lease go meanwhile (freeing it
        # at once would let another lease have memory the copy still writes).
        self._moving: dict[str, list[tuple[str, Block]]] = {}
        # Leases the broker itself is reading or writing (a copy's source and
        # destination) -> how many such copies; and the block of one retired meanwhile,
        # freed at the last unpin: the copier thread still touches it, and another
        # tenant leased there would have its bytes copied out (or overwritten).
        self._pins: dict[str, int] = {}
        self._pinned_blocks: dict[str, tuple[str, Block]] = {}

    @property
    def id_prefix(self) -> str:
        """What every lease id starts with (32 random hex digits follow)."""
        return self._prefix

    # Pools

    def add_device(self, device: str, cap_bytes: int) -> None:
        if device in self._devices:
            self._devices[device].cap = cap_bytes
            return
        self._devices[device] = _Device(cap_bytes, SlabAllocator(self._alignment))

    def add_slab(self, device: str, size: int, segment: str, *, clean: bool = True) -> Slab:
        """`clean`: the slab's bytes are all zero (a new shm segment is; device memory
        fresh from the allocator is not, and its first leases are scrubbed)."""
        dev = self._device(device)
        self._slab_seq += 1
        slab = Slab(device, self._slab_seq, size, segment)
        self._slab_tenants[(device, slab.slab_id)] = set() if clean else {""}
        dev.allocator.add_slab(slab.slab_id, size)
        dev.slab_size = max(dev.slab_size, size)
        self._slabs[(device, slab.slab_id)] = slab
        return slab

    def remove_slab(self, device: str, slab_id: int) -> Slab:
        """Forget an empty slab; the caller then unmaps and destroys its segment."""
        dev = self._device(device)
        dev.allocator.remove_slab(slab_id)
        # Slab ids are never reused, so this slab's generation counters can go with it.
        dev.generations = {k: g for k, g in dev.generations.items() if k[0] != slab_id}
        self._slab_tenants.pop((device, slab_id), None)
        return self._slabs.pop((device, slab_id))

    def slabs(self, device: str) -> list[Slab]:
        return [s for (d, _), s in sorted(self._slabs.items()) if d == device]

    def slab_used(self, device: str, slab_id: int) -> int:
        return self._device(device).allocator.slab_stats(slab_id).used

    # Leases

    def lease(
        self,
        nbytes: int,
        device: str,
        owner: str,
        *,
        now: float,
        tenant: str = DEFAULT_TENANT,
        ttl: float | None = None,
    ) -> Lease:
        dev = self._device(device)
        if nbytes < 0:
            raise LeaseError(Fault.OUT_OF_BOUNDS, f"negative lease size {nbytes}")
        if dev.allocator.aligned(nbytes) > dev.cap:
            raise LeaseError(
                Fault.TOO_LARGE,
                f"{nbytes} bytes exceeds the {dev.cap}-byte cap of device {device}",
            )
        self._check_quota(tenant, dev.allocator.aligned(nbytes))
        block, generation = self._alloc(dev, device, nbytes)
        seen = self._slab_tenants.setdefault((device, block.slab_id), set())
        scrub = bool(seen - {tenant})
        seen.add(tenant)
        expires_at = math.inf if ttl is None else now + ttl
        lease = Lease(
            lease_id=f"{self._prefix}{secrets.token_hex(16)}",
            generation=generation,
            device=device,
            segment=self._slabs[(device, block.slab_id)].segment,
            block=block,
            nbytes=nbytes,
            owner=owner,
            tenant=tenant,
            created_at=now,
            expires_at=expires_at,
            holders=((owner, 1),),
            home=device,
            scrub=scrub,
            claim=owner,
            ttl=math.inf if ttl is None else ttl,
        )
        held = self._held.setdefault(tenant, [0, 0])
        held[0] += self._charge(lease)
        held[1] += 1
        self._leases[lease.lease_id] = lease
        if ttl is not None:
            self._queue_expiry(expires_at, lease.lease_id)
        return lease

    def get(self, lease_id: str) -> Lease:
        lease = self._leases.get(lease_id)
        if lease is None:
            retired = self._retired.get(lease_id)
            if retired is not None:
                raise LeaseError(Fault.STALE, f"lease {lease_id} was {retired[0]}")
            raise LeaseError(Fault.UNKNOWN, f"no lease {lease_id}")
        return lease

    def owned(self, lease_id: str, tenant: str, label: str | None = None) -> Lease:
        """The live lease `lease_id` of `tenant` (and of `label`, the tenant a handle
        names, when given): the one place where a lease's tenant is checked. Another
        tenant's lease, live or retired, is refused word for word as an unknown id
        is, so a refusal says nothing about it."""
        lease = self._leases.get(lease_id)
        if lease is not None and lease.tenant == tenant and label in (None, tenant):
            return lease
        retired = self._retired.get(lease_id)
        if lease is None and retired is not None and retired[1] == tenant:
            raise LeaseError(Fault.STALE, f"lease {lease_id} was {retired[0]}")
        fault = Fault.UNKNOWN if lease is None and retired is None else Fault.FOREIGN_TENANT
        raise LeaseError(fault, f"no lease {lease_id} for tenant {tenant!r}")

    def held(self, tenant: str) -> tuple[int, int]:
        """(pooled bytes, leases) `tenant` holds now, as its quota counts them."""
        bytes_held, leases = self._held.get(tenant, (0, 0))
        return bytes_held, leases

    def lease_or_none(self, lease_id: str) -> Lease | None:
        return self._leases.get(lease_id)

    def retain(self, lease_id: str, holder: str, n: int = 1) -> Lease:
        """Add references for a fan-out consumer; the lease lives until all are released."""
        lease = self.get(lease_id)
        counts = dict(lease.holders)
        counts[holder] = counts.get(holder, 0) + n
        return self._put(replace(lease, holders=tuple(counts.items())))

    def release(self, lease_id: str, holder: str) -> Lease | None:
        """Drop one reference of `holder`; returns the freed lease at zero, else None."""
        lease = self.get(lease_id)
        counts = dict(lease.holders)
        if holder not in counts:
            raise LeaseError(Fault.NOT_HOLDER, f"{holder} holds no reference to {lease_id}")
        counts[holder] -= 1
        if counts[holder] == 0:
            del counts[holder]
        if not counts:
            return self._retire(lease, "released")
        self._put(replace(lease, holders=tuple(counts.items())))
        return None

    def park(self, lease_id: str, holder: str, *, next_use: float) -> Lease:
        lease = self.check_holder(lease_id, holder)
        return self._put(replace(lease, parked=True, next_use=next_use))

    def unpark(self, lease_id: str, holder: str) -> Lease:
        lease = self.check_holder(lease_id, holder)
        return self._put(replace(lease, parked=False, next_use=math.inf))

    def relocate(self, lease_id: str, device: str) -> tuple[Lease, Lease]:
        """Give a parked lease a block on `device`: (before, after). The old block stays
        allocated while the caller copies the bytes, until `finish_move`."""
        lease = self.get(lease_id)
        if not lease.parked:
            raise LeaseError(Fault.PARKED, f"lease {lease_id} is not parked: it may be in use")
        if lease_id in self._moving:
            raise LeaseError(Fault.PARKED, f"lease {lease_id} is being moved already")
        if lease_id in self._pins:
            raise LeaseError(Fault.PARKED, f"lease {lease_id} is being copied by the broker")
        dev = self._device(device)
        block, generation = self._alloc(dev, device, lease.nbytes)
        # The copy overwrites every byte the lease may be read at: no scrub needed.
        self._slab_tenants.setdefault((device, block.slab_id), set()).add(lease.tenant)
        moved = replace(
            lease,
            device=device,
            segment=self._slabs[(device, block.slab_id)].segment,
            block=block,
            generation=generation,
            moved_from=(*lease.moved_from, (lease.device, lease.segment, lease.generation)),
        )
        self._put(moved)
        self._moving[lease_id] = [(lease.device, lease.block)]
        return lease, moved

    def finish_move(self, lease_id: str) -> None:
        """The copy of a relocated lease is done (or failed): free what it held up."""
        for device, block in self._moving.pop(lease_id, []):
            self._devices[device].allocator.free(block)

    def abort_move(self, before: Lease) -> None:
        """The copy failed: the lease (if it still lives) stays where it was."""
        pending = self._moving.pop(before.lease_id, [])
        current = self._leases.get(before.lease_id)
        if current is None:
            free = pending  # the old place, and the new one the lease went with
        else:
            free = [*pending[1:], (current.device, current.block)]
            self._put(
                replace(
                    current,
                    device=before.device,
                    segment=before.segment,
                    block=before.block,
                    generation=before.generation,
                    moved_from=before.moved_from,
                )
            )
        for device, block in free:
            self._devices[device].allocator.free(block)

    def moving(self, lease_id: str) -> bool:
        return lease_id in self._moving

    def pin(self, lease_id: str) -> Lease:
        """Keep the lease's block while the broker copies from or into it: a lease
        retired meanwhile (released, expired, reclaimed) keeps its block allocated
        until the last `unpin`, and a pinned lease is not moved (spilled, prefetched)."""
        lease = self.get(lease_id)
        if lease_id in self._moving:
            raise LeaseError(Fault.PARKED, f"lease {lease_id} is being moved")
        self._pins[lease_id] = self._pins.get(lease_id, 0) + 1
        return lease

    def unpin(self, lease_id: str) -> None:
        left = self._pins.get(lease_id, 0) - 1
        if left > 0:
            self._pins[lease_id] = left
            return
        self._pins.pop(lease_id, None)
        retired = self._pinned_blocks.pop(lease_id, None)
        if retired is not None:
            device, block = retired
            self._devices[device].allocator.free(block)

    def pinned(self, lease_id: str) -> bool:
        return lease_id in self._pins

    def free(self, lease_id: str) -> Lease:
        """Free regardless of references (invocation cancelled, broker shutting down)."""
        return self._retire(self.get(lease_id), "freed")

    def renew(self, lease_id: str, *, now: float, ttl: float) -> Lease:
        lease = self._put(replace(self.get(lease_id), expires_at=now + ttl, ttl=ttl))
        self._queue_expiry(lease.expires_at, lease_id)
        return lease

    def transfer(self, lease_id: str, holder: str, to: str) -> Lease | None:
        """Move one reference of `holder` to `to`; the TTL's claim goes with it (a
        worker hands its outputs to the caller, whose they are)."""
        lease = self.check_holder(lease_id, holder)
        if lease.claim == holder:
            self._put(replace(lease, claim=to))
        self.retain(lease_id, to)
        return self.release(lease_id, holder)

    def expire(self, now: float) -> list[Lease]:
        """Leases whose TTL passed: the claim's references go, and a lease nobody else
        holds is freed; one others still hold is freed when they release it, or
        `hold_past_ttl_s` later (see the module's docstring). Returns the freed leases."""
        expired: list[Lease] = []
        while self._expiry and self._expiry[0][0] <= now:
            at, lease_id = heapq.heappop(self._expiry)
            lease = self._leases.get(lease_id)
            # Entries left behind by renew or release are skipped here, not searched for there.
            if lease is None or lease.expires_at != at:
                continue
            rest = tuple((h, n) for h, n in lease.holders if h != lease.claim)
            if not lease.claim or not rest:
                expired.append(self._retire(lease, "expired"))
                continue
            bound = at + (lease.ttl if self.hold_past_ttl_s is None else self.hold_past_ttl_s)
            self._put(replace(lease, holders=rest, claim="", expires_at=bound))
            heapq.heappush(self._expiry, (bound, lease_id))
        return expired

    def reclaim_owner(self, owner: str) -> list[Lease]:
        """Drop every reference a dead process held, under its name or a name under it
        (`owner/...`: a workflow run in an ingress); returns the leases that were freed."""
        freed: list[Lease] = []

        def dead(holder: str) -> bool:
            return Holder.parse(holder).owned_by(owner)

        for lease in [x for x in self._leases.values() if any(dead(h) for h, _ in x.holders)]:
            rest = tuple((h, n) for h, n in lease.holders if not dead(h))
            if rest:
                self._put(replace(lease, holders=rest))
            else:
                freed.append(self._retire(lease, f"reclaimed from dead owner {owner}"))
        return freed

    # Checks

    def check_ref(self, handle: HandleLike, tenant: str) -> Lease:
        """The lease a handle names for reference operations (retain, release, park):
        the right tenant, and a place the lease has had; bytes are not read."""
        lease = self.owned(handle.lease_id, tenant, handle.tenant)
        place = (handle.device, handle.segment, handle.generation)
        if place != (lease.device, lease.segment, lease.generation) and (
            place not in lease.moved_from
        ):
            raise LeaseError(
                Fault.STALE,
                f"lease {lease.lease_id} never lived at {handle.device}/{handle.segment} "
                f"generation {handle.generation}",
            )
        return lease

    def check(self, handle: HandleLike, tenant: str) -> Lease:
        """The lease a handle may read, or a LeaseError saying why not. The tenant is
        checked first: what else is wrong is said only to the lease's own tenant."""
        lease = self.owned(handle.lease_id, tenant, handle.tenant)
        if lease.parked:
            raise LeaseError(
                Fault.PARKED,
                f"lease {lease.lease_id} is parked by its holder (the broker may move it "
                "to host memory): it is unparked before anyone reads it",
            )
        if handle.generation != lease.generation:
            raise LeaseError(
                Fault.STALE,
                f"lease {lease.lease_id} is at generation {lease.generation}, "
                f"handle has {handle.generation}",
            )
        if handle.device != lease.device or handle.segment != lease.segment:
            raise LeaseError(
                Fault.WRONG_PLACE,
                f"lease {lease.lease_id} lives on {lease.device}/{lease.segment}, "
                f"handle names {handle.device}/{handle.segment}",
            )
        start, end = lease.offset, lease.offset + lease.nbytes
        if handle.nbytes < 0 or handle.offset < start or handle.offset + handle.nbytes > end:
            raise LeaseError(
                Fault.OUT_OF_BOUNDS,
                f"bytes [{handle.offset}, {handle.offset + handle.nbytes}) are outside "
                f"lease {lease.lease_id} [{start}, {end})",
            )
        return lease

    def to_handle(self, lease: Lease, *, backend: str, pool: str) -> Handle:
        slab = self._slabs[(lease.device, lease.block.slab_id)]
        return Handle(
            backend=backend,
            pool=pool,
            segment=lease.segment,
            device=lease.device,
            offset=lease.offset,
            nbytes=lease.nbytes,
            lease_id=lease.lease_id,
            generation=lease.generation,
            tenant=lease.tenant,
            slab_size=slab.size,
        )

    # Accounting

    def __len__(self) -> int:
        return len(self._leases)

    def __iter__(self) -> Iterator[Lease]:
        return iter(list(self._leases.values()))

    def usage(self, device: str) -> DeviceUsage:
        dev = self._device(device)
        mine = [x for x in self._leases.values() if x.device == device]
        return DeviceUsage(
            device=device,
            cap=dev.cap,
            leases=len(mine),
            bytes_leased=sum(x.block.nbytes for x in mine),
            alloc=dev.allocator.stats(),
        )

    def devices(self) -> list[str]:
        return sorted(self._devices)

    # Internals

    def _device(self, device: str) -> _Device:
        try:
            return self._devices[device]
        except KeyError:
            raise LeaseError(Fault.UNKNOWN_DEVICE, f"no pool on device {device!r}") from None

    def _charge(self, lease: Lease) -> int:
        """What a lease counts against its tenant's byte quota: its aligned size
        (the same wherever it moves)."""
        a = self._alignment
        return max(a, (lease.nbytes + a - 1) // a * a)

    def _check_quota(self, tenant: str, nbytes: int) -> None:
        bytes_held, leases = self.held(tenant)
        if self.tenant_leases and leases + 1 > self.tenant_leases:
            raise LeaseError(
                Fault.QUOTA,
                f"tenant {tenant!r} holds {leases} leases, the most its quota on this "
                "node allows (GFAAS_TENANT_MAX_LEASES); release some first",
            )
        if self.tenant_bytes and bytes_held + nbytes > self.tenant_bytes:
            raise LeaseError(
                Fault.QUOTA,
                f"tenant {tenant!r} holds {bytes_held} pooled bytes; {nbytes} more would "
                f"exceed its quota of {self.tenant_bytes} on this node "
                "(GFAAS_TENANT_POOL_MB); release some first",
            )

    def _alloc(self, dev: _Device, device: str, nbytes: int) -> tuple[Block, int]:
        block = dev.allocator.alloc(nbytes)
        if block is None:
            stats = dev.allocator.stats()
            raise LeaseError(
                Fault.EXHAUSTED,
                f"pool of device {device} exhausted: {nbytes} bytes asked, "
                f"largest free block {stats.largest_free}, {stats.used}/{stats.held} bytes "
                f"in use (cap {dev.cap})",
            )
        key = (block.slab_id, block.offset)
        generation = dev.generations.get(key, 0) + 1
        dev.generations[key] = generation
        return block, generation

    def check_holder(self, lease_id: str, holder: str) -> Lease:
        lease = self.get(lease_id)
        if holder not in dict(lease.holders):
            raise LeaseError(Fault.NOT_HOLDER, f"{holder} holds no reference to {lease_id}")
        return lease

    def _queue_expiry(self, at: float, lease_id: str) -> None:
        """Queue an expiry. Entries of leases released (or renewed) since are skipped
        when they come up, not searched for at release; once they outnumber the live
        leases the queue is rebuilt from those, so dead entries never pile up for a
        whole TTL (an hour at most, at a thousand leases a second)."""
        heapq.heappush(self._expiry, (at, lease_id))
        if len(self._expiry) > 2 * len(self._leases) + _EXPIRY_SLACK:
            self._expiry = [
                (x.expires_at, x.lease_id) for x in self._leases.values() if x.expires_at < math.inf
            ]
            heapq.heapify(self._expiry)

    def _put(self, lease: Lease) -> Lease:
        self._leases[lease.lease_id] = lease
        return lease

    def _retire(self, lease: Lease, why: str) -> Lease:
        del self._leases[lease.lease_id]
        pending = self._moving.get(lease.lease_id)
        if pending is not None:
            pending.append((lease.device, lease.block))
        elif lease.lease_id in self._pins:
            self._pinned_blocks[lease.lease_id] = (lease.device, lease.block)
        else:
            self._devices[lease.device].allocator.free(lease.block)
        held = self._held.get(lease.tenant)
        if held is not None:
            held[0] -= self._charge(lease)
            held[1] -= 1
            if held[1] <= 0:
                del self._held[lease.tenant]
        self._retired[lease.lease_id] = (why, lease.tenant)
        if len(self._retired) > _RETIRED_MEMORY:
            self._retired.popitem(last=False)
        return lease

"""The node's pools: one lease table over every device, a slab set per device.

The policy pieces (LeaseTable, ElasticPool, LinkScheduler) are the pure ones from
shared.dataplane; this class adds the backend I/O they leave out (creating and
destroying slabs) and the all-or-nothing batch operations the broker's subjects
offer. Time is an argument, so tests drive it without sleeping.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import anyio
import msgspec

from shared.dataplane.backend import Backend
from shared.dataplane.board import LeaseBoard
from shared.dataplane.client import NO_POOL
from shared.dataplane.elastic import ElasticConfig, ElasticPool, Intermediate, SlabUse, plan_spill
from shared.dataplane.leases import Fault, Lease, LeaseError, LeaseTable
from shared.dataplane.shm import ShmBackend
from shared.errors import GfaasError
from shared.schema import ErrorCode, Handle

# Copies a lease's bytes from one place to another: (source, destination) handles.
Copy = Callable[[Handle, Handle], Awaitable[None]]


@dataclass
class DevicePool:
    device: str
    backend: Backend
    elastic: ElasticPool
    # Slab id -> backend segment, for destroying it when the slab goes.
    segments: dict[int, str] = field(default_factory=dict)
    slabs_created: int = 0
    slabs_returned: int = 0


class NodePools:
    def __init__(
        self,
        *,
        node: str,
        instance: str,
        default_ttl_s: float,
        board: LeaseBoard | None = None,
        spill_to: str = "cpu",
        prefetch_horizon_s: float = 1.0,
    ) -> None:
        self.node = node
        # Where parked intermediates go when a device pool is full (host memory), and
        # how soon a reader must be due for its data to be brought back ahead of it.
        self.spill_to = spill_to
        self.prefetch_horizon_s = prefetch_horizon_s
        # Leases being copied to a new place: done when set.
        self._moves: dict[str, anyio.Event] = {}
        self.parks = 0
        self.spilled = 0
        self.restored = 0
        self.board = board
        self.table = LeaseTable(id_prefix=f"{instance}.")
        self.default_ttl_s = default_ttl_s
        self.devices: dict[str, DevicePool] = {}
        self.refused = 0
        self.reclaimed = 0
        self.expired = 0

    def add_device(self, device: str, backend: Backend, config: ElasticConfig) -> None:
        self.table.add_device(device, config.max_bytes)
        self.devices[device] = DevicePool(device, backend, ElasticPool(config))

    # -- leases ------------------------------------------------------------------------

    def lease(
        self, sizes: Sequence[int], device: str, owner: str, tenant: str, ttl_s: float, now: float
    ) -> list[Handle]:
        """One lease per size, all or none: a batch that cannot be served takes nothing."""
        pool = self._pool(device)
        ttl = ttl_s if ttl_s > 0 else self.default_ttl_s
        taken: list[Lease] = []
        try:
            for nbytes in sizes:
                taken.append(self._lease_one(pool, nbytes, owner, tenant, ttl, now))
        except LeaseError:
            self.refused += 1
            for lease in taken:
                self.table.free(lease.lease_id)
            raise
        return [self._handle(lease, self._publish(lease)) for lease in taken]

    def _lease_one(
        self, pool: DevicePool, nbytes: int, owner: str, tenant: str, ttl: float, now: float
    ) -> Lease:
        try:
            lease = self.table.lease(nbytes, pool.device, owner, now=now, tenant=tenant, ttl=ttl)
        except LeaseError as exc:
            if exc.fault is not Fault.EXHAUSTED:
                raise
            plan = pool.elastic.grow_for(nbytes, self._slab_uses(pool))
            if not plan.add:
                raise
            for size in plan.add:
                self._create_slab(pool, size)
            lease = self.table.lease(nbytes, pool.device, owner, now=now, tenant=tenant, ttl=ttl)
        pool.elastic.demand.observe_lease(now, nbytes)
        return lease

    # -- parking, spilling, bringing back ----------------------------------------------

    def park(self, handles: Sequence[Handle], holder: str, tenant: str, next_use: float) -> None:
        """`holder` says nobody reads these until it unparks them, and when the next
        reader is due (inf: not known). Parked data may be spilled to host memory to
        make room on its device, furthest next use first; one due soon is brought back
        ahead of its reader."""
        leases = [self.table.check_ref(h, tenant) for h in handles]
        for lease in leases:
            self.table.check_holder(lease.lease_id, holder)
        for lease in leases:
            self.parks += not lease.parked
            self.table.park(lease.lease_id, holder, next_use=next_use)
            if self.board is not None:
                self.board.retract(lease.lease_id)

    async def lease_or_spill(
        self,
        sizes: Sequence[int],
        device: str,
        owner: str,
        tenant: str,
        ttl_s: float,
        now: float,
        copy: Copy,
    ) -> list[Handle]:
        """`lease`, spilling parked data of a full device to host memory first if that
        makes room, furthest next use first (shared.dataplane.elastic.plan_spill)."""
        try:
            return self.lease(sizes, device, owner, tenant, ttl_s, now)
        except LeaseError as exc:
            if exc.fault is not Fault.EXHAUSTED:
                raise
            refused = exc
        pool = self._pool(device)
        for lease in self._spill_order(pool):
            if not await self._move(lease, self.spill_to, copy):
                continue
            self.spilled += 1
            self.refused -= 1  # the refusal above is counted once, if at all
            try:
                return self.lease(sizes, device, owner, tenant, ttl_s, now)
            except LeaseError as exc:
                if exc.fault is not Fault.EXHAUSTED:
                    raise
        raise refused

    async def unpark(
        self, handles: Sequence[Handle], holder: str, tenant: str, copy: Copy
    ) -> list[Handle]:
        """Readable again, back on its device if there is room (else still in host
        memory, where the reader maps it or has the broker copy it): current handles.

        A lease that is not parked (never was, or unparked already) is left as it is:
        its current handle, on the board slot it already has."""
        leases = [self.table.check_ref(h, tenant) for h in handles]
        for lease in leases:
            self.table.check_holder(lease.lease_id, holder)
        current: list[Handle] = []
        for lease in leases:
            await self._moved(lease.lease_id)  # a prefetch of it may be under way
            lease = self.table.get(lease.lease_id)
            if not lease.parked:
                slot = self.board.slot_of(lease.lease_id) if self.board is not None else -1
                current.append(self._handle(lease, slot))
                continue
            # Only parked data moves: an unparked lease may be being read right now.
            if (
                lease.parked
                and lease.spilled
                and await self._bring_back(lease, copy, make_room=True)
            ):
                lease = self.table.get(lease.lease_id)
            lease = self.table.unpark(lease.lease_id, holder)
            current.append(self._handle(lease, self._publish(lease)))
        return current

    async def prefetch(self, now: float, copy: Copy) -> int:
        """Parked data in host memory whose reader is due soon goes back to its device
        now, while there is room (nothing is spilled for it): its holder then unparks
        it in place. Returns how many came back."""
        horizon = now + self.prefetch_horizon_s
        due = sorted(
            (
                x
                for x in self.table
                if x.parked
                and x.spilled
                and x.next_use <= horizon
                and not self.table.moving(x.lease_id)
            ),
            key=lambda x: x.next_use,
        )
        back = 0
        for lease in due:
            fresh = self.table.lease_or_none(lease.lease_id)
            if fresh is not None and fresh.parked and fresh.spilled:
                back += await self._bring_back(fresh, copy, make_room=False)
        return back

    def _spill_order(self, pool: DevicePool) -> list[Lease]:
        if pool.device == self.spill_to:
            return []  # host memory has nowhere further to go
        parked = {
            x.lease_id: x
            for x in self.table
            if x.parked and x.device == pool.device and not self.table.moving(x.lease_id)
        }
        items = [
            Intermediate(x.lease_id, x.nbytes, on_device=True, next_use=x.next_use)
            for x in parked.values()
        ]
        order, _ = plan_spill(items, need_bytes=sum(i.nbytes for i in items))
        return [parked[k] for k in order]

    async def _bring_back(self, lease: Lease, copy: Copy, *, make_room: bool) -> bool:
        if await self._move(lease, lease.home, copy):
            self.restored += 1
            return True
        if not make_room:
            return False
        home = self.devices[lease.home]
        for victim in self._spill_order(home):
            if victim.lease_id == lease.lease_id or not await self._move(
                victim, self.spill_to, copy
            ):
                continue
            self.spilled += 1
            fresh = self.table.lease_or_none(lease.lease_id)
            if fresh is None or not fresh.parked:
                return False
            if await self._move(fresh, lease.home, copy):
                self.restored += 1
                return True
        return False

    async def _move(self, lease: Lease, device: str, copy: Copy) -> bool:
        """Copy a parked lease's bytes to a new block on `device`; False if no room,
        or if the lease is no longer there to move (released, unparked or moving since
        it was chosen: copies run while the broker serves other work)."""
        fresh = self.table.lease_or_none(lease.lease_id)
        if fresh is None or not fresh.parked or self.table.moving(lease.lease_id):
            return False
        if fresh.device == device:
            return True
        lease = fresh
        try:
            before, after = self.table.relocate(lease.lease_id, device)
        except LeaseError as exc:
            if exc.fault is not Fault.EXHAUSTED:
                raise
            pool = self.devices[device]
            plan = pool.elastic.grow_for(lease.nbytes, self._slab_uses(pool))
            if not plan.add:
                return False
            for size in plan.add:
                self._create_slab(pool, size)
            before, after = self.table.relocate(lease.lease_id, device)
        done = self._moves[lease.lease_id] = anyio.Event()
        try:
            if lease.nbytes:
                await copy(self._handle(before, -1), self._handle(after, -1))
        except BaseException:
            self.table.abort_move(before)
            raise
        else:
            self.table.finish_move(lease.lease_id)
        finally:
            del self._moves[lease.lease_id]
            done.set()
        return True

    async def _moved(self, lease_id: str) -> None:
        moving = self._moves.get(lease_id)
        if moving is not None:
            await moving.wait()

    def check(self, handles: Sequence[Handle], tenant: str) -> None:
        for handle in handles:
            self.table.check(handle, tenant)

    def check_refs(self, handles: Sequence[Handle], tenant: str) -> None:
        for handle in handles:
            self.table.check_ref(handle, tenant)

    def retain(self, handles: Sequence[Handle], holder: str, tenant: str) -> None:
        self.check_refs(handles, tenant)
        for handle in handles:
            self.table.retain(handle.lease_id, holder)

    def release(self, handles: Sequence[Handle], holder: str, tenant: str, now: float) -> None:
        self.check_refs(handles, tenant)
        for handle in handles:
            self._note_freed(self.table.release(handle.lease_id, holder), now)

    def transfer(self, handles: Sequence[Handle], holder: str, to: str, tenant: str) -> None:
        """Move `holder`'s reference to `to` (a worker hands its outputs to the caller)."""
        self.check_refs(handles, tenant)
        for handle in handles:
            holders = dict(self.table.get(handle.lease_id).holders)
            if holder not in holders:
                raise LeaseError(
                    Fault.NOT_HOLDER, f"{holder} holds no reference to {handle.lease_id}"
                )
        for handle in handles:
            self.table.retain(handle.lease_id, to)
            self.table.release(handle.lease_id, holder)

    def reclaim(self, owner: str, now: float) -> int:
        """A dead worker's references go; data a live holder still has stays."""
        freed = self.table.reclaim_owner(owner)
        for lease in freed:
            self._note_freed(lease, now)
        self.reclaimed += len(freed)
        return len(freed)

    def lease_of(self, handle: Handle, tenant: str) -> Lease:
        return self.table.check(handle, tenant)

    # -- periodic ----------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Expire leases past their TTL, then resize each pool towards its target."""
        for lease in self.table.expire(now):
            self.expired += 1
            self._note_freed(lease, now)
        for pool in self.devices.values():
            plan = pool.elastic.plan(now, self._slab_uses(pool))
            for size in plan.add:
                self._create_slab(pool, size)
            for slab_id in plan.remove:
                self._destroy_slab(pool, slab_id)

    def close(self) -> None:
        """Free everything and destroy every slab (the broker is stopping)."""
        for lease in list(self.table):
            self._note_freed(self.table.free(lease.lease_id), 0.0)
        for pool in self.devices.values():
            for slab_id in list(pool.segments):
                self._destroy_slab(pool, slab_id)

    # -- accounting --------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        pools: dict[str, object] = {}
        for device, pool in self.devices.items():
            usage = self.table.usage(device)
            pools[device] = {
                "backend": pool.backend.kind,
                "cap": usage.cap,
                "held": usage.alloc.held,
                "leased": usage.bytes_leased,
                "leases": usage.leases,
                "slabs": len(pool.segments),
                "slabs_created": pool.slabs_created,
                "slabs_returned": pool.slabs_returned,
                "largest_free": usage.alloc.largest_free,
            }
        return {
            "node": self.node,
            "pools": pools,
            "leases": len(self.table),
            "bytes_leased": sum(self.table.usage(d).bytes_leased for d in self.devices),
            "refused": self.refused,
            "reclaimed": self.reclaimed,
            "expired": self.expired,
            "parked": sum(1 for x in self.table if x.parked),
            "parks": self.parks,
            "spilled_now": sum(1 for x in self.table if x.spilled),
            "spills": self.spilled,
            "restores": self.restored,
        }

    # -- internals ---------------------------------------------------------------------

    def _pool(self, device: str) -> DevicePool:
        pool = self.devices.get(device)
        if pool is None:
            raise GfaasError(
                ErrorCode.BAD_REQUEST,
                f"node {self.node} {NO_POOL} {device!r}; pools: {sorted(self.devices)}",
            )
        return pool

    def _publish(self, lease: Lease) -> int:
        return self.board.publish(lease) if self.board is not None else -1

    def _handle(self, lease: Lease, slot: int) -> Handle:
        pool = self.devices[lease.device]
        handle = self.table.to_handle(lease, backend=pool.backend.kind, pool=self.node)
        return msgspec.structs.replace(handle, slot=slot)

    def _slab_uses(self, pool: DevicePool) -> list[SlabUse]:
        return [
            SlabUse(s.slab_id, s.size, self.table.slab_used(pool.device, s.slab_id))
            for s in self.table.slabs(pool.device)
        ]

    def remove_leftovers(self) -> list[str]:
        """Unlink the shared-memory slabs a dead predecessor on this node left (one
        killed before it could destroy them); only their exact names are touched.
        Call it before the first slab is created. Device slabs die with their process."""
        gone: list[str] = []
        for pool in self.devices.values():
            if isinstance(pool.backend, ShmBackend):
                gone.extend(pool.backend.remove_leftovers(self._slab_pool(pool.device)))
        return gone

    def _slab_pool(self, device: str) -> str:
        return f"{self.node}-{device.replace(':', '')}"

    def _create_slab(self, pool: DevicePool, size: int) -> None:
        ref = pool.backend.create_slab(size, self._slab_pool(pool.device))
        slab = self.table.add_slab(pool.device, ref.size, ref.segment)
        pool.segments[slab.slab_id] = ref.segment
        pool.slabs_created += 1

    def _destroy_slab(self, pool: DevicePool, slab_id: int) -> None:
        self.table.remove_slab(pool.device, slab_id)
        pool.backend.destroy_slab(pool.segments.pop(slab_id))
        pool.slabs_returned += 1

    def _note_freed(self, lease: Lease | None, now: float) -> None:
        if lease is None:
            return
        if self.board is not None:
            self.board.retract(lease.lease_id)
        lifetime = now - lease.created_at
        if math.isfinite(lifetime):
            self.devices[lease.home or lease.device].elastic.demand.observe_release(
                lease.nbytes, lifetime
            )

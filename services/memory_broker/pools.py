"""The node's pools: one lease table over every device, a slab set per device.

The policy pieces (LeaseTable, ElasticPool) are the pure ones from shared.dataplane;
this class adds the batch operations the broker's subjects offer (all or nothing,
but for `release`), and moves parked leases between devices (spill, prefetch, bring
back) over the node's links, which it is given. Time is an argument, so tests drive
it without sleeping.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import anyio
import msgspec

from services.memory_broker.slabs import DevicePool
from shared.dataplane.backend import Backend
from shared.dataplane.board import LeaseBoard
from shared.dataplane.elastic import ElasticConfig, ElasticPool, Intermediate, plan_spill
from shared.dataplane.leases import Fault, Lease, LeaseError, LeaseTable
from shared.errors import GfaasError
from shared.schema import ErrorCode, Handle


class Mover(Protocol):
    """What moves a lease's bytes to its new place: the broker's Links (a test's
    stand-in copies in place)."""

    async def move(self, src: Handle, dst: Handle) -> None: ...


class NodePools:
    def __init__(
        self,
        *,
        node: str,
        instance: str,
        default_ttl_s: float,
        links: Mover,
        board: LeaseBoard | None = None,
        spill_to: str = "cpu",
        prefetch_horizon_s: float = 1.0,
        max_ttl_s: float = math.inf,
        tenant_bytes: int = 0,
        tenant_leases: int = 0,
    ) -> None:
        self.node = node
        # The longest TTL a lease may ask for; each tenant's quota is the table's.
        self.max_ttl_s = max_ttl_s
        # Where parked intermediates go when a device pool is full (host memory), and
        # how soon a reader must be due for its data to be brought back ahead of it.
        self.spill_to = spill_to
        self.prefetch_horizon_s = prefetch_horizon_s
        self.links = links
        # Set when a move ends; whoever waits for one asks the table which leases are
        # still moving (it alone keeps that), so nothing here tracks them per lease.
        self._move_ended: anyio.Event | None = None
        self.parks = 0
        self.spilled = 0
        self.restored = 0
        self.board = board
        self.table = LeaseTable(
            id_prefix=f"{instance}.",
            tenant_bytes=tenant_bytes,
            tenant_leases=tenant_leases,
            # A reader may keep a lease past its TTL as long as a new lease could last.
            hold_past_ttl_s=max_ttl_s if math.isfinite(max_ttl_s) else None,
        )
        self.scrubbed_bytes = 0
        self.default_ttl_s = default_ttl_s
        self.devices: dict[str, DevicePool] = {}
        self.refused = 0
        self.reclaimed = 0
        self.expired = 0

    def add_device(self, device: str, backend: Backend, config: ElasticConfig) -> None:
        self.table.add_device(device, config.max_bytes)
        slab_pool = f"{self.node}-{device.replace(':', '')}"
        self.devices[device] = DevicePool(device, backend, ElasticPool(config), slab_pool)

    # -- leases ------------------------------------------------------------------------

    def lease(
        self, sizes: Sequence[int], device: str, owner: str, tenant: str, ttl_s: float, now: float
    ) -> list[Handle]:
        """One lease per size, all or none: a batch that cannot be served takes nothing."""
        pool = self._pool(device)
        ttl = self._ttl(ttl_s)
        taken: list[Lease] = []
        try:
            for nbytes in sizes:
                taken.append(self._lease_one(pool, nbytes, owner, tenant, ttl, now))
        except BaseException as exc:
            # Whatever stopped the batch: its caller never hears of the leases taken
            # so far, which nobody could then release (held, and charged to the
            # tenant's quota, until their TTL).
            self.refused += isinstance(exc, LeaseError)
            for lease in taken:
                self.table.free(lease.lease_id)
            raise
        for lease in taken:
            if lease.scrub:  # another tenant's bytes may be there: zeroed before anyone looks
                self._scrub(lease)
        return [self._handle(lease, self._publish(lease)) for lease in taken]

    def _ttl(self, ttl_s: float) -> float:
        """The TTL a lease asking for `ttl_s` gets (0 or less: the default); one over
        the node's maximum (inf, NaN) is refused before anything is allocated."""
        ttl = ttl_s if ttl_s > 0 else self.default_ttl_s
        if math.isnan(ttl_s) or not ttl <= self.max_ttl_s:
            raise GfaasError(
                ErrorCode.BAD_REQUEST,
                f"lease TTL {ttl_s} s exceeds this node's maximum of {self.max_ttl_s:g} s "
                "(GFAAS_MAX_LEASE_TTL_S)",
            )
        return ttl

    def _scrub(self, lease: Lease) -> None:
        if lease.nbytes:
            # Through the pool's own backend: its mapping of the slab is open already.
            backend = self.devices[lease.device].backend
            n = lease.nbytes
            backend.as_torch(lease.segment, lease.offset, n, "uint8", [n]).zero_()
        self.scrubbed_bytes += lease.nbytes

    def _lease_one(
        self, pool: DevicePool, nbytes: int, owner: str, tenant: str, ttl: float, now: float
    ) -> Lease:
        try:
            lease = self.table.lease(nbytes, pool.device, owner, now=now, tenant=tenant, ttl=ttl)
        except LeaseError as exc:
            if exc.fault is not Fault.EXHAUSTED or not pool.grow_for(self.table, nbytes):
                raise
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
            if not await self._move(lease, self.spill_to):
                continue
            self.spilled += 1
            self.refused -= 1  # the refusal above is counted once, if at all
            try:
                return self.lease(sizes, device, owner, tenant, ttl_s, now)
            except LeaseError as exc:
                if exc.fault is not Fault.EXHAUSTED:
                    raise
        raise refused

    async def unpark(self, handles: Sequence[Handle], holder: str, tenant: str) -> list[Handle]:
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
            if lease.parked and lease.spilled and await self._bring_back(lease, make_room=True):
                lease = self.table.get(lease.lease_id)
            lease = self.table.unpark(lease.lease_id, holder)
            current.append(self._handle(lease, self._publish(lease)))
        return current

    async def prefetch(self, now: float) -> int:
        """Parked data in host memory whose reader is due soon goes back to its device
        now, while there is room (nothing is spilled for it): its holder then unparks
        it in place. Returns how many came back."""
        horizon = now + self.prefetch_horizon_s
        due = sorted(
            (
                x
                for x in self.table
                if x.parked and x.spilled and x.next_use <= horizon and not self._busy(x.lease_id)
            ),
            key=lambda x: x.next_use,
        )
        back = 0
        for lease in due:
            fresh = self.table.lease_or_none(lease.lease_id)
            if fresh is not None and fresh.parked and fresh.spilled:
                back += await self._bring_back(fresh, make_room=False)
        return back

    def _spill_order(self, pool: DevicePool) -> list[Lease]:
        if pool.device == self.spill_to:
            return []  # host memory has nowhere further to go
        parked = {
            x.lease_id: x
            for x in self.table
            if x.parked and x.device == pool.device and not self._busy(x.lease_id)
        }
        items = [
            Intermediate(x.lease_id, x.nbytes, on_device=True, next_use=x.next_use)
            for x in parked.values()
        ]
        order, _ = plan_spill(items, need_bytes=sum(i.nbytes for i in items))
        return [parked[k] for k in order]

    async def _bring_back(self, lease: Lease, *, make_room: bool) -> bool:
        if await self._move(lease, lease.home):
            self.restored += 1
            return True
        if not make_room:
            return False
        home = self.devices[lease.home]
        for victim in self._spill_order(home):
            if victim.lease_id == lease.lease_id or not await self._move(victim, self.spill_to):
                continue
            self.spilled += 1
            fresh = self.table.lease_or_none(lease.lease_id)
            if fresh is None or not fresh.parked:
                return False
            if await self._move(fresh, lease.home):
                self.restored += 1
                return True
        return False

    async def _move(self, lease: Lease, device: str) -> bool:
        """Copy a parked lease's bytes to a new block on `device`; False if no room,
        or if the lease is no longer there to move (released, unparked or moving since
        it was chosen: copies run while the broker serves other work)."""
        fresh = self.table.lease_or_none(lease.lease_id)
        if fresh is None or not fresh.parked or self._busy(lease.lease_id):
            return False
        if fresh.device == device:
            return True
        lease = fresh
        try:
            before, after = self.table.relocate(lease.lease_id, device)
        except LeaseError as exc:
            if exc.fault is not Fault.EXHAUSTED:
                raise
            if not self.devices[device].grow_for(self.table, lease.nbytes):
                return False
            before, after = self.table.relocate(lease.lease_id, device)
        try:
            if lease.nbytes:
                await self.links.move(self._handle(before, -1), self._handle(after, -1))
        except BaseException:
            self.table.abort_move(before)
            raise
        else:
            self.table.finish_move(lease.lease_id)
        finally:
            if self._move_ended is not None:
                self._move_ended.set()
                self._move_ended = None
        return True

    def _busy(self, lease_id: str) -> bool:
        """Being moved, or being copied by the broker (a copy's source or destination):
        either way its block stays where it is."""
        return self.table.moving(lease_id) or self.table.pinned(lease_id)

    async def _moved(self, lease_id: str) -> None:
        while self.table.moving(lease_id):
            if self._move_ended is None:
                self._move_ended = anyio.Event()
            await self._move_ended.wait()

    def check(self, handles: Sequence[Handle], tenant: str) -> None:
        for handle in handles:
            self.lease_of(handle, tenant)

    def check_refs(self, handles: Sequence[Handle], tenant: str) -> None:
        for handle in handles:
            self.table.check_ref(handle, tenant)

    def retain(self, handles: Sequence[Handle], holder: str, tenant: str) -> None:
        self.check_refs(handles, tenant)
        for handle in handles:
            self.table.retain(handle.lease_id, holder)

    def release(self, handles: Sequence[Handle], holder: str, tenant: str, now: float) -> None:
        """Drop `holder`'s reference on each handle. Not all or nothing, unlike the
        other batches: a caller releasing what it holds has nothing to do with the
        refusal of one handle (expired, released already), so every other one is
        released and the refusal names the rest."""
        refused: list[LeaseError] = []
        for handle in handles:
            try:
                self.table.check_ref(handle, tenant)
                self._note_freed(self.table.release(handle.lease_id, holder), now)
            except LeaseError as exc:
                refused.append(exc)
        if len(handles) == 1 and refused:
            raise refused[0]  # as any one-handle op says it
        if refused:
            reasons = "; ".join(exc.reason for exc in refused[:8])
            more = f" (and {len(refused) - 8} more)" if len(refused) > 8 else ""
            raise LeaseError(
                refused[0].fault,
                f"released {len(handles) - len(refused)} of {len(handles)} handles; "
                f"refused {len(refused)}: {reasons}{more}",
            )

    def transfer(self, handles: Sequence[Handle], holder: str, to: str, tenant: str) -> None:
        """Move `holder`'s reference to `to` (a worker hands its outputs to the caller)."""
        self.check_refs(handles, tenant)
        # All or nothing: one reference per time a lease is named (the same handle
        # twice moves two), every one checked before any moves.
        wanted = Counter(handle.lease_id for handle in handles)
        for lease_id, n in wanted.items():
            has = dict(self.table.get(lease_id).holders).get(holder, 0)
            if has < n:
                raise LeaseError(
                    Fault.NOT_HOLDER,
                    f"{holder} holds {has} reference(s) to {lease_id}, "
                    f"the transfer names it {n} time(s)",
                )
        for handle in handles:
            self.table.transfer(handle.lease_id, holder, to)

    def reclaim(self, owner: str, now: float) -> int:
        """A dead worker's references go; data a live holder still has stays."""
        freed = self.table.reclaim_owner(owner)
        for lease in freed:
            self._note_freed(lease, now)
        self.reclaimed += len(freed)
        return len(freed)

    def lease_of(self, handle: Handle, tenant: str) -> Lease:
        """The lease a handle may read; its backend too must be the pool's, since the
        bytes are mapped through the backend the handle names (read, copy)."""
        lease = self.table.check(handle, tenant)
        kind = self.devices[lease.device].backend.kind
        if handle.backend != kind:
            raise LeaseError(
                Fault.WRONG_PLACE,
                f"lease {lease.lease_id} lives in a {kind!r} slab, handle names "
                f"backend {handle.backend!r}",
            )
        return lease

    # -- periodic ----------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Expire leases past their TTL, then resize each pool towards its target."""
        for lease in self.table.expire(now):
            self.expired += 1
            self._note_freed(lease, now)
        for pool in self.devices.values():
            pool.resize(self.table, now)

    def close(self) -> None:
        """Free everything and destroy every slab (the broker is stopping)."""
        for lease in list(self.table):
            self._note_freed(self.table.free(lease.lease_id), 0.0)
        for pool in self.devices.values():
            pool.destroy_all(self.table)

    # -- accounting --------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        return {
            "node": self.node,
            "pools": {device: pool.stats(self.table) for device, pool in self.devices.items()},
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
            "scrubbed_bytes": self.scrubbed_bytes,
        }

    # -- internals ---------------------------------------------------------------------

    def _pool(self, device: str) -> DevicePool:
        pool = self.devices.get(device)
        if pool is None:
            raise GfaasError(
                ErrorCode.NO_POOL,
                f"node {self.node} has no pool on device {device!r}; pools: {sorted(self.devices)}",
            )
        return pool

    def _publish(self, lease: Lease) -> int:
        return self.board.publish(lease) if self.board is not None else -1

    def _handle(self, lease: Lease, slot: int) -> Handle:
        pool = self.devices[lease.device]
        handle = self.table.to_handle(lease, backend=pool.backend.kind, pool=self.node)
        return msgspec.structs.replace(handle, slot=slot)

    def remove_leftovers(self) -> list[str]:
        """Unlink the shared-memory slabs a dead predecessor on this node left (one
        killed before it could destroy them); only their exact names are touched.
        Call it before the first slab is created. Device slabs die with their process."""
        return [name for pool in self.devices.values() for name in pool.remove_leftovers()]

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

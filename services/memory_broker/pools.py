"""The node's pools: one lease table over every device, a slab set per device.

The policy pieces (LeaseTable, ElasticPool, LinkScheduler) are the pure ones from
shared.dataplane; this class adds the backend I/O they leave out (creating and
destroying slabs) and the all-or-nothing batch operations the broker's subjects
offer. Time is an argument, so tests drive it without sleeping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from shared.dataplane.backend import Backend
from shared.dataplane.board import LeaseBoard
from shared.dataplane.client import NO_POOL
from shared.dataplane.elastic import ElasticConfig, ElasticPool, SlabUse
from shared.dataplane.leases import Fault, Lease, LeaseError, LeaseTable
from shared.errors import GfaasError
from shared.schema import ErrorCode, Handle


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
    ) -> None:
        self.node = node
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

    def check(self, handles: Sequence[Handle], tenant: str) -> None:
        for handle in handles:
            self.table.check(handle, tenant)

    def retain(self, handles: Sequence[Handle], holder: str, tenant: str) -> None:
        self.check(handles, tenant)
        for handle in handles:
            self.table.retain(handle.lease_id, holder)

    def release(self, handles: Sequence[Handle], holder: str, tenant: str, now: float) -> None:
        self.check(handles, tenant)
        for handle in handles:
            self._note_freed(self.table.release(handle.lease_id, holder), now)

    def transfer(self, handles: Sequence[Handle], holder: str, to: str, tenant: str) -> None:
        """Move `holder`'s reference to `to` (a worker hands its outputs to the caller)."""
        self.check(handles, tenant)
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

    def _create_slab(self, pool: DevicePool, size: int) -> None:
        ref = pool.backend.create_slab(size, f"{self.node}-{pool.device.replace(':', '')}")
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
            self.devices[lease.device].elastic.demand.observe_release(lease.nbytes, lifetime)

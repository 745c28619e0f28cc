"""One device's pool: the backend slabs the lease table carves leases out of.

The lease table (shared.dataplane.leases) and the sizing (shared.dataplane.elastic)
are pure; this is the I/O they leave out: creating, exporting and destroying the
backend's slabs, as the elastic plan says.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.dataplane.backend import Backend, BackendError, close_mapping
from shared.dataplane.elastic import ElasticPool, SlabUse
from shared.dataplane.leases import LeaseTable
from shared.dataplane.shm import ShmBackend
from shared.logs import get_logger

log = get_logger("memory_broker")


@dataclass
class DevicePool:
    device: str
    backend: Backend
    elastic: ElasticPool
    # The name the backend gives this pool's slabs (node and device): a predecessor's
    # leftovers are found by it.
    slab_pool: str
    # Slab id -> backend segment, for destroying it when the slab goes.
    segments: dict[int, str] = field(default_factory=dict)
    slabs_created: int = 0
    slabs_returned: int = 0
    # The periodic resize could not make a slab last round (logged once per run).
    resize_failing: bool = False

    def slab_uses(self, table: LeaseTable) -> list[SlabUse]:
        return [
            SlabUse(s.slab_id, s.size, table.slab_used(self.device, s.slab_id))
            for s in table.slabs(self.device)
        ]

    def grow_for(self, table: LeaseTable, nbytes: int) -> bool:
        """Add the slab that would hold `nbytes` (an exhausted lease) if the cap allows;
        False if it does not, and nothing was added."""
        plan = self.elastic.grow_for(nbytes, self.slab_uses(table))
        for slab_id in plan.remove:  # empty slabs too small for it, making room under the cap
            self.destroy_slab(table, slab_id)
        for size in plan.add:
            # The device has less memory than the cap says: no room, which the lease
            # is refused as (overloaded), not a crashed op.
            if not self._try_create(table, size):
                return False
        return bool(plan.add)

    def resize(self, table: LeaseTable, now: float) -> None:
        """Towards the elastic target: slabs added for demand, idle ones given back.

        A slab the device cannot make is left for a later round: raising would end
        the broker's tick there, and the pools after this one, the prefetch and the
        metrics would miss it too, every round while the device stays full."""
        plan = self.elastic.plan(now, self.slab_uses(table))
        for size in plan.add:
            if not self._try_create(table, size, quiet=self.resize_failing):
                self.resize_failing = True
                break
        else:
            self.resize_failing = False
        for slab_id in plan.remove:
            self.destroy_slab(table, slab_id)

    def _try_create(self, table: LeaseTable, size: int, *, quiet: bool = False) -> bool:
        try:
            self.create_slab(table, size)
        except (BackendError, MemoryError, OSError) as exc:
            # Another process took the device's memory (cupy's OutOfMemoryError is a
            # MemoryError), or /dev/shm is full.
            if not quiet:
                log.warning(
                    "pool.slab_create_failed", device=self.device, nbytes=size, error=repr(exc)
                )
            return False
        return True

    def create_slab(self, table: LeaseTable, size: int) -> None:
        ref = self.backend.create_slab(size, self.slab_pool)
        # A new shm segment reads as zeros; device memory may hold anything.
        slab = table.add_slab(self.device, ref.size, ref.segment, clean=ref.backend == "shm")
        self.segments[slab.slab_id] = ref.segment
        self.slabs_created += 1

    def destroy_slab(self, table: LeaseTable, slab_id: int) -> None:
        table.remove_slab(self.device, slab_id)
        segment = self.segments.pop(slab_id)
        self.backend.destroy_slab(segment)
        if self.backend.kind == "shm":
            # `read`, `copy` and moves map slabs through the process's shared backend
            # (tensor_from_handle), not this one: that mapping would keep the memory.
            close_mapping(segment)
        self.slabs_returned += 1

    def destroy_all(self, table: LeaseTable) -> None:
        """Every slab, once every lease on them is freed (the broker is stopping)."""
        for slab_id in list(self.segments):
            self.destroy_slab(table, slab_id)

    def stats(self, table: LeaseTable) -> dict[str, object]:
        usage = table.usage(self.device)
        return {
            "backend": self.backend.kind,
            "cap": usage.cap,
            "held": usage.alloc.held,
            "leased": usage.bytes_leased,
            "leases": usage.leases,
            "slabs": len(self.segments),
            "slabs_created": self.slabs_created,
            "slabs_returned": self.slabs_returned,
            "largest_free": usage.alloc.largest_free,
        }

    def remove_leftovers(self) -> list[str]:
        """Unlink the shared-memory slabs a dead predecessor left under this pool's
        exact name; device slabs die with their process."""
        if isinstance(self.backend, ShmBackend):
            return self.backend.remove_leftovers(self.slab_pool)
        return []

"""The lease board: the broker's live leases, readable by every process on the node.

Checking a handle with the broker costs a round trip, as much as the handoff itself.
So the broker also publishes each live lease in a slot of a small shared-memory table
(the board), and a consumer verifies a handle by reading its slot: the lease id and
generation must match (a released or reused block fails), the tenant must be the
invocation's, and the bytes must lie inside the lease. The broker stays the only
writer; the board is as trustworthy as the pooled memory itself, which any process
on the node can map anyway.

Each slot is written under a seqlock: the writer makes the sequence odd, writes,
makes it even again; a reader retries while it sees an odd or changed sequence.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from shared.dataplane.access import GROUP_READ
from shared.dataplane.leases import Fault, Lease, LeaseError
from shared.dataplane.shm import Segment, create_segment, open_segment, unlink_segment
from shared.schema import Handle

_SEQ = struct.Struct("<Q")
# After the sequence: lease id hash, generation, tenant hash, segment hash, offset,
# nbytes, spare.
_FIELDS = struct.Struct("<QQQQQQQ")
SLOT_BYTES = _SEQ.size + _FIELDS.size
_RETRIES = 100


def _h(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def board_name(namespace: str, node: str) -> str:
    return f"{namespace}-board-{node}"


class LeaseBoard:
    """The broker's side: one slot per live lease."""

    def __init__(self, name: str, slots: int) -> None:
        unlink_segment(name)  # a board left by a crashed broker
        self.name = name
        self.slots = slots
        # Consumers only read it (BoardReader): the handler group may read, not write.
        self._segment = create_segment(name, slots * SLOT_BYTES, group_access=GROUP_READ)
        self._free = list(range(slots - 1, -1, -1))
        self._slot_of: dict[str, int] = {}

    def publish(self, lease: Lease) -> int:
        """The lease's slot, written; -1 when the board is full (consumers then ask).

        A lease already on the board keeps its slot (rewritten): a second slot would
        outlive the lease, since `retract` clears only the one it knows."""
        slot = self._slot_of.get(lease.lease_id, -1)
        if slot < 0:
            if not self._free:
                return -1
            slot = self._free.pop()
            self._slot_of[lease.lease_id] = slot
        self._write(
            slot,
            (
                _h(lease.lease_id),
                lease.generation,
                _h(lease.tenant),
                _h(lease.segment),
                lease.offset,
                lease.nbytes,
                0,
            ),
        )
        return slot

    def slot_of(self, lease_id: str) -> int:
        """The lease's slot; -1 when it is not on the board."""
        return self._slot_of.get(lease_id, -1)

    def retract(self, lease_id: str) -> None:
        slot = self._slot_of.pop(lease_id, None)
        if slot is not None:
            self._write(slot, (0, 0, 0, 0, 0, 0, 0))
            self._free.append(slot)

    def _write(self, slot: int, fields: tuple[int, ...]) -> None:
        mm = self._segment.mm
        at = slot * SLOT_BYTES
        (seq,) = _SEQ.unpack_from(mm, at)
        _SEQ.pack_into(mm, at, seq + 1)  # odd: being written
        _FIELDS.pack_into(mm, at + _SEQ.size, *fields)
        _SEQ.pack_into(mm, at, seq + 2)

    def close(self) -> None:
        self._segment.close()
        unlink_segment(self.name)


@dataclass
class BoardReader:
    """A consumer's side: verify handles without asking the broker."""

    segment: Segment

    @classmethod
    def open(cls, name: str) -> BoardReader:
        return cls(open_segment(name, readonly=True))

    def verify(self, handle: Handle, tenant: str) -> None:
        """Raise LeaseError (with the broker's fault codes) unless `tenant` may read it."""
        slot = handle.slot
        if slot < 0 or (slot + 1) * SLOT_BYTES > self.segment.size:
            raise LeaseError(Fault.UNKNOWN, f"handle {handle.lease_id} names no board slot")
        lease_hash, generation, tenant_hash, segment_hash, offset, nbytes = self._read(slot)
        if lease_hash != _h(handle.lease_id):
            raise LeaseError(Fault.STALE, f"lease {handle.lease_id} is no longer live")
        if generation != handle.generation:
            raise LeaseError(
                Fault.STALE,
                f"lease {handle.lease_id} is at generation {generation}, "
                f"handle has {handle.generation}",
            )
        if tenant_hash != _h(tenant) or _h(handle.tenant) != tenant_hash:
            raise LeaseError(
                Fault.FOREIGN_TENANT,
                f"lease {handle.lease_id} does not belong to tenant {tenant!r}",
            )
        if segment_hash != _h(handle.segment):
            raise LeaseError(Fault.WRONG_PLACE, f"lease {handle.lease_id} lives elsewhere")
        if (
            handle.nbytes < 0
            or handle.offset < offset
            or handle.offset + handle.nbytes > offset + nbytes
        ):
            raise LeaseError(
                Fault.OUT_OF_BOUNDS,
                f"bytes [{handle.offset}, {handle.offset + handle.nbytes}) are outside "
                f"lease {handle.lease_id} [{offset}, {offset + nbytes})",
            )

    def _read(self, slot: int) -> tuple[int, int, int, int, int, int]:
        mm = self.segment.mm
        at = slot * SLOT_BYTES
        for _ in range(_RETRIES):
            (seq,) = _SEQ.unpack_from(mm, at)
            lease, gen, tenant, segment, offset, nbytes, _ = _FIELDS.unpack_from(mm, at + _SEQ.size)
            (again,) = _SEQ.unpack_from(mm, at)
            if seq % 2 == 0 and seq == again:
                return lease, gen, tenant, segment, offset, nbytes
        raise LeaseError(Fault.STALE, f"board slot {slot} kept changing while read")

    def close(self) -> None:
        self.segment.close()

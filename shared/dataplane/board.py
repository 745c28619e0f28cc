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

The slots follow a header of one slot's size: a magic number, the board's state and
the broker's random epoch. A reader keeps its mapping, and a mapped segment lives on
after it is unlinked: a broker that restarts after a crash makes a new board under
the same name, while readers of the old one would still see the dead broker's leases
there. So the new broker first marks the old board retired (as `close` does on a
clean shutdown), and a reader refuses every handle on a retired board: one 8-byte
read per check. A reader holding a board can also ask `replaced` (a stat of the name)
now and then, for a board whose file someone removed before it could be retired.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
from dataclasses import dataclass

from shared.dataplane.access import GROUP_READ
from shared.dataplane.backend import BackendError
from shared.dataplane.leases import Fault, Lease, LeaseError
from shared.dataplane.shm import (
    SHM_DIR,
    Segment,
    create_segment,
    open_segment,
    trusted_owners,
    unlink_segment,
)
from shared.schema import Handle

_SEQ = struct.Struct("<Q")
# After the sequence: lease id hash, generation, tenant hash, segment hash, offset,
# nbytes, spare.
_FIELDS = struct.Struct("<QQQQQQQ")
SLOT_BYTES = _SEQ.size + _FIELDS.size
_RETRIES = 100
# The header, one slot long: magic, state, epoch (the broker's, random), spare.
_HEADER = struct.Struct("<QQQ")
HEADER_BYTES = SLOT_BYTES
_MAGIC = int.from_bytes(b"gfaasbd1", "little")
_STATE_AT = 8
LIVE = 1
RETIRED = 2


def _h(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def board_name(namespace: str, node: str) -> str:
    return f"{namespace}-board-{node}"


class LeaseBoard:
    """The broker's side: one slot per live lease."""

    def __init__(self, name: str, slots: int) -> None:
        # A board left by a crashed broker: retired first, for readers still mapping it.
        retire(name)
        unlink_segment(name)
        self.name = name
        self.slots = slots
        self.epoch = secrets.randbits(63) | 1
        # Consumers only read it (BoardReader): the handler group may read, not write.
        self._segment = create_segment(
            name, HEADER_BYTES + slots * SLOT_BYTES, group_access=GROUP_READ
        )
        _HEADER.pack_into(self._segment.mm, 0, _MAGIC, LIVE, self.epoch)
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
        at = HEADER_BYTES + slot * SLOT_BYTES
        (seq,) = _SEQ.unpack_from(mm, at)
        _SEQ.pack_into(mm, at, seq + 1)  # odd: being written
        _FIELDS.pack_into(mm, at + _SEQ.size, *fields)
        _SEQ.pack_into(mm, at, seq + 2)

    def close(self) -> None:
        # Readers still mapping it must not trust the leases of a broker that is gone.
        _SEQ.pack_into(self._segment.mm, _STATE_AT, RETIRED)
        self._segment.close()
        unlink_segment(self.name)


def retire(name: str) -> bool:
    """Mark the board under `name` retired, if there is one of ours: its readers then
    refuse every handle (and map the board anew). False when there was none."""
    try:
        segment = open_segment(name)
    except BackendError:
        return False
    try:
        if segment.uid != os.geteuid() or segment.size < HEADER_BYTES:
            return False
        if _SEQ.unpack_from(segment.mm, 0)[0] != _MAGIC:
            return False
        _SEQ.pack_into(segment.mm, _STATE_AT, RETIRED)
        return True
    finally:
        segment.close()


@dataclass
class BoardReader:
    """A consumer's side: verify handles without asking the broker."""

    segment: Segment
    epoch: int = 0

    @classmethod
    def open(cls, name: str) -> BoardReader:
        """Map the board; BackendError when there is none, or none a live broker keeps."""
        segment = open_segment(name, readonly=True)
        try:
            # A handler could plant a "live" board under the name (once the broker's
            # is gone) and invent the slots `verify` trusts.
            if segment.uid not in trusted_owners():
                raise BackendError(f"lease board {name!r} belongs to uid {segment.uid}")
            if segment.size < HEADER_BYTES:
                raise BackendError(f"{name!r} is too small for a lease board")
            magic, state, epoch = _HEADER.unpack_from(segment.mm, 0)
            if magic != _MAGIC:
                raise BackendError(f"{name!r} is not a lease board")
            if state != LIVE:
                raise BackendError(f"lease board {name!r} is retired (its broker is gone)")
        except BaseException:
            segment.close()
            raise
        return cls(segment, epoch)

    @property
    def retired(self) -> bool:
        """Whether its broker has gone (shut down, or replaced by a new one)."""
        return bool(_SEQ.unpack_from(self.segment.mm, _STATE_AT)[0] != LIVE)

    def replaced(self) -> bool:
        """Whether the board's name no longer names the segment this reader maps (a
        board removed and made anew while it could not be retired): one stat."""
        try:
            info = os.stat(SHM_DIR / self.segment.name, follow_symlinks=False)
        except OSError:
            return True
        return (info.st_dev, info.st_ino) != (self.segment.dev, self.segment.ino)

    def verify(self, handle: Handle, tenant: str) -> None:
        """Raise LeaseError (with the broker's fault codes) unless `tenant` may read it."""
        if self.retired:
            raise LeaseError(Fault.STALE, f"the lease board {self.segment.name!r} is retired")
        slot = handle.slot
        if slot < 0 or HEADER_BYTES + (slot + 1) * SLOT_BYTES > self.segment.size:
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
        at = HEADER_BYTES + slot * SLOT_BYTES
        for _ in range(_RETRIES):
            (seq,) = _SEQ.unpack_from(mm, at)
            lease, gen, tenant, segment, offset, nbytes, _ = _FIELDS.unpack_from(mm, at + _SEQ.size)
            (again,) = _SEQ.unpack_from(mm, at)
            if seq % 2 == 0 and seq == again:
                return lease, gen, tenant, segment, offset, nbytes
        raise LeaseError(Fault.STALE, f"board slot {slot} kept changing while read")

    def close(self) -> None:
        self.segment.close()

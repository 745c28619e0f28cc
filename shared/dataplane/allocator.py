"""Best-fit block allocation inside slabs, with alignment and coalescing.

A slab is one exported region (a shm segment, a CUDA IPC allocation); slabs are
exported once because exporting is expensive (FaaSTube: up to 45 ms per CUDA
block), and leases are carved from them. Blocks never span slabs.

Free blocks are kept in one list sorted by (size, slab, offset), so best-fit is a
bisect and ties go to the lowest slab id and address: the same calls give the same
layout, which the simulator relies on.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

DEFAULT_ALIGNMENT = 256


@dataclass(frozen=True, slots=True)
class Block:
    slab_id: int
    offset: int
    # Reserved bytes (the request rounded up to the alignment).
    nbytes: int


@dataclass(frozen=True, slots=True)
class SlabStats:
    slab_id: int
    size: int
    used: int
    free: int
    largest_free: int
    blocks: int


@dataclass(frozen=True, slots=True)
class AllocStats:
    slabs: int
    held: int
    used: int
    free: int
    largest_free: int
    blocks: int

    @property
    def fragmentation(self) -> float:
        """External fragmentation: 0 when all free bytes are one block, towards 1 when scattered."""
        if self.free == 0:
            return 0.0
        return 1.0 - self.largest_free / self.free


class AllocatorError(Exception):
    """Misuse of the allocator (double free, unknown slab, removing a busy slab)."""


class _Slab:
    __slots__ = ("by_end", "free", "size", "used", "used_blocks")

    def __init__(self, size: int) -> None:
        self.size = size
        self.free: dict[int, int] = {0: size}  # offset -> size
        self.by_end: dict[int, int] = {size: 0}  # end -> offset, for O(1) coalescing
        self.used_blocks: dict[int, int] = {}  # offset -> size
        self.used = 0


class SlabAllocator:
    def __init__(self, alignment: int = DEFAULT_ALIGNMENT) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self.alignment = alignment
        self._slabs: dict[int, _Slab] = {}
        self._free_index: list[tuple[int, int, int]] = []  # (size, slab_id, offset)

    # Slabs

    def add_slab(self, slab_id: int, size: int) -> None:
        if slab_id in self._slabs:
            raise AllocatorError(f"slab {slab_id} already added")
        usable = size - size % self.alignment
        if usable <= 0:
            raise ValueError(f"slab size {size} is below the alignment {self.alignment}")
        self._slabs[slab_id] = _Slab(usable)
        bisect.insort(self._free_index, (usable, slab_id, 0))

    def remove_slab(self, slab_id: int) -> None:
        slab = self._slab(slab_id)
        if slab.used_blocks:
            raise AllocatorError(f"slab {slab_id} still holds {len(slab.used_blocks)} blocks")
        self._unindex(slab_id, 0, slab.size)
        del self._slabs[slab_id]

    def slab_ids(self) -> list[int]:
        return sorted(self._slabs)

    def has_slab(self, slab_id: int) -> bool:
        return slab_id in self._slabs

    def is_empty(self, slab_id: int) -> bool:
        return not self._slab(slab_id).used_blocks

    # Blocks

    def aligned(self, nbytes: int) -> int:
        if nbytes < 0:
            raise ValueError(f"negative size {nbytes}")
        a = self.alignment
        return max(a, (nbytes + a - 1) // a * a)

    def fits(self, nbytes: int) -> bool:
        need = self.aligned(nbytes)
        return bool(self._free_index) and self._free_index[-1][0] >= need

    def alloc(self, nbytes: int) -> Block | None:
        need = self.aligned(nbytes)
        i = bisect.bisect_left(self._free_index, (need, -1, -1))
        if i == len(self._free_index):
            return None
        size, slab_id, offset = self._free_index.pop(i)
        slab = self._slabs[slab_id]
        del slab.free[offset]
        del slab.by_end[offset + size]
        if size > need:
            self._add_free(slab_id, slab, offset + need, size - need)
        slab.used_blocks[offset] = need
        slab.used += need
        return Block(slab_id, offset, need)

    def free(self, block: Block) -> None:
        slab = self._slab(block.slab_id)
        if slab.used_blocks.get(block.offset) != block.nbytes:
            raise AllocatorError(f"{block} is not allocated (double free?)")
        del slab.used_blocks[block.offset]
        slab.used -= block.nbytes
        offset, size = block.offset, block.nbytes
        before = slab.by_end.pop(offset, None)
        if before is not None:
            before_size = slab.free.pop(before)
            self._unindex(block.slab_id, before, before_size)
            offset, size = before, size + before_size
        after_size = slab.free.pop(offset + size, None)
        if after_size is not None:
            del slab.by_end[offset + size + after_size]
            self._unindex(block.slab_id, offset + size, after_size)
            size += after_size
        self._add_free(block.slab_id, slab, offset, size)

    # Accounting

    def slab_stats(self, slab_id: int) -> SlabStats:
        slab = self._slab(slab_id)
        return SlabStats(
            slab_id=slab_id,
            size=slab.size,
            used=slab.used,
            free=slab.size - slab.used,
            largest_free=max(slab.free.values(), default=0),
            blocks=len(slab.used_blocks),
        )

    def stats(self) -> AllocStats:
        held = sum(s.size for s in self._slabs.values())
        used = sum(s.used for s in self._slabs.values())
        return AllocStats(
            slabs=len(self._slabs),
            held=held,
            used=used,
            free=held - used,
            largest_free=self._free_index[-1][0] if self._free_index else 0,
            blocks=sum(len(s.used_blocks) for s in self._slabs.values()),
        )

    # Internals

    def _slab(self, slab_id: int) -> _Slab:
        try:
            return self._slabs[slab_id]
        except KeyError:
            raise AllocatorError(f"unknown slab {slab_id}") from None

    def _add_free(self, slab_id: int, slab: _Slab, offset: int, size: int) -> None:
        slab.free[offset] = size
        slab.by_end[offset + size] = offset
        bisect.insort(self._free_index, (size, slab_id, offset))

    def _unindex(self, slab_id: int, offset: int, size: int) -> None:
        i = bisect.bisect_left(self._free_index, (size, slab_id, offset))
        if i == len(self._free_index) or self._free_index[i] != (size, slab_id, offset):
            raise AllocatorError(f"free index out of sync at slab {slab_id} offset {offset}")
        del self._free_index[i]

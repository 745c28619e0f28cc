from __future__ import annotations

import itertools
import random

import pytest

from shared.dataplane.allocator import AllocatorError, Block, SlabAllocator

pytestmark = pytest.mark.unit

KiB = 1024


def test_allocations_are_aligned_and_rounded_up() -> None:
    a = SlabAllocator(alignment=256)
    a.add_slab(1, 64 * KiB)
    first = a.alloc(1)
    second = a.alloc(300)
    assert first == Block(1, 0, 256)
    assert second == Block(1, 256, 512)
    assert all(b is not None and b.offset % 256 == 0 for b in (first, second))


def test_best_fit_picks_the_smallest_hole_that_fits() -> None:
    a = SlabAllocator(alignment=256)
    a.add_slab(1, 16 * KiB)
    blocks = [a.alloc(n) for n in (4 * KiB, 256, KiB, 256, 2 * KiB, 256)]
    big, small = blocks[0], blocks[2]
    assert big is not None
    assert small is not None
    a.free(big)  # a 4 KiB hole
    a.free(small)  # a 1 KiB hole
    assert a.alloc(KiB) == small


def test_freed_neighbours_coalesce_into_one_block() -> None:
    a = SlabAllocator(alignment=256)
    a.add_slab(1, 4 * KiB)
    blocks = [a.alloc(KiB) for _ in range(4)]
    for i in (0, 2, 1, 3):
        block = blocks[i]
        assert block is not None
        a.free(block)
    stats = a.stats()
    assert stats.largest_free == 4 * KiB
    assert stats.fragmentation == 0.0
    assert a.alloc(4 * KiB) == Block(1, 0, 4 * KiB)


def test_scattered_holes_show_as_fragmentation() -> None:
    a = SlabAllocator(alignment=256)
    a.add_slab(1, 4 * KiB)
    blocks = [a.alloc(KiB) for _ in range(4)]
    for b in blocks[::2]:
        assert b is not None
        a.free(b)
    stats = a.stats()
    assert (stats.used, stats.free, stats.largest_free) == (2 * KiB, 2 * KiB, KiB)
    assert stats.fragmentation == pytest.approx(0.5)
    assert a.alloc(2 * KiB) is None


def test_a_block_never_spans_two_slabs() -> None:
    a = SlabAllocator(alignment=256)
    a.add_slab(1, 2 * KiB)
    a.add_slab(2, 2 * KiB)
    assert a.alloc(3 * KiB) is None
    assert a.stats().held == 4 * KiB


def test_a_slab_with_blocks_cannot_be_removed_and_an_empty_one_can() -> None:
    a = SlabAllocator()
    a.add_slab(1, 8 * KiB)
    block = a.alloc(KiB)
    assert block is not None
    with pytest.raises(AllocatorError, match="still holds"):
        a.remove_slab(1)
    a.free(block)
    a.remove_slab(1)
    assert a.stats().held == 0
    assert a.alloc(1) is None


def test_double_free_is_refused() -> None:
    a = SlabAllocator()
    a.add_slab(1, 8 * KiB)
    block = a.alloc(KiB)
    assert block is not None
    a.free(block)
    with pytest.raises(AllocatorError, match="double free"):
        a.free(block)


def test_alignment_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        SlabAllocator(alignment=100)


def test_random_alloc_free_keeps_accounting_exact_and_layout_deterministic() -> None:
    def run(seed: int) -> list[Block]:
        rng = random.Random(seed)
        a = SlabAllocator(alignment=64)
        for slab in range(3):
            a.add_slab(slab, 256 * KiB)
        live: list[Block] = []
        trace: list[Block] = []
        for _ in range(3000):
            if live and rng.random() < 0.45:
                a.free(live.pop(rng.randrange(len(live))))
            else:
                b = a.alloc(rng.randint(1, 20 * KiB))
                if b is not None:
                    live.append(b)
                    trace.append(b)
            stats = a.stats()
            assert stats.used == sum(b.nbytes for b in live)
            assert stats.used + stats.free == stats.held
        spans = sorted((b.slab_id, b.offset, b.offset + b.nbytes) for b in live)
        for (s1, _, end), (s2, start, _) in itertools.pairwise(spans):
            assert s1 != s2 or end <= start
        for b in live:
            a.free(b)
        assert a.stats().largest_free == 256 * KiB
        assert all(a.is_empty(s) for s in a.slab_ids())
        return trace

    assert run(7) == run(7)

"""Cost-aware eviction: which resident models to drop so a new one fits.

Cost model. Evicting model m costs, in expectation, its next swap-in: the rate
at which m is used (its decayed popularity) times its load time. Freeing space
is a knapsack; the greedy answer evicts in increasing order of
`popularity * load_s / size` -- expected reload seconds lost per byte freed --
then drops victims that turned out unnecessary (a late big victim can make an
early small one redundant). Load time grows with size, so the ratio is mostly
popularity, with the fixed per-swap overhead tilting towards keeping small
models (GreedyDual-Size-Frequency in spirit). Pinned models (loading or running)
are never victims. Ties go to the least recently used.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.scheduling.cache import DeviceCache


@dataclass(frozen=True, slots=True)
class Victims:
    keys: tuple[str, ...]
    # Expected reload seconds per second the eviction causes; 0 when nothing goes.
    cost: float


@dataclass(frozen=True, slots=True)
class CannotFit:
    """The model cannot be made resident on this device (now, or ever)."""

    reason: str
    # True when the model is bigger than the device: waiting will never help.
    permanent: bool


def choose_victims(cache: DeviceCache, key: str, size: int, now: float) -> Victims | CannotFit:
    """The cheapest set of resident models to evict so `size` bytes fit."""
    if key in cache.entries:
        return Victims((), 0.0)
    if size > cache.capacity:
        return CannotFit(
            f"model {key!r} needs {size} B but the device holds {cache.capacity} B", True
        )
    need = size - cache.free
    if need <= 0:
        return Victims((), 0.0)
    candidates = []
    for k, e in cache.entries.items():
        if e.pins == 0:
            value = cache.popularity(k, now) * e.load_s
            candidates.append((value / max(e.size, 1), e.last_used, k, e.size, value))
    if sum(c[3] for c in candidates) < need:
        return CannotFit(f"models in use pin the memory {key!r} needs", False)
    candidates.sort()
    taken = []
    freed = 0
    for c in candidates:
        taken.append(c)
        freed += c[3]
        if freed >= need:
            break
    # Give back victims (most valuable first) that the rest makes unnecessary.
    for c in sorted(taken, key=lambda c: -c[4]):
        if freed - c[3] >= need:
            taken.remove(c)
            freed -= c[3]
    return Victims(tuple(c[2] for c in taken), sum(c[4] for c in taken))


def eviction_cost(cache: DeviceCache, key: str, size: int, now: float) -> float:
    """What loading `key` here costs the cache; inf when it cannot fit."""
    result = choose_victims(cache, key, size, now)
    return float("inf") if isinstance(result, CannotFit) else result.cost

"""A pure model of one device's model cache: what is resident, pinned, popular.

Every transition returns a new DeviceCache; the old value stays valid. The
locality policy asks "what would loading X here cost" of the same value the
eviction acts on, and the simulator drives its devices with these transitions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Entry:
    size: int
    load_s: float  # what swapping it back in costs
    pins: int = 0  # requests using it (loading or running): never evicted while > 0
    last_used: float = 0.0
    # Popularity: uses, halved every `half_life_s` since `last_used`.
    score: float = 0.0
    # When an ongoing swap-in completes; 0 (or the past) = usable now.
    ready_at: float = 0.0


@dataclass(frozen=True, slots=True)
class DeviceCache:
    capacity: int
    entries: Mapping[str, Entry] = field(default_factory=dict, hash=False)
    half_life_s: float = 30.0
    # Derived from `entries`; stored because schedulers ask for it per worker per decision.
    used: int = field(default=-1, compare=False)

    def __post_init__(self) -> None:
        if self.used < 0:
            object.__setattr__(self, "used", sum(e.size for e in self.entries.values()))

    @property
    def free(self) -> int:
        return self.capacity - self.used

    @property
    def pinned_bytes(self) -> int:
        return sum(e.size for e in self.entries.values() if e.pins > 0)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def popularity(self, key: str, now: float) -> float:
        """Decayed use count of `key` at `now` (0 for a model not resident)."""
        e = self.entries.get(key)
        if e is None:
            return 0.0
        return _decay(e.score, now - e.last_used, self.half_life_s)

    def _with(self, key: str, entry: Entry | None) -> DeviceCache:
        entries = dict(self.entries)
        if entry is None:
            del entries[key]
        else:
            entries[key] = entry
        return DeviceCache(self.capacity, entries, self.half_life_s)

    def insert(
        self, key: str, size: int, load_s: float, now: float, ready_at: float = 0.0
    ) -> DeviceCache:
        """Make `key` resident (unpinned). The caller evicts first; overfilling is a bug."""
        if key in self.entries:
            raise ValueError(f"{key!r} is already resident")
        if size > self.free:
            raise ValueError(f"{key!r} ({size} B) does not fit in {self.free} B free")
        return self._with(key, Entry(size=size, load_s=load_s, last_used=now, ready_at=ready_at))

    def wait_s(self, key: str, now: float) -> float:
        """Seconds until a resident `key` finishes swapping in (0 when ready or absent)."""
        e = self.entries.get(key)
        return max(e.ready_at - now, 0.0) if e is not None else 0.0

    def ready(self, key: str, now: float) -> bool:
        """Resident and not still being swapped in."""
        e = self.entries.get(key)
        return e is not None and e.ready_at <= now

    def use(self, key: str, now: float) -> DeviceCache:
        """A request starts using `key`: pin it and count the use."""
        e = self.entries[key]
        score = _decay(e.score, now - e.last_used, self.half_life_s) + 1.0
        entry = Entry(e.size, e.load_s, e.pins + 1, now, score, e.ready_at)
        return self._with_same_size(key, entry)

    def release(self, key: str) -> DeviceCache:
        e = self.entries[key]
        if e.pins <= 0:
            raise ValueError(f"{key!r} is not in use")
        entry = Entry(e.size, e.load_s, e.pins - 1, e.last_used, e.score, e.ready_at)
        return self._with_same_size(key, entry)

    def _with_same_size(self, key: str, entry: Entry) -> DeviceCache:
        # Direct construction: dataclasses.replace is ~4x slower, and this runs
        # on every dispatch and completion.
        entries = dict(self.entries)
        entries[key] = entry
        return DeviceCache(self.capacity, entries, self.half_life_s, self.used)

    def evict(self, keys: Iterable[str]) -> DeviceCache:
        entries = dict(self.entries)
        for key in keys:
            if entries[key].pins > 0:
                raise ValueError(f"{key!r} is in use and cannot be evicted")
            del entries[key]
        return DeviceCache(self.capacity, entries, self.half_life_s)


def _decay(score: float, age_s: float, half_life_s: float) -> float:
    if age_s <= 0.0:
        return score
    return float(score * 0.5 ** (age_s / half_life_s))

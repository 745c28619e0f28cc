"""Pool sizing from observed demand, and where intermediates should live.

Sizing follows Little's law: bytes live on average = lease rate x mean size x mean
lifetime. The pool grows by whole slabs as soon as demand or an exhausted lease
asks (up to a cap), and gives a slab back only after it has been empty for a
cool-down, so a bursty load does not pay a slab export on every burst. It never
removes a slab that holds a lease.

Spilling is guided by the queue of pending consumers rather than recency: data
whose consumer runs soonest stays on the device (or is prefetched first), data with
no queued consumer goes first (Belady's furthest-next-use rule, which the queue
makes knowable).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class ElasticConfig:
    slab_size: int
    max_bytes: int
    min_slabs: int = 0
    # Extra room over the estimate: a burst is served while the estimate catches up.
    headroom: float = 1.5
    # Time constant of the rate estimate; sizes and lifetimes use `alpha` per sample.
    rate_tau_s: float = 5.0
    alpha: float = 0.05
    cooldown_s: float = 30.0
    alignment: int = 256


class DemandEstimator:
    """EWMA estimates of lease rate, size and lifetime; time is an argument."""

    def __init__(self, *, rate_tau_s: float, alpha: float) -> None:
        self._tau = rate_tau_s
        self._alpha = alpha
        self._count = 0.0  # exponentially decayed number of leases
        self._at = 0.0
        self.mean_size = 0.0
        self.mean_lifetime = 0.0
        self.mean_byte_seconds = 0.0

    def observe_lease(self, now: float, nbytes: int) -> None:
        self._count = self._decayed(now) + 1.0
        self._at = now
        self.mean_size = self._ewma(self.mean_size, float(nbytes))

    def observe_release(self, nbytes: int, lifetime_s: float) -> None:
        lifetime = max(0.0, lifetime_s)
        self.mean_lifetime = self._ewma(self.mean_lifetime, lifetime)
        # E[size x lifetime], not E[size] x E[lifetime]: big intermediates tend to live
        # longer, and one product estimate is less noisy than two multiplied.
        self.mean_byte_seconds = self._ewma(self.mean_byte_seconds, nbytes * lifetime)

    @property
    def last_lease_at(self) -> float:
        """When the last lease was observed (0.0 before any)."""
        return self._at

    def rate(self, now: float) -> float:
        return self._decayed(now) / self._tau

    def demand_bytes(self, now: float) -> float:
        """Little's law: bytes live on average = arrival rate x E[size x lifetime]."""
        return self.rate(now) * self.mean_byte_seconds

    def _decayed(self, now: float) -> float:
        return self._count * math.exp(-max(0.0, now - self._at) / self._tau)

    def _ewma(self, mean: float, sample: float) -> float:
        return sample if mean == 0.0 else mean + self._alpha * (sample - mean)


@dataclass(frozen=True, slots=True)
class SlabUse:
    slab_id: int
    size: int
    used: int


@dataclass(frozen=True, slots=True)
class PoolPlan:
    # Sizes of slabs to create, then ids of empty slabs to give back (`grow_for`
    # gives back before it creates: the cap has room only once they are gone).
    add: tuple[int, ...] = ()
    remove: tuple[int, ...] = ()
    target_bytes: int = 0


class ElasticPool:
    def __init__(self, config: ElasticConfig) -> None:
        self.config = config
        self.demand = DemandEstimator(rate_tau_s=config.rate_tau_s, alpha=config.alpha)
        self._empty_since: dict[int, float] = {}

    def target_bytes(self, now: float, live_bytes: int) -> int:
        c = self.config
        demand = self.demand.demand_bytes(now)
        # The decayed rate never reaches zero, and times a large E[size x lifetime]
        # it stays above zero bytes for an hour or more, keeping the last slab that
        # long. No lease for a whole cool-down means the pool is idle: no demand.
        if now - self.demand.last_lease_at >= c.cooldown_s:
            demand = 0.0
        wanted = max(c.headroom * demand, c.min_slabs * c.slab_size)
        return max(live_bytes, min(c.max_bytes, math.ceil(wanted)))

    def plan(self, now: float, slabs: Sequence[SlabUse]) -> PoolPlan:
        """The periodic decision: grow towards the target, give back long-idle slabs."""
        c = self.config
        self._note_empty(now, slabs)
        held = sum(s.size for s in slabs)
        live = sum(s.used for s in slabs)
        target = self.target_bytes(now, live)
        add: list[int] = []
        while held < target and held + c.slab_size <= c.max_bytes:
            add.append(c.slab_size)
            held += c.slab_size
        if add:
            return PoolPlan(add=tuple(add), target_bytes=target)
        remove: list[int] = []
        count = len(slabs)
        since = self._empty_since
        idle = sorted(
            (s for s in slabs if s.used == 0 and now - since[s.slab_id] >= c.cooldown_s),
            key=lambda s: (since[s.slab_id], -s.slab_id),
        )
        for s in idle:
            # Live bytes bound the target from below, and only empty slabs are candidates.
            if held - s.size < target or count <= c.min_slabs:
                continue
            remove.append(s.slab_id)
            held -= s.size
            count -= 1
        return PoolPlan(remove=tuple(remove), target_bytes=target)

    def grow_for(self, nbytes: int, slabs: Sequence[SlabUse]) -> PoolPlan:
        """A lease found no room: the one slab that would hold it, if the cap allows,
        giving back empty slabs first where the cap does not allow it otherwise.

        Blocks never span slabs, so empty slabs smaller than the lease are no use to
        it; kept for their cool-down they would fill the cap and refuse a lease the
        cap fits while nothing at all is leased. Largest first: fewest slabs go."""
        c = self.config
        held = sum(s.size for s in slabs)
        aligned = -(-nbytes // c.alignment) * c.alignment
        size = max(c.slab_size, aligned)
        remove: list[int] = []
        for s in sorted((s for s in slabs if s.used == 0), key=lambda s: (-s.size, s.slab_id)):
            if held + size <= c.max_bytes:
                break
            remove.append(s.slab_id)
            held -= s.size
        if held + size > c.max_bytes:
            return PoolPlan(target_bytes=sum(s.size for s in slabs))
        return PoolPlan(add=(size,), remove=tuple(remove), target_bytes=held + size)

    def _note_empty(self, now: float, slabs: Iterable[SlabUse]) -> None:
        seen: dict[int, float] = {}
        for s in slabs:
            if s.used == 0:
                seen[s.slab_id] = self._empty_since.get(s.slab_id, now)
        self._empty_since = seen


# Spill and prefetch


@dataclass(frozen=True, slots=True)
class Intermediate:
    key: str
    nbytes: int
    on_device: bool
    # When its soonest queued consumer is expected to start; inf when none is queued.
    next_use: float = math.inf
    # Being read or written now: never moved.
    in_use: bool = False


@dataclass(frozen=True, slots=True)
class PendingConsumer:
    eta: float
    inputs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ResidencyPlan:
    spill: tuple[str, ...]  # furthest next use first
    prefetch: tuple[str, ...]  # soonest next use first
    device_bytes: int  # resident after the plan


def next_uses(queue: Iterable[PendingConsumer]) -> dict[str, float]:
    uses: dict[str, float] = {}
    for consumer in queue:
        for key in consumer.inputs:
            uses[key] = min(uses.get(key, math.inf), consumer.eta)
    return uses


def with_next_uses(items: Iterable[Intermediate], uses: Mapping[str, float]) -> list[Intermediate]:
    return [
        Intermediate(i.key, i.nbytes, i.on_device, uses.get(i.key, math.inf), i.in_use)
        for i in items
    ]


def plan_spill(items: Sequence[Intermediate], need_bytes: int) -> tuple[tuple[str, ...], int]:
    """Device-resident data to move to host to free `need_bytes`: (keys, bytes freed).

    Fewer bytes than asked means even spilling everything movable is not enough.
    """
    movable = sorted(
        (i for i in items if i.on_device and not i.in_use),
        key=lambda i: (-i.next_use, -i.nbytes, i.key),
    )
    chosen: list[str] = []
    freed = 0
    for i in movable:
        if freed >= need_bytes:
            break
        chosen.append(i.key)
        freed += i.nbytes
    return tuple(chosen), freed


def plan_residency(
    items: Sequence[Intermediate], capacity: int, *, now: float, horizon_s: float
) -> ResidencyPlan:
    """Which data should sit on the device: in-use first, then by soonest consumer.

    Host data is prefetched only when its consumer is due within `horizon_s`;
    device data is spilled only when something due sooner needs its room.
    """
    budget = capacity - sum(i.nbytes for i in items if i.on_device and i.in_use)
    spill: list[Intermediate] = []
    prefetch: list[str] = []
    rest = sorted((i for i in items if not i.in_use), key=lambda i: (i.next_use, i.key))
    for i in rest:
        wanted = i.on_device or i.next_use <= now + horizon_s
        if wanted and i.nbytes <= budget:
            budget -= i.nbytes
            if not i.on_device:
                prefetch.append(i.key)
        elif i.on_device:
            spill.append(i)
    spill.sort(key=lambda i: (-i.next_use, i.key))
    return ResidencyPlan(
        spill=tuple(i.key for i in spill),
        prefetch=tuple(prefetch),
        device_bytes=capacity - budget,
    )

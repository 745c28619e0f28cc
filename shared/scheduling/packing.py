"""Placing shared-GPU instances onto devices: 2-D packing of space x time, plus memory.

A device is the unit square of (SM share) x (token window). An instance with
`Config(sm_share, time_quota)` is a rectangle of that width and height: its SMs for
its slot of every window (FaST-GShare's Maximal Rectangles packing). Rectangles
never overlap and never leave the square, so at any instant of the window the SM
shares of the instances holding the GPU sum to at most 100%, and every SM is lent
for at most the whole window: neither dimension is ever overcommitted. Memory is the
third resource, a sum, except that on a device whose instances share read-only
weights (`Device.shares_weights`: one copy per model that every instance of it
maps) each model's weights count once however many of its instances run there.
Shares are whole percent (MPS takes an integer active
thread percentage), which keeps the geometry exact.

Where. Among the devices an instance fits on, the ones whose device tier already
holds its model come first (another instance can share the weights: the start costs
no copy), then those whose node holds it in the host tier (a copy over the local
link, no fetch), then the best fit: the device left with the least free area
(consolidation leaves whole devices for large instances), then least free memory.
Within a device, the free rectangle with the best short-side fit.

Scale-in is the inverse: `scale_in_order` ranks instances for removal from the
emptiest device first, so devices drain instead of all staying half full.

Pure: every transition returns a new Device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from shared.scheduling.autoscale import Config

UNITS = 100  # per side of the square: whole percent of SMs, hundredths of a window


def units(fraction: float) -> int:
    """A share in whole percent; shares finer than that cannot be enforced."""
    n = round(fraction * UNITS)
    if not 1 <= n <= UNITS or abs(n - fraction * UNITS) > 1e-6:
        raise ValueError(f"a share must be a whole percent in (0, 1], got {fraction}")
    return n


@dataclass(frozen=True, slots=True)
class Rect:
    x: int  # SMs, from the left
    y: int  # time in the window, from its start
    w: int
    h: int

    def overlaps(self, o: Rect) -> bool:
        return (
            self.x < o.x + o.w
            and o.x < self.x + self.w
            and self.y < o.y + o.h
            and (o.y < self.y + self.h)
        )

    def contains(self, o: Rect) -> bool:
        return (
            self.x <= o.x
            and self.y <= o.y
            and o.x + o.w <= self.x + self.w
            and o.y + o.h <= self.y + self.h
        )

    @property
    def area(self) -> int:
        return self.w * self.h


@dataclass(frozen=True, slots=True)
class Demand:
    """An instance to place."""

    instance_id: str
    function: str
    model: str
    config: Config
    memory: int  # bytes: weights, context, activations
    # Of `memory`, the model's weights: on a device that shares weights, held once
    # for every instance of the model there.
    weights: int = 0


@dataclass(frozen=True, slots=True)
class Slot:
    """A placed instance and the rectangle it holds."""

    demand: Demand
    rect: Rect


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    memory_total: int  # bytes instances may use
    node: str = ""
    slots: tuple[Slot, ...] = ()
    device_models: frozenset[str] = frozenset()  # resident in this device's memory
    host_models: frozenset[str] = frozenset()  # resident in its node's host tier
    shares_weights: bool = False  # instances of one model here map one copy of it
    # Derived from `slots`; kept because placement asks for them per device per decision.
    free: tuple[Rect, ...] = field(default=(), init=False, compare=False, repr=False)
    memory_used: int = field(default=0, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "free", _free_rects(s.rect for s in self.slots))
        object.__setattr__(
            self, "memory_used", memory_used([s.demand for s in self.slots], self.shares_weights)
        )

    @property
    def memory_free(self) -> int:
        return self.memory_total - self.memory_used

    @property
    def free_area(self) -> int:
        """Square units no instance holds (the rectangles never overlap)."""
        return UNITS * UNITS - sum(s.rect.area for s in self.slots)

    @property
    def share_used(self) -> float:
        """Device share held, in [0, 1]: the area of its rectangles."""
        return 1.0 - self.free_area / (UNITS * UNITS)

    def tier(self, model: str) -> int:
        """0: in this device's memory, 1: in the node's host tier, 2: neither."""
        if model in self.device_models:
            return 0
        return 1 if model in self.host_models else 2


@dataclass(frozen=True, slots=True)
class Refused:
    instance_id: str
    reason: str  # which resource would be overcommitted


@dataclass(frozen=True, slots=True)
class Placement:
    device_id: str
    device: Device  # the device with the instance added
    tier: int  # Device.tier of the model before the instance came


def memory_used(demands: Iterable[Demand], shares_weights: bool) -> int:
    """Bytes `demands` hold on one device: their sum, less, where weights are
    shared, every copy of a model's weights but the largest."""
    demands = list(demands)
    total = sum(d.memory for d in demands)
    if not shares_weights:
        return total
    weights: dict[str, list[int]] = {}
    for d in demands:
        if d.weights:
            weights.setdefault(d.model, []).append(min(d.weights, d.memory))
    return total - sum(sum(w) - max(w) for w in weights.values())


def memory_needed(device: Device, demand: Demand) -> int:
    """What placing `demand` on `device` adds to its memory used."""
    with_it = [*(s.demand for s in device.slots), demand]
    return memory_used(with_it, device.shares_weights) - device.memory_used


def _free_rects(placed: Iterable[Rect]) -> tuple[Rect, ...]:
    """Maximal free rectangles of the unit square around `placed` (MaxRects)."""
    free = [Rect(0, 0, UNITS, UNITS)]
    for r in placed:
        split: list[Rect] = []
        for f in free:
            if not f.overlaps(r):
                split.append(f)
                continue
            # What is left of f beside r on each of its four sides (maximal, overlapping).
            if r.x > f.x:
                split.append(Rect(f.x, f.y, r.x - f.x, f.h))
            if r.x + r.w < f.x + f.w:
                split.append(Rect(r.x + r.w, f.y, f.x + f.w - r.x - r.w, f.h))
            if r.y > f.y:
                split.append(Rect(f.x, f.y, f.w, r.y - f.y))
            if r.y + r.h < f.y + f.h:
                split.append(Rect(f.x, r.y + r.h, f.w, f.y + f.h - r.y - r.h))
        free = [
            a
            for i, a in enumerate(split)
            if not any(b.contains(a) and (a != b or j < i) for j, b in enumerate(split) if j != i)
        ]
    return tuple(free)


def _best_rect(device: Device, w: int, h: int) -> Rect | None:
    """Best short-side fit among the free rectangles, at their lower-left corner."""
    best: tuple[tuple[int, int, int, int], Rect] | None = None
    for f in device.free:
        if f.w >= w and f.h >= h:
            key = (min(f.w - w, f.h - h), max(f.w - w, f.h - h), f.y, f.x)
            if best is None or key < best[0]:
                best = (key, Rect(f.x, f.y, w, h))
    return None if best is None else best[1]


def why_not(device: Device, demand: Demand) -> str | None:
    """None when `demand` fits on `device`; else the resource it would overcommit."""
    w, h = units(demand.config.sm_share), units(demand.config.time_quota)
    needs = memory_needed(device, demand)
    if needs > device.memory_free:
        return f"memory: needs {needs} B, {device.memory_free} B free"
    if _best_rect(device, w, h) is not None:
        return None
    if not any(f.w >= w for f in device.free):
        widest = max((f.w for f in device.free), default=0)
        return f"sm_share: needs {w}% of the SMs, at most {widest}% free together"
    if not any(f.h >= h for f in device.free):
        longest = max((f.h for f in device.free), default=0)
        return f"time_quota: needs {h}% of the window, at most {longest}% free together"
    return f"fragmented: no free {w}% SMs x {h}% window rectangle"


def add(device: Device, demand: Demand) -> Device | Refused:
    """`device` with `demand` placed on it, or why it would overcommit."""
    reason = why_not(device, demand)
    if reason is not None:
        return Refused(demand.instance_id, f"{device.device_id}: {reason}")
    rect = _best_rect(device, units(demand.config.sm_share), units(demand.config.time_quota))
    assert rect is not None  # why_not said it fits
    return Device(
        device.device_id,
        device.memory_total,
        device.node,
        (*device.slots, Slot(demand, rect)),
        device.device_models | {demand.model},
        device.host_models,
        device.shares_weights,
    )


def remove(device: Device, instance_id: str) -> Device:
    """`device` without the instance. Its model leaves the device tier with its last
    instance there: the weights were the instance's memory."""
    gone = next((s for s in device.slots if s.demand.instance_id == instance_id), None)
    if gone is None:
        raise ValueError(f"{instance_id!r} is not on {device.device_id}")
    slots = tuple(s for s in device.slots if s is not gone)
    models = device.device_models
    if all(s.demand.model != gone.demand.model for s in slots):
        models = models - {gone.demand.model}
    return Device(
        device.device_id,
        device.memory_total,
        device.node,
        slots,
        models,
        device.host_models,
        device.shares_weights,
    )


def place(
    devices: Sequence[Device], demand: Demand, refusing: Mapping[str, str] | None = None
) -> Placement | Refused:
    """The device to start `demand` on: residency first, then best fit. `refusing`:
    devices whose agent refused such a start lately, and what it said: passed over
    (its agent's books differ from these), and named in the reason when none is left."""
    w, h = units(demand.config.sm_share), units(demand.config.time_quota)
    best: tuple[tuple[int, int, int, str], Device] | None = None
    reasons: dict[str, int] = {}
    refusals: list[str] = []
    for d in devices:
        if refusing and d.device_id in refusing:
            refusals.append(f"{d.device_id} refused the start: {refusing[d.device_id]}")
            continue
        reason = why_not(d, demand)
        if reason is not None:
            kind = reason.split(":", 1)[0]
            reasons[kind] = reasons.get(kind, 0) + 1
            continue
        key = (
            d.tier(demand.model),
            d.free_area - w * h,
            d.memory_free - memory_needed(d, demand),
            d.device_id,
        )
        if best is None or key < best[0]:
            best = (key, d)
    if best is None:
        summary = "; ".join(
            [", ".join(f"{n} short of {kind}" for kind, n in sorted(reasons.items())), *refusals]
            if reasons
            else refusals
        )
        return Refused(
            demand.instance_id,
            f"no device fits {w}% SMs x {h}% window and {demand.memory} B"
            + (f" ({summary})" if summary else " (no devices)"),
        )
    placed = add(best[1], demand)
    assert isinstance(placed, Device)
    return Placement(best[1].device_id, placed, best[0][0])


@dataclass(frozen=True, slots=True)
class PackPlan:
    devices: tuple[Device, ...]
    placed: tuple[tuple[str, str], ...]  # (instance id, device id)
    refused: tuple[Refused, ...]


def place_all(devices: Sequence[Device], demands: Sequence[Demand]) -> PackPlan:
    """Place several instances, largest first (the usual order for rectangle packing)."""
    current = list(devices)
    index = {d.device_id: i for i, d in enumerate(current)}
    placed: list[tuple[str, str]] = []
    refused: list[Refused] = []
    order = sorted(demands, key=lambda d: (-d.config.share, -d.memory, d.instance_id))
    for demand in order:
        result = place(current, demand)
        if isinstance(result, Refused):
            refused.append(result)
            continue
        current[index[result.device_id]] = result.device
        placed.append((demand.instance_id, result.device_id))
    return PackPlan(tuple(current), tuple(placed), tuple(refused))


def scale_in_order(devices: Sequence[Device], instance_ids: Iterable[str]) -> tuple[str, ...]:
    """`instance_ids` ranked for removal: from the emptiest device first (it drains
    towards free), then the largest share (frees the most), then the id."""
    ids = list(instance_ids)
    where: dict[str, tuple[float, int]] = {}
    for d in devices:
        used = d.share_used
        for s in d.slots:
            where[s.demand.instance_id] = (used, -s.rect.area)
    known = [i for i in ids if i in where]
    unknown = [i for i in ids if i not in where]
    # Instances no device holds (being started elsewhere, or lost) go last, as given.
    return (*sorted(known, key=lambda i: (*where[i], i)), *unknown)

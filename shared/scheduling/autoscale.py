"""SLO-aware autoscaling of function instances that hold a share of a GPU.

An instance runs with a spatial share (`sm_share`: the fraction of the SMs, MPS's
active thread percentage) and a temporal quota (`time_quota`: the fraction of each
token window it may hold the GPU), as in FaST-GShare. Its device share is the
product: what it takes of one GPU. A profile measures, per configuration, the p99
latency of one request alone and the throughput of one instance, both at batch 1.

Capacity. An instance admits requests up to the rate at which its p99 latency
stays within the SLO: the profiled p99 (service) plus the p99 of the wait in its
queue. The wait's tail is Kingman's heavy-traffic approximation,
    P(wait > t) ~= rho * exp(-2 (1 - rho) t / (rho * service * burstiness)),
with burstiness = ca^2 + cs^2 (1 for Poisson arrivals and fixed service times; the
default 2 leaves room for bursts). It is pessimistic at low load, which is the
safe side, and it needs nothing the profile does not give.

Bursts. Requests of one function come in clusters (a client's fan-out, a retry
storm), and the instances must serve a cluster that finds them idle: the burst
floor. Either a fixed `burst` of simultaneous requests that all finish within the
SLO, or a model of the clusters (`burst_mean`: mean requests per cluster,
geometric; `burst_gap_ms`: mean gap between them, exponential): the fewest
instances that leave at most `burst_budget` of the requests late (`burst_late`).

Choice. For a demand (req/s) every configuration needs ceil(demand / capacity)
instances, and at least the burst floor; the one with the least total cost wins
(then fewer instances, then the lower p99). An instance costs its device share, or
the share of device memory it holds where that is larger (its dominant share),
plus `instance_cost`: what an instance costs whatever its size (a process, a
context, a start). Device share per request served is the same for every share
below the model's saturation point, so the choice mostly trades granularity (a
small demand takes a small quota) against latency (a small share or quota
stretches service and leaves less of the SLO for queueing); `instance_cost` tips
it towards fewer, larger instances where the extra device share is small.

Scaling. The plan is the choice for the whole observed rate. Existing instances
keep serving: a shortfall of capacity is covered by new instances in the plan's
configuration, and an instance goes only once it has been idle long enough and
the others still cover the rate (those off the plan first; to zero when the rate
is zero, down to `min_instances`), so the set converges on the plan without
stopping busy instances. Long enough: `surplus_idle_s` for an instance beyond the
burst floor (capacity a burst of the rate left behind), `idle_s` for the last
ones (the function's keep-alive). Pure: the caller passes the observed rate, its
instances and the time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

_EPS = 1e-9


@dataclass(frozen=True, slots=True, order=True)
class Config:
    """How much of a GPU one instance gets, in space and in time."""

    sm_share: float  # (0, 1]: fraction of the SMs
    time_quota: float  # (0, 1]: fraction of each token window

    def __post_init__(self) -> None:
        for name, value in (("sm_share", self.sm_share), ("time_quota", self.time_quota)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")

    @property
    def share(self) -> float:
        """What the instance takes of one device (the area of its 2-D slot)."""
        return self.sm_share * self.time_quota


@dataclass(frozen=True, slots=True)
class ProfilePoint:
    """One measured configuration: one request alone, batch 1."""

    config: Config
    p99_ms: float
    throughput: float  # req/s one instance serves back to back


@dataclass(frozen=True, slots=True)
class Instance:
    instance_id: str
    config: Config
    # When it last finished a request (or will finish its queued ones: a time in
    # the future means busy); a new instance passes the time it became ready.
    last_used: float


@dataclass(frozen=True, slots=True, kw_only=True)
class FunctionLoad:
    """What the autoscaler is told about one function."""

    function: str
    rate: float  # observed req/s
    profile: tuple[ProfilePoint, ...]
    slo_ms: float
    min_instances: int = 0
    max_instances: int = 100
    idle_s: float = 60.0
    # Given shares: the function always runs with these (no choice is made).
    fixed: Config | None = None
    # In the caller's order of preference for removal (see packing.scale_in_order).
    instances: tuple[Instance, ...] = ()
    # The fraction of a device's memory one instance holds (weights, context): see
    # `choose`; 0 ranks configurations by device share alone.
    memory_share: float = 0.0
    # Requests waiting with no instance to go to: start one now (scale from zero).
    waiting: int = 0
    # Configurations the packer just refused (no device has room for them): the
    # shortfall is covered with the next best one instead.
    avoid: frozenset[Config] = frozenset()
    # Idle seconds after which an instance beyond the burst floor goes while the
    # function still has a rate (None: `idle_s`, as the last ones).
    surplus_idle_s: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AutoscaleSettings:
    tail: float = 0.01  # the SLO is a p99
    burstiness: float = 2.0  # ca^2 + cs^2 in Kingman's approximation
    # Requests of one function that may arrive together (a client's fan-out, a
    # retry storm): there are always enough instances for all of them to finish
    # within the SLO, each instance serving its part back to back (`burst_floor`).
    burst: int = 1
    # Or a model of the clusters (used when burst_mean > 1): sizes geometric with
    # this mean, gaps between a cluster's requests exponential with this mean; the
    # floor leaves at most `burst_budget` of the requests late (`burst_late`).
    burst_mean: float = 0.0
    burst_gap_ms: float = 0.0
    burst_budget: float = 0.0025
    max_utilisation: float = 0.9  # never plan an instance busier than this
    # Device share an instance costs whatever its size (a process, a context, a
    # start), added to its dominant share when configurations are ranked.
    instance_cost: float = 0.0


DEFAULT_SETTINGS = AutoscaleSettings()


@dataclass(frozen=True, slots=True)
class Choice:
    config: Config
    count: int
    capacity: float  # req/s the `count` instances admit within the SLO
    share: float  # their device share, count * config.share
    meets_slo: bool  # False: no configuration meets the SLO; this is best effort


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    function: str
    plan: Choice  # the least-share configuration and count for the whole rate
    add: tuple[Config, ...]  # instances to start
    remove: tuple[str, ...]  # instance ids to stop (each idle for idle_s)
    instances: int  # how many there will be
    capacity: float  # req/s they admit within the SLO
    share: float  # their device share
    # No configuration meets the SLO even alone: the caller rejects
    # (an `slo_unmeetable` error) or serves best effort with what was added.
    slo_unmeetable: bool
    saturated: bool  # max_instances stops short of the rate


def admissible_rate(
    point: ProfilePoint, slo_ms: float, settings: AutoscaleSettings = DEFAULT_SETTINGS
) -> float:
    """Req/s one instance in `point.config` serves with its p99 within `slo_ms` (0: never)."""
    return _admissible(
        point.p99_ms,
        point.throughput,
        slo_ms,
        settings.tail,
        settings.burstiness,
        settings.max_utilisation,
    )


# Cached: the autoscaler asks this for every profile row of every function on every
# tick, and the answer depends only on these numbers.
@lru_cache(maxsize=65536)
def _admissible(
    p99_ms: float, throughput: float, slo_ms: float, tail: float, burstiness: float, cap: float
) -> float:
    if throughput <= 0.0 or p99_ms > slo_ms:
        return 0.0
    service_s = 1.0 / throughput
    slack_s = (slo_ms - p99_ms) / 1000.0

    def late(rho: float) -> float:  # P(wait > slack) at utilisation rho; grows with rho
        return rho * math.exp(-2.0 * (1.0 - rho) * slack_s / (rho * service_s * burstiness))

    if late(cap) <= tail:
        return cap * throughput
    lo, hi = 0.0, cap
    for _ in range(40):
        mid = (lo + hi) / 2.0
        if late(mid) <= tail:
            lo = mid
        else:
            hi = mid
    return lo * throughput


def burst_floor(
    point: ProfilePoint, slo_ms: float, settings: AutoscaleSettings = DEFAULT_SETTINGS
) -> int:
    """Instances in `point.config` that serve a burst within the SLO. With the fixed
    `settings.burst`: that many simultaneous requests, each instance serving its
    share back to back. With the cluster model (`burst_mean` > 1): the fewest that
    leave at most `burst_budget` of the requests late (`burst_late`)."""
    if settings.burst_mean > 1.0:
        return _model_floor(
            point.p99_ms,
            slo_ms,
            settings.burst_mean,
            settings.burst_gap_ms,
            settings.burst_budget,
        )
    per_instance = max(int(slo_ms // max(point.p99_ms, _EPS)), 1)
    return max(math.ceil(max(settings.burst, 1) / per_instance), 1)


_MAX_FLOOR = 256


@lru_cache(maxsize=65536)
def _model_floor(p99_ms: float, slo_ms: float, mean: float, gap_ms: float, budget: float) -> int:
    for n in range(1, _MAX_FLOOR):
        if burst_late(n, p99_ms, slo_ms, mean, gap_ms) <= budget:
            return n
    return _MAX_FLOOR


def burst_late(n: int, service_ms: float, slo_ms: float, mean: float, gap_ms: float) -> float:
    """The fraction of a function's requests that finish later than `slo_ms` when
    its clusters find `n` idle instances, each serving in `service_ms` (its p99),
    first come first served. Cluster sizes are geometric with mean `mean`, the gaps
    between a cluster's requests exponential with mean `gap_ms`. An upper bound.

    The j-th request of a cluster waits for the (j - n)-th, which waits for the
    (j - 2n)-th, ...: it is late when for some k >= 1 the k*n gaps before it sum to
    less than (k + 1) * service - slo. A fraction p (1 - p)^(j - 1) of the requests
    are j-th in their cluster (p = 1 / mean); the union bound over k."""
    if service_ms > slo_ms:
        return 1.0
    p = 1.0 / max(mean, 1.0)
    late = 0.0
    j = 1
    weight = p  # of the requests, the j-th of their cluster
    # The requests from the j-th on are (1 - p)^(j - 1) of all: stop once negligible.
    while (1.0 - p) ** (j - 1) > 1e-7 and j < 10_000:
        miss = 0.0
        k = 1
        while k * n <= j - 1 and miss < 1.0:
            short = (k + 1) * service_ms - slo_ms
            if short > 0.0:
                miss += _gamma_cdf(k * n, short / gap_ms) if gap_ms > 0.0 else 1.0
            k += 1
        late += weight * min(miss, 1.0)
        j += 1
        weight *= 1.0 - p
    return late


def _gamma_cdf(shape: int, x: float) -> float:
    """P(the sum of `shape` unit exponentials < x) (Erlang)."""
    if x <= 0.0:
        return 0.0
    term = math.exp(-x)
    below = term
    for i in range(1, shape):
        term *= x / i
        below += term
    return min(max(1.0 - below, 0.0), 1.0)


def choose(
    profile: Sequence[ProfilePoint],
    demand: float,
    slo_ms: float,
    *,
    fixed: Config | None = None,
    memory_share: float = 0.0,
    settings: AutoscaleSettings = DEFAULT_SETTINGS,
) -> Choice:
    """The configuration and count that serve `demand` req/s within the SLO with the
    least device share. With `fixed`, that configuration only. When none meets the
    SLO, the one with the lowest p99 (best effort, `meets_slo` False).

    `memory_share`: the fraction of a device's memory one instance holds. An
    instance costs the larger of its device share and that (its dominant share):
    eight slivers of SMs hold eight copies of the weights and contexts."""
    rows = _rows(profile, fixed)
    best: tuple[tuple[float, int, float], Choice] | None = None
    for point in rows:
        rate = admissible_rate(point, slo_ms, settings)
        if rate <= 0.0:
            continue
        count = _count(demand, rate)
        if count:
            count = max(count, burst_floor(point, slo_ms, settings))
        # With no demand, rank by one instance: what min_instances would start.
        cost = max(point.config.share, memory_share) + settings.instance_cost
        key = (max(count, 1) * cost, count, point.p99_ms)
        if best is None or key < best[0]:
            share = count * point.config.share
            best = (key, Choice(point.config, count, count * rate, share, True))
    if best is not None:
        return best[1]
    effort = min(rows, key=lambda p: (p.p99_ms, -p.throughput, p.config.share))
    rate = effort.throughput * settings.max_utilisation
    count = _count(demand, rate)
    return Choice(effort.config, count, count * rate, count * effort.config.share, False)


def _count(demand: float, rate: float) -> int:
    return max(math.ceil(demand / rate - _EPS), 1) if demand > 0.0 else 0


def _rows(profile: Sequence[ProfilePoint], fixed: Config | None) -> Sequence[ProfilePoint]:
    # A row that measured nothing (no or infinite throughput, a NaN p99) says nothing
    # to plan with: planned on, it divided by zero (best effort plans on throughput)
    # or took int(NaN) (the burst floor), and a NaN p99 made the best-effort pick
    # depend on the rows' order. An infinite p99 is a measurement: it meets no SLO.
    usable = [p for p in profile if _usable(p)]
    rows = usable if fixed is None else [p for p in usable if p.config == fixed]
    if not rows:
        what = "the fixed configuration" if fixed is not None else "any configuration"
        raise ValueError(f"the profile has no usable row for {what}")
    return rows


def _usable(point: ProfilePoint) -> bool:
    return 0.0 < point.throughput < math.inf and not math.isnan(point.p99_ms)


def scale(
    load: FunctionLoad, now: float, settings: AutoscaleSettings = DEFAULT_SETTINGS
) -> ScaleDecision:
    """Instances to add and remove for `load.function` at `now`."""
    rows = _rows(load.profile, load.fixed)
    unmeetable = not any(admissible_rate(p, load.slo_ms, settings) > 0.0 for p in rows)
    per = {p.config: _instance_rate(p, load.slo_ms, unmeetable, settings) for p in rows}
    # An instance in a configuration the profile (or the fixed shares) no longer
    # has admits nothing we can vouch for: it serves, but counts for no capacity.
    rates = [per.get(i.config, 0.0) for i in load.instances]
    capacity = sum(rates)
    demand = max(load.rate, 0.0)
    count = len(load.instances)
    room = max(load.max_instances - count, 0)
    # Feasible rows only (unless none is), and none the packer has no room for.
    placeable = [
        p for p in rows if p.config not in load.avoid and (unmeetable or per[p.config] > 0.0)
    ]
    plan = choose(
        placeable or rows,
        demand,
        load.slo_ms,
        memory_share=load.memory_share,
        settings=settings,
    )
    # A first request needs an instance before any rate has been observed (one:
    # the burst floor waits for a rate).
    floor = 1 if load.waiting > 0 else 0
    if demand > 0.0:
        point = next(p for p in rows if p.config == plan.config)
        floor = max(floor, burst_floor(point, load.slo_ms, settings))
    add: list[Config] = []
    saturated = False
    short = capacity < demand - _EPS or count < floor
    if short and placeable:
        # New instances take the plan's configuration, so the set converges on the
        # plan as the instances from other rates fall idle and go.
        want = floor - count
        if capacity < demand - _EPS:
            want = max(want, math.ceil((demand - capacity) / per[plan.config] - _EPS))
        n = min(want, room)
        saturated = n < want
        add = [plan.config] * n
        capacity += n * per[plan.config]
    elif short:
        saturated = True
    if count + len(add) < load.min_instances and placeable:
        extra = min(load.min_instances - count - len(add), room - len(add))
        add += [plan.config] * extra
        capacity += extra * per[plan.config]
    remove: list[str] = []
    # While there is a rate, whatever may go is beyond the burst floor: a burst's
    # surplus. With none, the last ones go after the function's keep-alive.
    keep_alive = load.idle_s
    if demand > 0.0 and load.surplus_idle_s is not None:
        keep_alive = load.surplus_idle_s
    if not add:
        # Off the plan first, then in the caller's order (stable).
        order = sorted(
            zip(load.instances, rates, strict=True), key=lambda ir: ir[0].config == plan.config
        )
        for inst, rate in order:
            if (
                now - inst.last_used >= keep_alive
                and count - 1 >= max(load.min_instances, floor)
                and capacity - rate >= demand - _EPS
            ):
                remove.append(inst.instance_id)
                capacity -= rate
                count -= 1
    gone = set(remove)
    kept = [i.config.share for i in load.instances if i.instance_id not in gone]
    return ScaleDecision(
        function=load.function,
        plan=plan,
        add=tuple(add),
        remove=tuple(remove),
        instances=count + len(add),
        capacity=capacity,
        share=sum(kept) + sum(c.share for c in add),
        slo_unmeetable=unmeetable,
        saturated=saturated,
    )


def _instance_rate(
    point: ProfilePoint, slo_ms: float, unmeetable: bool, settings: AutoscaleSettings
) -> float:
    if unmeetable:  # best effort: plan on throughput alone
        return point.throughput * settings.max_utilisation
    return admissible_rate(point, slo_ms, settings)

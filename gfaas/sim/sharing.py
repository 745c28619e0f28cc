"""A simulator of function instances that share GPUs by space and time (issue 8).

Model. Each function runs as instances, each holding a configuration (SM share x
time quota) on one GPU, placed by `shared.scheduling.packing` and sized by
`shared.scheduling.autoscale`, the code the live scheduler runs. An instance
serves one request at a time, first come first served, for the time
`sharemodel.ShareModel.service_s` gives (fixed when the request starts, with the
interference of the co-located instances busy at that moment). A request goes to
the first of its function's instances (largest first) that would answer it within
`fill` of its SLO, else to the one that answers soonest: load concentrates on few
instances, so the surplus ones fall idle and the autoscaler can let them go.

Every `tick_s` the autoscaler sees each function's rate (the larger of the rates
over the last `rate_window_s` and `burst_window_s`); a request for a function with
no instance starts one at once (scale from zero), and one that would answer late
asks the autoscaler at once too. Placements go through `packing.place`; a
configuration it refuses is avoided and the autoscaler asked again. A new instance
serves after `StartCost.seconds`, which depends on where its model already is
(this GPU, the node's host tier, nowhere), and not before the weights are there: an
instance started while another one's fetch or copy is still under way waits for it.
A request that would answer later than `react_at` of its SLO asks the autoscaler at
once (1: only a late one).

The burst model the autoscaler plans with is each function's clusters as measured
from its arrivals so far (`shared.scheduling.clusters`, as the live scheduler
measures them), or, with `measure_clusters` off, `settings`' as given (a trace's
known shape, for comparison).

Since an instance's queue is FIFO and everything assigned to it has arrived, a
request's finish time is known when it arrives; the simulator walks the arrivals
and the ticks in time order and needs no completion events. Deterministic.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from gfaas.sim.sharemodel import DEFAULT_MODEL, SharedFunction, ShareModel, whole_device
from gfaas.sim.workload import Arrival
from shared.scheduling import packing
from shared.scheduling.autoscale import (
    DEFAULT_SETTINGS,
    AutoscaleSettings,
    Config,
    FunctionLoad,
    Instance,
    ProfilePoint,
    scale,
)
from shared.scheduling.base import DEFAULT_PROFILE, DeviceProfile
from shared.scheduling.clusters import ClusterEstimator, ClusterShape, shaped


@dataclass(frozen=True, slots=True, kw_only=True)
class SharingCluster:
    nodes: int = 25
    gpus_per_node: int = 4
    memory_bytes: int = 32_000_000_000  # per GPU, for instances (V100 32 GB)

    @property
    def n_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True, slots=True, kw_only=True)
class StartCost:
    """Seconds from deciding to start an instance until it serves."""

    process_s: float = 0.2  # a pre-started process creates its CUDA (MPS client) context
    fetch_s: float = 1.0  # weights from the object store when the node has no copy
    link: DeviceProfile = DEFAULT_PROFILE  # host -> device copies

    def seconds(self, tier: int, model_bytes: int) -> float:
        """`tier` as `packing.Device.tier`: 0 this GPU, 1 the node's host memory, 2 none."""
        if tier == 0:
            return self.process_s  # the weights are shared with the instance already there
        copy = self.link.swap_s(model_bytes)
        return self.process_s + copy + (self.fetch_s if tier == 2 else 0.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class SharingOptions:
    whole_device: bool = False  # the baseline: SM share 100% only, time sharing
    autoscale: bool = True  # False: only the prewarmed instances, forever
    prewarm: Mapping[str, float] = field(default_factory=dict, hash=False)  # req/s at t=0
    tick_s: float = 0.5
    # The rate the autoscaler sees: the larger of the rates over these two windows
    # (a short one reacts to a burst, the long one smooths between ticks).
    rate_window_s: float = 5.0
    burst_window_s: float = 1.0
    # A request that would answer later than its SLO asks the autoscaler at once,
    # not at the next tick (at most every `react_s` per function; 0: never).
    react_s: float = 0.1
    # ... later than this part of its SLO (1: late; less: as the queues build up).
    react_at: float = 1.0
    idle_s: float = 30.0
    # Idle seconds after which an instance beyond the burst floor goes while the
    # function has a rate (None: idle_s): see `FunctionLoad.surplus_idle_s`.
    surplus_idle_s: float | None = None
    min_instances: int = 0
    max_instances: int = 1000
    # Routing: an instance takes requests while it would answer within this part of
    # the SLO; beyond it they spill over to the next instance.
    fill: float = 0.5
    reject_unmeetable: bool = False  # False: serve an unmeetable SLO best effort
    start: StartCost = StartCost()
    model: ShareModel = DEFAULT_MODEL
    settings: AutoscaleSettings = DEFAULT_SETTINGS
    # Each function's burst model from its measured clusters (`clusters.shaped`);
    # False: `settings`' burst model for all.
    measure_clusters: bool = True
    horizon_s: float = 0.0  # for instance-seconds; 0: the last arrival


@dataclass(frozen=True, slots=True)
class SharingResult:
    requests: int
    completed: int
    rejected: int  # no instance could be placed, or the SLO is unmeetable
    slo_attainment: float  # met / requests
    mean_s: float
    p50_s: float
    p99_s: float
    throughput: float  # completions per second of the horizon
    instance_s: float  # instance-seconds held
    share_s: float  # device-share-seconds held (GPU-seconds' worth)
    mean_share: float  # GPUs' worth held on average
    peak_instances: int
    starts: int  # instances the autoscaler started (each a cold start; prewarm excluded)
    starts_by_tier: tuple[int, int, int]  # on a GPU holding the model / host tier / neither
    from_zero_s: tuple[float, ...]  # latency of each request that found no instance
    refused: int  # placements packing refused
    unmeetable: tuple[str, ...]
    missed: Mapping[str, tuple[int, int]] = field(hash=False)  # function -> (missed, requests)
    samples: tuple[tuple[float, int, float], ...]  # every tick: (time, instances, share held)
    # Each function's clusters as measured at the end (None: too few arrivals).
    shapes: Mapping[str, ClusterShape | None] = field(hash=False)


@dataclass(slots=True)
class _Inst:
    id: str
    fn: _Fn
    config: Config
    gpu: int
    placed_at: float
    ready_at: float
    free_at: float  # when its queue empties (first: when it is ready)
    alone_s: float  # service time alone, for routing


@dataclass(slots=True)
class _Fn:
    f: SharedFunction
    profile: tuple[ProfilePoint, ...]
    instances: list[_Inst] = field(default_factory=list)
    window: deque[float] = field(default_factory=deque)
    clusters: ClusterEstimator = field(default_factory=ClusterEstimator)
    unmeetable: bool = False
    reacted: float = float("-inf")
    requests: int = 0
    missed: int = 0  # served late or not served


class SharingSimulator:
    """One run; `run()` once."""

    def __init__(
        self,
        functions: Sequence[SharedFunction],
        arrivals: Sequence[Arrival],
        cluster: SharingCluster,
        options: SharingOptions,
    ) -> None:
        self.arrivals = arrivals
        self.cluster = cluster
        self.o = options
        self.fns = {
            f.name: _Fn(f, whole_device(f.profile) if options.whole_device else f.profile)
            for f in functions
        }
        self.devices = [
            packing.Device(
                f"gpu{i}", cluster.memory_bytes, node=f"node{i // cluster.gpus_per_node}"
            )
            for i in range(cluster.n_gpus)
        ]
        self.on_gpu: list[list[_Inst]] = [[] for _ in self.devices]
        self.host: dict[str, set[str]] = {}
        # (node, model) -> when a fetch under way puts the weights in its host memory.
        self.host_at: dict[tuple[str, str], float] = {}
        self.serial = 0
        self.live = self.peak = self.refused = self.starts = 0
        # (configuration, memory) refused since the last removal: adding instances never
        # makes room, and whatever is at least as large in every dimension is refused
        # too, so these need not be tried again (it saves most of the packing's time).
        self.no_room: dict[Config, int] = {}  # configuration -> least memory refused
        self.tiers = [0, 0, 0]
        self.instance_s = self.share_s = self.held = 0.0
        self.samples: list[tuple[float, int, float]] = []  # (time, instances, share held)
        self.unmeetable: set[str] = set()

    def run(self) -> SharingResult:
        o = self.o
        for name, rate in o.prewarm.items():
            self._scale(self.fns[name], 0.0, rate, waiting=0, prewarm=True)
        latencies: list[float] = []
        from_zero: list[float] = []
        met = rejected = 0
        next_tick = o.tick_s
        for a in self.arrivals:
            t = a.time_s
            while next_tick <= t:
                if o.autoscale:
                    self._tick(next_tick)
                self.samples.append((next_tick, self.live, self.held))
                next_tick += o.tick_s
            fn = self.fns[a.function]
            fn.window.append(t)
            fn.clusters.add(t)
            fn.requests += 1
            cold = not fn.instances
            if cold and o.autoscale and not fn.unmeetable:
                self._scale(fn, t, self._rate(fn, t), waiting=1)
            if not fn.instances or (fn.unmeetable and o.reject_unmeetable):
                rejected += 1
                fn.missed += 1
                continue
            inst = self._route(fn, t)
            late = max(t, inst.free_at) + inst.alone_s - t > o.react_at * fn.f.fn.slo_s
            if late and o.autoscale and o.react_s > 0.0 and t >= fn.reacted + o.react_s:
                fn.reacted = t
                self._scale(fn, t, self._rate(fn, t), waiting=0)
                inst = self._route(fn, t)
            start = max(t, inst.free_at)
            finish = start + self._service(inst, start)
            inst.free_at = finish
            latency = finish - t
            latencies.append(latency)
            ok = latency <= fn.f.fn.slo_s + 1e-9
            met += ok
            fn.missed += not ok
            if cold:
                from_zero.append(latency)
        horizon = o.horizon_s or (self.arrivals[-1].time_s if self.arrivals else 0.0)
        for fn in self.fns.values():
            for inst in fn.instances:
                self._account(inst, horizon)
        return self._result(latencies, from_zero, met, rejected, horizon)

    def _rate(self, fn: _Fn, now: float) -> float:
        o = self.o
        window = fn.window
        while window and window[0] <= now - o.rate_window_s:
            window.popleft()
        recent = 0
        if o.burst_window_s > 0.0:
            since = now - o.burst_window_s
            for t in reversed(window):
                if t <= since:
                    break
                recent += 1
        return max(len(window) / o.rate_window_s, recent / max(o.burst_window_s, 1e-9))

    def _route(self, fn: _Fn, t: float) -> _Inst:
        budget = self.o.fill * fn.f.fn.slo_s
        best, soonest = fn.instances[0], float("inf")
        for inst in fn.instances:
            answer = max(t, inst.free_at) - t + inst.alone_s
            if answer <= budget:
                return inst
            if answer < soonest:
                best, soonest = inst, answer
        return best

    def _service(self, inst: _Inst, start: float) -> float:
        f = inst.fn.f
        busy = 0.0
        if inst.config.sm_share < 1.0:
            for other in self.on_gpu[inst.gpu]:
                if other is not inst and other.ready_at <= start < other.free_at:
                    busy += other.config.sm_share
        return self.o.model.service_s(f.fn.exec_s, f.saturation, inst.config, busy)

    def _tick(self, now: float) -> None:
        for fn in self.fns.values():
            rate = self._rate(fn, now)
            if fn.instances or rate > 0.0:
                self._scale(fn, now, rate, waiting=0)

    def _scale(
        self, fn: _Fn, now: float, rate: float, *, waiting: int, prewarm: bool = False
    ) -> None:
        o = self.o
        memory = fn.f.memory
        avoid = frozenset(
            p.config
            for p in fn.profile
            if any(
                p.config.sm_share >= c.sm_share
                and p.config.time_quota >= c.time_quota
                and memory >= m
                for c, m in self.no_room.items()
            )
        )
        settings = o.settings
        if o.measure_clusters:
            settings = shaped(settings, fn.clusters.held())
        # A configuration the packer refuses is avoided and the autoscaler asked again,
        # at most once per configuration.
        for _ in range(len(fn.profile) + 1):
            decision = scale(self._load(fn, rate, waiting, avoid), now, settings)
            if decision.slo_unmeetable:
                self.unmeetable.add(fn.f.name)
                fn.unmeetable = o.reject_unmeetable
                if fn.unmeetable:
                    return
            for instance_id in decision.remove:
                inst = next(i for i in fn.instances if i.id == instance_id)
                self.devices[inst.gpu] = packing.remove(self.devices[inst.gpu], instance_id)
                self.on_gpu[inst.gpu].remove(inst)
                fn.instances.remove(inst)
                self._account(inst, now)
                self.no_room.clear()
            refused = next((c for c in decision.add if not self._start(fn, c, now, prewarm)), None)
            if refused is None:
                return
            avoid |= {refused}
            self.no_room[refused] = min(memory, self.no_room.get(refused, memory))

    def _load(self, fn: _Fn, rate: float, waiting: int, avoid: frozenset[Config]) -> FunctionLoad:
        o = self.o
        by_id = {i.id: i for i in fn.instances}
        held = sorted({i.gpu for i in fn.instances})
        order = packing.scale_in_order([self.devices[g] for g in held], by_id)
        return FunctionLoad(
            function=fn.f.name,
            rate=rate,
            profile=fn.profile,
            slo_ms=fn.f.fn.slo_s * 1000.0,
            min_instances=o.min_instances,
            max_instances=o.max_instances,
            idle_s=o.idle_s,
            surplus_idle_s=o.surplus_idle_s,
            instances=tuple(Instance(i, by_id[i].config, by_id[i].free_at) for i in order),
            memory_share=fn.f.memory / self.cluster.memory_bytes,
            waiting=waiting,
            avoid=avoid,
        )

    def _start(self, fn: _Fn, config: Config, now: float, prewarm: bool) -> bool:
        f = fn.f
        self.serial += 1
        demand = packing.Demand(f"i{self.serial}", f.name, f.fn.model, config, f.memory)
        placed = packing.place(self.devices, demand)
        if isinstance(placed, packing.Refused):
            self.refused += 1
            return False
        gpu = int(placed.device_id.removeprefix("gpu"))
        self.devices[gpu] = placed.device
        ready = now
        if not prewarm:
            ready = self._ready_at(fn, gpu, placed.tier, now)
            self.starts += 1
            self.tiers[placed.tier] += 1
        self._remember_on_node(gpu, f.fn.model)
        alone = self.o.model.service_s(f.fn.exec_s, f.saturation, config)
        inst = _Inst(demand.instance_id, fn, config, gpu, now, ready, ready, alone)
        fn.instances.append(inst)
        # Routing fills the largest first (stable sort: then the oldest), so the small
        # instances from a lower rate are the ones to fall idle and go.
        fn.instances.sort(key=lambda i: -i.config.share)
        self.on_gpu[gpu].append(inst)
        self.live += 1
        self.held += config.share
        self.peak = max(self.peak, self.live)
        return True

    def _ready_at(self, fn: _Fn, gpu: int, tier: int, now: float) -> float:
        """When an instance started now serves. The tier is where the weights are or
        are on their way to: one started while they still are waits for them."""
        cost, model, size = self.o.start, fn.f.fn.model, fn.f.fn.model_bytes
        node = self.devices[gpu].node
        if tier == 0:  # the weights come with the instance already on this GPU
            weights = min((i.ready_at for i in self.on_gpu[gpu] if i.fn is fn), default=now)
            return max(now + cost.seconds(0, size), weights)
        if tier == 1:  # from the node's host memory, once the fetch has put them there
            return max(now, self.host_at.get((node, model), now)) + cost.seconds(1, size)
        self.host_at[(node, model)] = now + cost.fetch_s
        return now + cost.seconds(2, size)

    def _remember_on_node(self, gpu: int, model: str) -> None:
        """The weights pass through the node's host memory and stay there (host tier)."""
        node = self.devices[gpu].node
        models = self.host.setdefault(node, set())
        if model in models:
            return
        models.add(model)
        for i, d in enumerate(self.devices):
            if d.node == node:
                self.devices[i] = dataclasses.replace(d, host_models=d.host_models | {model})

    def _account(self, inst: _Inst, until: float) -> None:
        held = max(until - inst.placed_at, 0.0)
        self.instance_s += held
        self.share_s += held * inst.config.share
        self.live -= 1
        self.held -= inst.config.share

    def _result(
        self,
        latencies: list[float],
        from_zero: list[float],
        met: int,
        rejected: int,
        horizon: float,
    ) -> SharingResult:
        n = len(self.arrivals)
        lat = np.array(latencies) if latencies else np.zeros(1)
        span = max(horizon, 1e-9)
        return SharingResult(
            requests=n,
            completed=len(latencies),
            rejected=rejected,
            slo_attainment=met / max(n, 1),
            mean_s=float(lat.mean()),
            p50_s=float(np.percentile(lat, 50)),
            p99_s=float(np.percentile(lat, 99)),
            throughput=len(latencies) / span,
            instance_s=self.instance_s,
            share_s=self.share_s,
            mean_share=self.share_s / span,
            peak_instances=self.peak,
            starts=self.starts,
            starts_by_tier=(self.tiers[0], self.tiers[1], self.tiers[2]),
            from_zero_s=tuple(from_zero),
            refused=self.refused,
            unmeetable=tuple(sorted(self.unmeetable)),
            missed={n: (f.missed, f.requests) for n, f in self.fns.items()},
            samples=tuple(self.samples),
            shapes={n: f.clusters.shape() for n, f in self.fns.items()},
        )


def simulate_sharing(
    functions: Sequence[SharedFunction],
    arrivals: Sequence[Arrival],
    cluster: SharingCluster,
    options: SharingOptions,
) -> SharingResult:
    """Run `arrivals` over instances of `functions` sharing `cluster`'s GPUs."""
    return SharingSimulator(functions, arrivals, cluster, options).run()

"""A discrete-event simulator of a GPU cluster running the live scheduling code.

Model. Each GPU has one worker with `concurrency` slots and a model cache
(`DeviceCache`, `capacity` = memory left for weights). A request the policy
sends to a GPU either finds its model ready (a hit), joins a swap-in already
under way, or starts one: victims chosen by `eviction.choose_victims` are
dropped and the copy queues FIFO on the GPU's host link (size / bandwidth +
overhead). Execution starts once the model is ready, taking the function's
profiled time times the interference slowdown for the requests already
running there (fixed at start). Requests wait centrally; after every event
the scheduler calls `dispatch.plan` with the very policy object the live
scheduler would use, over WorkerViews built from the simulated state.

Determinism: no randomness and no clocks here; the trace fixes everything.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from gfaas.sim.workload import FunctionProfile, Workload
from shared.scheduling.base import DEFAULT_PROFILE, DeviceProfile, Policy, RequestView, WorkerView
from shared.scheduling.cache import DeviceCache
from shared.scheduling.dispatch import plan
from shared.scheduling.eviction import CannotFit, choose_victims
from shared.scheduling.slo import SloTracker
from shared.schema import FunctionKind

_ARRIVE, _SWAP_DONE, _EXEC_DONE, _TICK = range(4)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSpec:
    nodes: int = 1
    gpus_per_node: int = 4
    cache_bytes: int = 16_000_000_000  # per GPU, for model weights
    concurrency: int = 4
    profile: DeviceProfile = DEFAULT_PROFILE

    @property
    def n_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True, slots=True)
class SimResult:
    policy: str
    requests: int
    completed: int
    rejected: int
    failed: int  # model bigger than a device
    mean_s: float
    p50_s: float
    p99_s: float
    hit_rate: float  # dispatched requests that found their model ready
    slo_attainment: float  # met deadlines / all requests (rejections are misses)
    throughput: float  # completions per simulated second
    plans: int  # dispatch.plan calls (each one scheduler decision round)


@dataclass(slots=True)
class _Req:
    view: RequestView
    fn: FunctionProfile
    gpu: int = -1


@dataclass(slots=True)
class _Gpu:
    worker_id: str
    device: str
    cache: DeviceCache
    outstanding: int = 0
    running: int = 0
    link_free_at: float = 0.0
    waiting: dict[str, list[_Req]] = field(default_factory=dict)
    blocked: list[_Req] = field(default_factory=list)


class Simulator:
    """One run; `run()` once. Mutable inside, deterministic outside."""

    def __init__(
        self,
        workload: Workload,
        cluster: ClusterSpec,
        policy: Policy,
        *,
        window: int = 256,
        tick_s: float = 0.005,
    ) -> None:
        self.workload = workload
        self.cluster = cluster
        self.policy = policy
        self.window = window
        self.tick_s = tick_s
        self.profile = cluster.profile
        self.gpus = [
            _Gpu(
                worker_id=f"node{i // cluster.gpus_per_node}-gpu{i % cluster.gpus_per_node}",
                device=f"cuda:{i % cluster.gpus_per_node}",
                cache=DeviceCache(capacity=cluster.cache_bytes),
            )
            for i in range(cluster.n_gpus)
        ]
        self.index = {g.worker_id: i for i, g in enumerate(self.gpus)}
        self.views = [self._view(i) for i in range(len(self.gpus))]
        self.dirty: set[int] = set()
        self.rooms = len(self.gpus) if cluster.concurrency > 0 else 0
        self.events: list[tuple[float, int, int, int, object]] = []
        self.seq = itertools.count()
        self.pending: dict[str, _Req] = {}
        self.tracker = SloTracker()
        self.tick_at = -1.0
        self.latencies: list[float] = []
        self.met = self.rejected = self.failed = self.hits = self.dispatched = self.plans = 0
        self.last_done = 0.0

    def _push(self, at: float, kind: int, gpu: int, payload: object) -> None:
        heapq.heappush(self.events, (at, next(self.seq), kind, gpu, payload))

    def _view(self, i: int) -> WorkerView:
        g = self.gpus[i]
        return WorkerView(
            worker_id=g.worker_id,
            device=g.device,
            capacity=self.cluster.concurrency,
            outstanding=g.outstanding,
            resident=frozenset(g.cache.entries),
            memory_free=g.cache.free,
            memory_total=g.cache.capacity,
            cache=g.cache,
            profile=self.profile,
            link_busy_until=g.link_free_at,
        )

    def run(self) -> SimResult:
        functions = self.workload.by_name()
        for n, a in enumerate(self.workload.arrivals):
            fn = functions[a.function]
            view = RequestView(
                invocation_id=f"r{n}",
                function=fn.name,
                kind=FunctionKind.GPU,
                model=fn.model,
                arrived_at=a.time_s,
                deadline=a.time_s + fn.slo_s,
                slo_ms=fn.slo_s * 1000.0,
                exec_s=fn.exec_s,
                model_bytes=fn.model_bytes,
            )
            self._push(a.time_s, _ARRIVE, -1, _Req(view, fn))
        while self.events:
            now, _, kind, gpu, payload = heapq.heappop(self.events)
            if kind == _ARRIVE:
                assert isinstance(payload, _Req)
                self.pending[payload.view.invocation_id] = payload
            elif kind == _SWAP_DONE:
                assert isinstance(payload, str)
                for req in self.gpus[gpu].waiting.pop(payload):
                    self._start(gpu, req, now)
            elif kind == _EXEC_DONE:
                assert isinstance(payload, _Req)
                self._finish(gpu, payload, now)
            if self.events and self.events[0][0] == now:
                continue  # decide once per instant, after all its events
            self._dispatch(now)
        return self._result()

    def _dispatch(self, now: float) -> None:
        if not self.pending or self.rooms <= 0:
            return
        for i in self.dirty:
            self.views[i] = self._view(i)
        self.dirty.clear()
        queue = [r.view for r in itertools.islice(self.pending.values(), self.window)]
        if hasattr(self.policy, "order"):
            rrcs = [self.tracker.rrc(r.function) for r in queue]
            queue = [
                r if r.rrc == x else replace(r, rrc=x) for r, x in zip(queue, rrcs, strict=True)
            ]
        self.plans += 1
        result = plan(self.policy, queue, self.views, now)
        for invocation_id, worker_id in result.assignments:
            self._assign(self.index[worker_id], self.pending.pop(invocation_id), now)
        for rejection in result.rejected:
            req = self.pending.pop(rejection.invocation_id)
            self.rejected += 1
            self.tracker = self.tracker.record(req.fn.name, met=False)
        if self.pending and self.rooms > 0 and self.tick_at <= now:
            # Some requests chose to wait (for a warm worker): look again soon.
            self.tick_at = now + self.tick_s
            self._push(self.tick_at, _TICK, -1, None)

    def _set_outstanding(self, i: int, delta: int) -> None:
        g = self.gpus[i]
        had_room = g.outstanding < self.cluster.concurrency
        g.outstanding += delta
        has_room = g.outstanding < self.cluster.concurrency
        self.rooms += int(has_room) - int(had_room)
        self.dirty.add(i)

    def _assign(self, i: int, req: _Req, now: float) -> None:
        req.gpu = i
        self._set_outstanding(i, +1)
        self.dispatched += 1
        self._place(i, req, now)

    def _place(self, i: int, req: _Req, now: float) -> bool:
        """Run, join a swap-in, or start one; False when memory is pinned."""
        g = self.gpus[i]
        key = req.fn.model
        if g.cache.ready(key, now):
            self.hits += 1
            g.cache = g.cache.use(key, now)
            self._start(i, req, now)
        elif key in g.cache.entries:
            g.cache = g.cache.use(key, now)
            g.waiting[key].append(req)
        else:
            return self._load(i, req, now)
        return True

    def _load(self, i: int, req: _Req, now: float) -> bool:
        """Start the swap-in for `req`; False when it must wait for memory."""
        g = self.gpus[i]
        key, size = req.fn.model, req.fn.model_bytes
        victims = choose_victims(g.cache, key, size, now)
        if isinstance(victims, CannotFit):
            if victims.permanent:
                self.failed += 1
                self.tracker = self.tracker.record(req.fn.name, met=False)
                self._set_outstanding(i, -1)
            else:
                g.blocked.append(req)
            return victims.permanent
        swap_s = self.profile.swap_s(size)
        ready = max(now, g.link_free_at) + swap_s
        g.link_free_at = ready
        g.cache = g.cache.evict(victims.keys).insert(key, size, swap_s, now, ready_at=ready)
        g.cache = g.cache.use(key, now)
        g.waiting[key] = [req]
        self._push(ready, _SWAP_DONE, i, key)
        self.dirty.add(i)
        return True

    def _start(self, i: int, req: _Req, now: float) -> None:
        g = self.gpus[i]
        duration = req.fn.exec_s * self.profile.slowdown(g.running)
        g.running += 1
        self._push(now + duration, _EXEC_DONE, i, req)

    def _finish(self, i: int, req: _Req, now: float) -> None:
        g = self.gpus[i]
        g.running -= 1
        g.cache = g.cache.release(req.fn.model)
        self._set_outstanding(i, -1)
        latency = now - req.view.arrived_at
        self.latencies.append(latency)
        met = latency <= req.fn.slo_s + 1e-9
        self.met += int(met)
        self.tracker = self.tracker.record(req.fn.name, met)
        self.last_done = now
        blocked, g.blocked = g.blocked, []
        for n, waiting in enumerate(blocked):
            if not self._place(i, waiting, now):
                g.blocked.extend(blocked[n + 1 :])
                break

    def _result(self) -> SimResult:
        n = len(self.workload.arrivals)
        lat = np.array(self.latencies) if self.latencies else np.zeros(1)
        start = self.workload.arrivals[0].time_s if self.workload.arrivals else 0.0
        span = max(self.last_done - start, 1e-9)
        return SimResult(
            policy=self.policy.name,
            requests=n,
            completed=len(self.latencies),
            rejected=self.rejected,
            failed=self.failed,
            mean_s=float(lat.mean()),
            p50_s=float(np.percentile(lat, 50)),
            p99_s=float(np.percentile(lat, 99)),
            hit_rate=self.hits / max(self.dispatched, 1),
            slo_attainment=self.met / max(n, 1),
            throughput=len(self.latencies) / span,
            plans=self.plans,
        )


def simulate(
    workload: Workload,
    cluster: ClusterSpec,
    policy: Policy,
    *,
    window: int = 256,
    tick_s: float = 0.005,
) -> SimResult:
    """Run `workload` on `cluster` under `policy` (from `make_policy`).

    `window`: queued requests shown to each `plan` call; `tick_s`: how soon to
    look again when requests chose to wait although some worker had room.
    """
    return Simulator(workload, cluster, policy, window=window, tick_s=tick_s).run()


def cache_for_ratio(functions: Sequence[FunctionProfile], n_gpus: int, ratio: float) -> int:
    """Per-GPU cache bytes such that all models total `ratio` times the cluster's cache."""
    return int(sum(f.model_bytes for f in functions) / (ratio * n_gpus))

"""SLO-aware placement with admission control and Torpor-style priorities.

Prediction. The latency of a request on worker w, from now, is
    warm:  wait for an ongoing swap of the model (if any) + exec
    cold:  w.swap_backlog_s(now) + profile.swap_s(model_bytes) + exec
with exec = request.exec_s * (1 + interference * w.outstanding) (see
DeviceProfile: each co-running request slows this one down linearly).

Placement. Workers whose prediction meets the deadline are feasible; among
them the locality policy picks (warm first, least eviction when cold), so SLO
awareness costs no cache hits. If no worker is feasible the request waits when
waiting can still work (a full worker holds its model warm and exec alone still
fits the deadline, or every worker is full and the best case still fits), and
is otherwise rejected: `decide` returns `Rejected(reason)`; `choose` (the plain
Policy method) says None instead, so callers that ignore admission still work.

Priority. Torpor's RRC = (p*n - m) / (1 - p) counts how many consecutive
deadline hits a function needs to get back to the target ratio p. `order`
puts functions with RRC above `priority_threshold` (a fixed threshold here;
Torpor adapts it every few seconds) in the high-priority queue; each queue is
earliest-deadline-first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from shared.scheduling.base import (
    Decision,
    Rejected,
    RequestView,
    WorkerView,
    eligible,
    same_kind,
)
from shared.scheduling.locality import Locality


def rrc(n: int, m: int, target: float) -> float:
    """Torpor's requests-to-recover: consecutive hits needed to reach `target`."""
    return (target * n - m) / (1.0 - target)


@dataclass(frozen=True, slots=True)
class SloTracker:
    """Per-function (requests, met deadlines) counts; pure transitions."""

    target: float = 0.98
    counts: Mapping[str, tuple[int, int]] = field(default_factory=dict, hash=False)

    def record(self, function: str, met: bool) -> SloTracker:
        n, m = self.counts.get(function, (0, 0))
        counts = dict(self.counts)
        counts[function] = (n + 1, m + int(met))
        return replace(self, counts=counts)

    def rrc(self, function: str) -> float:
        n, m = self.counts.get(function, (0, 0))
        return rrc(n, m, self.target)


def predict_latency(request: RequestView, worker: WorkerView, now: float) -> float:
    """Seconds from `now` until `request` would finish on `worker`."""
    key = request.cache_key
    run = request.exec_s * worker.profile.slowdown(worker.outstanding)
    if key in worker.resident:
        wait = worker.cache.wait_s(key, now) if worker.cache is not None else 0.0
        return wait + run
    return worker.swap_backlog_s(now) + worker.profile.swap_s(request.model_bytes) + run


def _feasible(
    request: RequestView, candidates: Sequence[WorkerView], now: float, budget: float
) -> list[WorkerView]:
    """The candidates where `predict_latency` fits the budget, computed inline:
    this loop runs over every worker for every decision."""
    key = request.cache_key
    exec_s = request.exec_s
    size = request.model_bytes
    out = []
    for w in candidates:
        p = w.profile
        run = exec_s * (1.0 + p.interference * w.outstanding)
        if key in w.resident:
            if run > budget:
                continue
            if w.cache is not None and run + w.cache.wait_s(key, now) > budget:
                continue
        elif (
            max(w.link_busy_until - now, 0.0) + p.swap_overhead_s + size / p.link_bandwidth + run
            > budget
        ):
            continue
        out.append(w)
    return out


@dataclass
class SloAware:
    name: str = "slo"
    priority_threshold: float = 0.0
    out_of_order: bool = True
    max_overtake_s: float = 0.25
    lookahead: int = 64
    placement: Locality = field(default_factory=lambda: Locality(name="slo/locality"))

    def choose(self, request: RequestView, workers: Sequence[WorkerView], now: float) -> str | None:
        decision = self.decide(request, workers, now)
        return decision if isinstance(decision, str) else None

    def decide(self, request: RequestView, workers: Sequence[WorkerView], now: float) -> Decision:
        budget = request.due - now
        if budget <= 0.0:
            return Rejected(request.invocation_id, "deadline passed while queued")
        if request.exec_s <= 0.0:
            # No profile: nothing to predict with; behave like locality.
            return self.placement.choose(request, workers, now)
        candidates = eligible(request, workers)
        feasible = _feasible(request, candidates, now, budget)
        if feasible:
            return self.placement.pick(request, feasible, workers, now)
        if self._may_fit_later(request, candidates, workers, budget):
            return None
        return Rejected(
            request.invocation_id,
            f"no worker can finish {request.function!r} within {budget * 1000:.1f} ms",
        )

    def _may_fit_later(
        self,
        request: RequestView,
        candidates: Sequence[WorkerView],
        workers: Sequence[WorkerView],
        budget: float,
    ) -> bool:
        """Whether some worker, once it drains, could still meet the deadline."""
        key = request.cache_key
        for w in same_kind(request, workers):
            best = request.exec_s
            if key not in w.resident:
                best += w.profile.swap_s(request.model_bytes)
            if best <= budget:
                return True
        return False

    def order(self, pending: Sequence[RequestView], now: float) -> list[RequestView]:
        """High-priority (behind their SLO) first; each queue earliest deadline first."""
        return sorted(
            pending, key=lambda r: (r.rrc <= self.priority_threshold, r.due, r.arrived_at)
        )

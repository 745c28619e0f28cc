"""Queue-level dispatch: assign many queued requests in one pure pass.

FIFO for policies without `out_of_order`. For those with it (locality, slo),
GPU-FaaS's out-of-order dispatch (O3) within the first `lookahead` queued
requests, in two passes:
  1. requests the policy places on a worker where their model is already
     resident go first (they overtake);
  2. the rest, in queue order, cold placements allowed.
Starvation bound: only requests that arrived less than `max_overtake_s` after
the oldest request in the window may overtake, so a request is overtaken by at
most the arrivals of `max_overtake_s` after it, whatever the load. (A bound on
absolute age would turn into FIFO exactly when overload makes locality matter.)
Each assignment updates a local copy of the chosen worker's view (load, cache,
swap backlog) so later decisions in the same pass see it. Policies may supply
`order(pending, now)` to reorder the queue first (slo: priority classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from shared.scheduling.base import Policy, Rejected, RequestView, WorkerView, decide
from shared.scheduling.eviction import Victims, choose_victims


@runtime_checkable
class OrderingPolicy(Protocol):
    def order(self, pending: Sequence[RequestView], now: float) -> list[RequestView]: ...


@dataclass(frozen=True, slots=True)
class DispatchPlan:
    assignments: list[tuple[str, str]]  # (invocation_id, worker_id), in decision order
    rejected: list[Rejected]
    workers: list[WorkerView]  # the views as the plan leaves them


def assume_assigned(worker: WorkerView, request: RequestView, now: float) -> WorkerView:
    """The worker's view after it accepts `request` (a pure prediction)."""
    key = request.cache_key
    cache = worker.cache
    if key in worker.resident:
        if cache is not None and key in cache.entries:
            cache = cache.use(key, now)
        return replace(worker, outstanding=worker.outstanding + 1, cache=cache)
    swap_s = worker.profile.swap_s(request.model_bytes)
    busy_until = max(worker.link_busy_until, now) + swap_s
    resident = worker.resident | {key}
    memory_free = max(worker.memory_free - request.model_bytes, 0)
    if cache is not None:
        victims = choose_victims(cache, key, request.model_bytes, now)
        if isinstance(victims, Victims):
            cache = cache.evict(victims.keys)
            cache = cache.insert(key, request.model_bytes, swap_s, now, ready_at=busy_until)
            cache = cache.use(key, now)
            resident = (worker.resident - set(victims.keys)) | {key}
            memory_free = cache.free
    return replace(
        worker,
        outstanding=worker.outstanding + 1,
        resident=resident,
        memory_free=memory_free,
        cache=cache,
        link_busy_until=busy_until,
    )


class _Planner:
    """The mutable scratch state of one `plan` call (never escapes it)."""

    def __init__(self, policy: Policy, workers: Sequence[WorkerView], now: float) -> None:
        self.policy = policy
        self.now = now
        self.local = list(workers)
        self.index = {w.worker_id: i for i, w in enumerate(self.local)}
        self.room = sum(1 for w in self.local if w.outstanding < w.capacity)
        self.assignments: list[tuple[str, str]] = []
        self.rejected: list[Rejected] = []
        # model -> how many workers with room hold it; built on first use.
        self.warm: dict[str, int] | None = None

    def attempt(self, request: RequestView, warm_only: bool) -> bool:
        """True when the request left the queue (assigned or rejected)."""
        decision = decide(self.policy, request, self.local, self.now)
        if decision is None:
            return False
        if isinstance(decision, Rejected):
            self.rejected.append(decision)
            return True
        i = self.index[decision]
        before = self.local[i]
        if warm_only and request.cache_key not in before.resident:
            return False
        after = assume_assigned(before, request, self.now)
        self.local[i] = after
        if after.outstanding >= after.capacity:
            self.room -= 1
        if self.warm is not None:
            self._count(before, -1)
            self._count(after, +1)
        self.assignments.append((request.invocation_id, decision))
        return True

    def warm_with_room(self, key: str) -> bool:
        """Whether any worker with room holds `key` (an index, kept up to date)."""
        if self.warm is None:
            self.warm = {}
            for w in self.local:
                self._count(w, +1)
        return self.warm.get(key, 0) > 0

    def _count(self, worker: WorkerView, sign: int) -> None:
        assert self.warm is not None
        if worker.outstanding < worker.capacity:
            for key in worker.resident:
                self.warm[key] = self.warm.get(key, 0) + sign

    def result(self) -> DispatchPlan:
        return DispatchPlan(self.assignments, self.rejected, self.local)


def plan(
    policy: Policy, pending: Sequence[RequestView], workers: Sequence[WorkerView], now: float
) -> DispatchPlan:
    """Assign as many of `pending` as the policy will, in one pass."""
    planner = _Planner(policy, workers, now)
    order = getattr(policy, "order", None)  # not isinstance: Protocol checks are slow
    queue: list[RequestView] = order(pending, now) if order is not None else list(pending)
    if not getattr(policy, "out_of_order", False):
        for request in queue:
            if planner.room <= 0:
                break
            planner.attempt(request, warm_only=False)
        return planner.result()

    max_overtake_s: float = getattr(policy, "max_overtake_s", 0.25)
    lookahead: int = getattr(policy, "lookahead", 64)
    window = queue[:lookahead]
    if not window:
        return planner.result()
    oldest = min(r.arrived_at for r in window)
    left: set[str] = set()
    for request in window:
        if planner.room <= 0:
            break
        if request.arrived_at - oldest >= max_overtake_s:
            continue  # too young to overtake the oldest waiting request
        if planner.warm_with_room(request.cache_key) and planner.attempt(request, warm_only=True):
            left.add(request.invocation_id)
    for request in window:
        if planner.room <= 0:
            break
        if request.invocation_id not in left:
            planner.attempt(request, warm_only=False)
    return planner.result()


def plan_dispatch(
    policy: Policy, pending: Sequence[RequestView], workers: Sequence[WorkerView], now: float
) -> list[tuple[str, str]]:
    """Just the (invocation_id, worker_id) assignments of `plan`.

    Rejections are dropped here (rejected requests stay queued and are refused
    again next time); a scheduler that answers rejections calls `plan`.
    """
    return plan(policy, pending, workers, now).assignments

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
    backlog = worker.swap_backlog_s + swap_s
    resident = worker.resident | {key}
    memory_free = max(worker.memory_free - request.model_bytes, 0)
    if cache is not None:
        victims = choose_victims(cache, key, request.model_bytes, now)
        if isinstance(victims, Victims):
            cache = cache.evict(victims.keys)
            cache = cache.insert(key, request.model_bytes, swap_s, now, ready_at=now + backlog)
            cache = cache.use(key, now)
            resident = (worker.resident - set(victims.keys)) | {key}
            memory_free = cache.free
    return replace(
        worker,
        outstanding=worker.outstanding + 1,
        resident=resident,
        memory_free=memory_free,
        cache=cache,
        swap_backlog_s=backlog,
    )


def plan(
    policy: Policy, pending: Sequence[RequestView], workers: Sequence[WorkerView], now: float
) -> DispatchPlan:
    """Assign as many of `pending` as the policy will, in one pass."""
    local = list(workers)
    index = {w.worker_id: i for i, w in enumerate(local)}
    room = sum(1 for w in local if w.outstanding < w.capacity)
    assignments: list[tuple[str, str]] = []
    rejected: list[Rejected] = []
    queue = policy.order(pending, now) if isinstance(policy, OrderingPolicy) else list(pending)

    def attempt(request: RequestView, warm_only: bool) -> bool:
        """True when the request left the queue (assigned or rejected)."""
        nonlocal room
        decision = decide(policy, request, local, now)
        if decision is None:
            return False
        if isinstance(decision, Rejected):
            rejected.append(decision)
            return True
        i = index[decision]
        worker = local[i]
        if warm_only and request.cache_key not in worker.resident:
            return False
        local[i] = assume_assigned(worker, request, now)
        if local[i].outstanding >= local[i].capacity:
            room -= 1
        assignments.append((request.invocation_id, decision))
        return True

    if not getattr(policy, "out_of_order", False):
        for request in queue:
            if room <= 0:
                break
            attempt(request, warm_only=False)
        return DispatchPlan(assignments, rejected, local)

    max_overtake_s: float = getattr(policy, "max_overtake_s", 0.25)
    lookahead: int = getattr(policy, "lookahead", 64)
    window = queue[:lookahead]
    if not window:
        return DispatchPlan(assignments, rejected, local)
    oldest = min(r.arrived_at for r in window)
    left: set[str] = set()
    for request in window:
        if room <= 0:
            break
        if request.arrived_at - oldest >= max_overtake_s:
            continue  # too young to overtake the oldest waiting request
        key = request.cache_key
        warm_somewhere = any(key in w.resident and w.outstanding < w.capacity for w in local)
        if warm_somewhere and attempt(request, warm_only=True):
            left.add(request.invocation_id)
    for request in window:
        if room <= 0:
            break
        if request.invocation_id not in left:
            attempt(request, warm_only=False)
    return DispatchPlan(assignments, rejected, local)


def plan_dispatch(
    policy: Policy, pending: Sequence[RequestView], workers: Sequence[WorkerView], now: float
) -> list[tuple[str, str]]:
    """Just the (invocation_id, worker_id) assignments of `plan`.

    Rejections are dropped here (rejected requests stay queued and are refused
    again next time); a scheduler that answers rejections calls `plan`.
    """
    return plan(policy, pending, workers, now).assignments

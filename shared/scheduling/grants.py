"""Grants: worker slots lent to an ingress so a warm function skips the scheduler.

The scheduler decides every invocation it sees, but the hop through it costs as
much as the function itself for short ones. So when it places an invocation on a
worker where the function is warm and there is room to spare, it may lend the
ingress that sent it some of that worker's slots for the function: ingress then
sends up to that many at a time straight to the worker (the way Ray's owners keep
a leased worker for tasks of one scheduling class). Reserved slots are taken out
of the capacity every policy sees, so other functions never count on them; grants
are short-lived and renewed only while nothing waits in the scheduler's queue, so
the scheduler takes the slots back as soon as it has a use for them.

Pure: the scheduler's books call these with their views.
"""

from __future__ import annotations

from shared.scheduling.base import RequestView, WorkerView

# At most this share of a worker's free slots goes to one grant: the rest stays
# with the scheduler, for other functions and other ingress instances.
SHARE = 0.5
# Only a hot function is lent slots: one this ingress sent at least HOT_CALLS times
# in the last HOT_WINDOW_S. Lent slots are held from other functions, so a function
# called now and then would hold them for nothing (and a skewed mix of many
# functions would fill the workers with idle grants).
HOT_CALLS = 3
HOT_WINDOW_S = 1.0
# Nor is anything lent from a worker with fewer free slots than this: where slots
# are scarce, holding one back for a function costs other functions loads and waits
# (measured: bench.live_policies, 4 slots per worker, 24 functions: 25% more model
# loads under locality with grants than without).
MIN_FREE = 4


def grant_slots(
    worker: WorkerView,
    request: RequestView,
    *,
    queued: int,
    limit: int,
    now: float,
    recent_calls: int = HOT_CALLS,
) -> int:
    """Slots of `worker` to lend for direct sends of `request.function` (0: none).

    `worker` is the view after `request` was assigned to it. Nothing is lent while
    requests wait in the queue (they need the slots), from a worker with fewer than
    MIN_FREE free slots, for a function that is not hot
    (`recent_calls` from this ingress in the last HOT_WINDOW_S, this one included),
    for one whose model is not ready on the worker (its runs are the scheduler's to
    order behind the swap-in), or beyond `limit` (the function's own concurrency).
    """
    free = worker.capacity - worker.outstanding
    if queued or limit <= 0 or recent_calls < HOT_CALLS or free < MIN_FREE:
        return 0
    key = request.cache_key
    cache = worker.cache
    warm = key in worker.resident and (cache is None or cache.ready(key, now))
    if request.model and not warm:
        return 0
    return max(0, min(limit, int(free * SHARE)))


def keep_grant(worker: WorkerView, *, queued: int) -> bool:
    """Whether a grant on `worker` may be renewed: nothing queued, worker taking work."""
    return not queued and worker.capacity > 0

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


def grant_slots(
    worker: WorkerView, request: RequestView, *, queued: int, limit: int, now: float
) -> int:
    """Slots of `worker` to lend for direct sends of `request.function` (0: none).

    `worker` is the view after `request` was assigned to it. Nothing is lent while
    requests wait in the queue (they need the slots), for a function whose model is
    not ready on the worker (its runs are the scheduler's to order behind the
    swap-in), or beyond `limit` (the function's own concurrency).
    """
    if queued or limit <= 0:
        return 0
    key = request.cache_key
    cache = worker.cache
    warm = key in worker.resident and (cache is None or cache.ready(key, now))
    if request.model and not warm:
        return 0
    free = worker.capacity - worker.outstanding
    return max(0, min(limit, int(free * SHARE)))


def keep_grant(worker: WorkerView, *, queued: int) -> bool:
    """Whether a grant on `worker` may be renewed: nothing queued, worker taking work."""
    return not queued and worker.capacity > 0

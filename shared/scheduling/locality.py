"""Locality-aware load balancing (GPU-FaaS LALB), with out-of-order dispatch.

A request goes where its model is resident unless that worker is overloaded
(more than `overload_slack` outstanding above the least-loaded candidate). If
the model is resident only on full workers, the request waits for one of them
for at most the time a swap-in would take elsewhere (the ski-rental break-even:
never worse than twice the better choice in hindsight); then it is placed cold.
Cold placement picks, among the least-loaded workers, the one where loading
the model evicts least, by the same cost model `eviction.choose_victims` acts
on. `out_of_order` lets `dispatch.plan` run warm requests ahead of cold ones.
"""

from __future__ import annotations

import heapq
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from shared.scheduling.base import RequestView, WorkerView, eligible
from shared.scheduling.eviction import eviction_cost
from shared.schema import FunctionKind


@dataclass
class Locality:
    name: str = "locality"
    # Read by dispatch.plan: reorder within `lookahead`, overtaking only
    # requests that arrived less than `max_overtake_s` earlier.
    out_of_order: bool = True
    max_overtake_s: float = 0.25
    lookahead: int = 64
    overload_slack: int = 1
    # Cold placement prices eviction on this many least-loaded workers only,
    # which keeps a decision O(workers) with a small constant.
    sample: int = 8

    def choose(self, request: RequestView, workers: Sequence[WorkerView], now: float) -> str | None:
        # Shortcut, same answer as `pick`: a request whose model is resident only
        # on full workers waits. dispatch.plan asks this of every queued request
        # on every pass, so skip the full `eligible` scan for it.
        key = request.cache_key
        gpu = request.kind is FunctionKind.GPU
        holders = [w for w in workers if key in w.resident and w.device.startswith("cuda") is gpu]
        if (
            holders
            and all(w.outstanding >= w.capacity for w in holders)
            and self._young(request, holders[0], now)
        ):
            return None
        return self.pick(request, eligible(request, workers), workers, now)

    def pick(
        self,
        request: RequestView,
        candidates: Sequence[WorkerView],
        workers: Sequence[WorkerView],
        now: float,
    ) -> str | None:
        """`choose` restricted to `candidates` (workers with room, maybe filtered
        further); `workers` is everyone, since a full worker holding the model
        warm can still be worth waiting for."""
        if not candidates:
            return None
        key = request.cache_key
        warm = [w for w in candidates if key in w.resident]
        if warm:
            min_out = min(w.outstanding for w in candidates)
            best = min(warm, key=lambda w: (w.outstanding, w.link_busy_until, w.worker_id))
            if best.outstanding <= min_out + self.overload_slack:
                return best.worker_id
        elif self._worth_waiting(request, workers, now):
            return None
        return cold_placement(request, candidates, now, self.sample).worker_id

    def _worth_waiting(
        self, request: RequestView, workers: Sequence[WorkerView], now: float
    ) -> bool:
        key = request.cache_key
        gpu = request.kind is FunctionKind.GPU
        # Only full holders are worth waiting for; one with room was passed over
        # on purpose (overloaded, or too slow for the SLO policy).
        holder = next(
            (
                w
                for w in workers
                if key in w.resident
                and w.outstanding >= w.capacity
                and w.device.startswith("cuda") is gpu
            ),
            None,
        )
        return holder is not None and self._young(request, holder, now)

    @staticmethod
    def _young(request: RequestView, holder: WorkerView, now: float) -> bool:
        """Waited less than a swap-in would take: still worth waiting (ski rental)."""
        return now - request.arrived_at < holder.profile.swap_s(request.model_bytes)


def cold_placement(
    request: RequestView, candidates: Sequence[WorkerView], now: float, sample: int
) -> WorkerView:
    """The candidate (non-empty) where loading the request's model hurts least.

    Ties in load are broken by a per-model rotation of the worker list, so cold
    loads of different models spread over the cluster instead of piling onto the
    first workers listed.
    """
    key = request.cache_key
    size = request.model_bytes
    n = len(candidates)
    start = zlib.crc32(key.encode()) % n
    pool = heapq.nsmallest(
        sample,
        range(n),
        key=lambda i: (
            candidates[i].outstanding,
            candidates[i].memory_free < size,
            candidates[i].link_busy_until,
            (i - start) % n,
        ),
    )

    def cost(i: int) -> tuple[float, int, float, int]:
        w = candidates[i]
        if w.memory_free >= size:
            price = 0.0
        elif w.cache is not None:
            price = eviction_cost(w.cache, key, size, now)
        else:
            # Without a cache model, bytes to free is the best proxy we have.
            price = float(size - w.memory_free)
        return (price, w.outstanding, w.link_busy_until, (i - start) % n)

    return candidates[min(pool, key=cost)]

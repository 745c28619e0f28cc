"""Deployed functions' models put into the node's host tier before any request asks
for them (FaaSwap's models in host memory; the policy: shared/scheduling/prefetch.py).

The node's worker (the agent, where there is one) runs it: on each deploy or
removal, and every PERIOD_S (a model pushed again), it reads the deployed specs (the
registry's watched copy), asks the store for each model's current key and size, and
fetches what the plan says, one model at a time and through the same path a start
takes (`HandlerCache.host_model`: the node-wide lock, so a start that comes meanwhile
waits for this fill instead of making its own). A cold start then moves weights from
host memory only. What fails is logged and tried again next round; a request for the
model loads it on demand meanwhile, as before.

Every node prefetches every deployed model its budget holds: on a large cluster
each model is then fetched once per node. Prefetching only where the packer would
place the function is left for when a cluster needs it.
"""

from __future__ import annotations

import os

import anyio

from services.gpu_worker.models import HandlerCache
from shared.errors import GfaasError
from shared.logs import get_logger
from shared.modelstore import ModelStore
from shared.modelswap.host_tier import segment_name
from shared.registry import Registry
from shared.scheduling.prefetch import PrefetchPlan, Stored, plan
from shared.schema import FunctionSpec

log = get_logger("gpu_worker")

PERIOD_S = 2.0
MB = 1024 * 1024


def budget_bytes(setting_mb: int) -> int:
    """GFAAS_HOST_PREFETCH_MB: that many MiB; 0: none (off); below 0: a quarter of
    the node's memory."""
    if setting_mb >= 0:
        return setting_mb * MB
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError):
        return 0


class Prefetcher:
    def __init__(
        self,
        registry: Registry[FunctionSpec],
        store: ModelStore,
        handlers: HandlerCache,
        budget: int,
        *,
        period_s: float = PERIOD_S,
    ) -> None:
        self.registry = registry
        self.store = store
        self.handlers = handlers
        self.budget = budget
        self.period_s = period_s
        self.held: dict[tuple[str, str], int] = {}  # (model, key) -> bytes, prefetched here
        self.skipped: tuple[str, ...] = ()
        # Deployed models whose current weights the tier holds, however they got
        # there (prefetched, or an instance's own fill): the agent's beat says so.
        self.resident: frozenset[str] = frozenset()
        self.fetched = 0
        self.dropped = 0

    async def run(self) -> None:
        """Rounds until cancelled; with no budget they fetch nothing and only keep
        `resident` current."""
        await self.registry.wait_synced()
        while True:
            try:
                await self.round()
            except Exception as exc:  # the store away, say: next round tries again
                log.warning("prefetch.round_failed", error=repr(exc))
            with anyio.move_on_after(self.period_s):
                await self.registry.changed()

    async def round(self) -> PrefetchPlan:
        models = sorted({s.model for s in self.registry.all() if s.model})
        stored = []
        for model in models:
            current = await self.store.current(model)
            if current is not None:
                stored.append(Stored(model, current[0], current[1]))
        todo = plan(stored, self.held, self.budget, self.handlers.models_in_use())
        for model, key in todo.drop:
            self.handlers.host_tier.evict(model, key)
            del self.held[(model, key)]
            self.dropped += 1
            log.info("prefetch.dropped", model=model)
        for w in todo.fetch:
            try:
                host, _ = await self.handlers.host_model(w.model)
            except GfaasError as exc:
                log.warning("prefetch.failed", model=w.model, error=exc.reason)
                continue
            self.held[(w.model, w.key)] = host.nbytes
            self.fetched += 1
            log.info("prefetch.fetched", model=w.model, bytes=host.nbytes)
        self.skipped = todo.skipped
        tier = self.handlers.host_tier
        present = set(tier.resident())
        self.resident = frozenset(
            w.model for w in stored if segment_name(w.model, w.key, tier.prefix) in present
        )
        return todo

    def details(self) -> dict[str, object]:
        return {
            "budget_bytes": self.budget,
            "models": sorted(m for m, _ in self.held),
            "resident": sorted(self.resident),
            "bytes": sum(self.held.values()),
            "skipped": list(self.skipped),
            "fetched": self.fetched,
            "dropped": self.dropped,
        }

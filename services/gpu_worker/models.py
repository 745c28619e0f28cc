"""The worker's device tier: loaded handlers (and their models) kept warm.

Weights come from the node's host tier (shared memory, filled from the object
store on a miss) and are swapped onto the device group by group while the first
request runs. Which handlers stay is decided by the cost-aware eviction policy of
shared.scheduling (size, reload cost, popularity; never a model in use): the
scheduler's view of this cache (heartbeats) is the same model eviction acts on.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import anyio
import msgspec

from services.gpu_worker.bundles import Mounted
from shared import tracing
from shared.config import Settings
from shared.errors import GfaasError, described
from shared.function import (
    LoadContext,
    WeightsArrival,
    contract_problem,
    handler_refusal,
    resolve,
)
from shared.function import handler_packages as handler_packages_of
from shared.modelswap import HostModel, HostTier, SwapIn
from shared.scheduling.cache import DeviceCache
from shared.scheduling.eviction import CannotFit, choose_victims
from shared.schema import DeviceWeights, ErrorCode, FunctionSpec

Handler = Callable[[dict[str, Any]], Mapping[str, Any]]
WeightsFetcher = Callable[[str], Awaitable[Path]]
# The model in the host tier from its loading-optimised blob, or None (use the file).
TierFiller = Callable[[str, HostTier], Awaitable[HostModel | None]]
# The device's one copy of a model's weights, from the agent (a CUDA instance).
DeviceWeightsSource = Callable[[str], Awaitable[DeviceWeights]]

MB = 1024 * 1024
# Handlers that have run faster than this (moving average) run on the event loop:
# a thread hand-off costs more than the work itself.
INLINE_BELOW_MS = 0.3


@dataclass
class TierReport:
    """The device tier as a heartbeat reports it: per cache key."""

    capacity: int
    sizes: dict[str, int] = field(default_factory=dict)
    load_s: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    loading: list[str] = field(default_factory=list)


@dataclass
class Loaded:
    spec: FunctionSpec
    handler: Handler
    limiter: anyio.CapacityLimiter
    size: int
    load_ms: float
    ctx: LoadContext
    ewma_ms: float = float("inf")
    # Where its weights were when it was loaded: "host" (the node's host tier had
    # them), "store" (fetched from the object store into it), "" (no model).
    weights_from: str = ""
    # Wall-clock times of its load's steps that ran side by side (an instance's
    # start-up timeline): "skeleton", the build needed the weights; "weights", they
    # were in the host tier and the device space reserved.
    setup_at: dict[str, float] = field(default_factory=dict)

    @property
    def runs_inline(self) -> bool:
        return self.ewma_ms < INLINE_BELOW_MS

    def observe(self, exec_ms: float) -> None:
        self.ewma_ms = (
            exec_ms if self.ewma_ms == float("inf") else 0.8 * self.ewma_ms + 0.2 * exec_ms
        )
        # Once every weight is on the device, forwards no longer need the swap hooks.
        for swap in self.ctx.swaps:
            if swap.done and swap._hooks:
                swap.detach_hooks()


def build_handler(spec: FunctionSpec, ctx: LoadContext, packages: Sequence[str]) -> Handler:
    """The handler `spec` names, built; only one from `packages` is imported."""
    target = resolve(spec.handler, packages=packages)
    problem = contract_problem(spec.handler, target)
    if problem is not None:
        raise GfaasError(ErrorCode.HANDLER_ERROR, problem)
    handler: Handler = cast(Any, target)(ctx) if inspect.isclass(target) else target
    return handler


# Spec keys a loaded handler does not depend on: a redeploy changing only these
# keeps it warm.
_NOT_BUILT_FROM = (
    "description",
    "slo_ms",
    "timeout_ms",
    "concurrency",
    "min_instances",
    "max_instances",
    "idle_s",
    "slo_unmeetable",
)


def _builds_alike(old: FunctionSpec, new: FunctionSpec) -> bool:
    """Would `new` build the same handler as `old` (only keys outside the build differ)?"""
    same = {key: getattr(new, key) for key in _NOT_BUILT_FROM}
    return msgspec.structs.replace(old, **same) == new


def cache_key(spec: FunctionSpec) -> str:
    """What the scheduler sees resident: the model, or the function without one."""
    return spec.model or spec.name


class HandlerCache:
    def __init__(
        self,
        *,
        device: str,
        threads: int,
        capacity_bytes: int,
        fetch_weights: WeightsFetcher,
        host_tier: HostTier | None = None,
        group_bytes: int = 2 * MB,
        clock: Callable[[], float] = time.monotonic,
        handler_packages: str = Settings.handler_packages,
        share_weights: bool = False,
        fill_host_tier: TierFiller | None = None,
        bundle: Mounted | None = None,
        device_weights: DeviceWeightsSource | None = None,
    ) -> None:
        # The node's allow-list: a spec naming a handler outside it (one written into
        # the registry by hand) is refused before anything is fetched or imported.
        self.handler_packages = handler_packages_of(handler_packages)
        # The code bundle on this process's import path (an instance of a function
        # whose spec pins one); its packages are allowed for that spec alone.
        self.bundle = bundle
        # An instance's: the spec of the version its agent started it for
        # (StartInstance.spec), served while a newer one's code cannot be loaded here.
        self.started_for: FunctionSpec | None = None
        self.device = device
        self.threads = threads
        self.cache = DeviceCache(capacity=capacity_bytes)
        self.host_tier = host_tier or HostTier()
        self.group_bytes = group_bytes
        # Models built on the node's one copy of their weights, not copies of it: the
        # host tier's read-only mapping (CPU), or the device copy its agent exports
        # (CUDA: `device_weights` asks for it).
        self.share_weights = share_weights and (device == "cpu" or device_weights is not None)
        self._device_weights = device_weights
        self._fetch = fetch_weights
        self._fill = fill_host_tier
        self._clock = clock
        self._loaded: dict[str, Loaded] = {}
        # Function -> cache key of the loads under way (from the fetch of their weights
        # on; in `cache` once their space is reserved; not yet in `_loaded`).
        self._loading: dict[str, str] = {}
        self._locks: dict[str, anyio.Lock] = {}
        # Set (and replaced) whenever a model stops being in use: loads waiting for
        # room look again.
        self._unpinned = anyio.Event()
        self.room_waits = 0
        self.loads = 0
        self.hits = 0
        self.evictions = 0
        self.swap_ms_total = 0.0
        # Function -> (swap start, load start, swap-ins) of handlers built whose weights
        # are still landing: their load time is recorded once the last group lands.
        self._landing: dict[str, tuple[float, float, list[SwapIn]]] = {}

    def packages_for(self, spec: FunctionSpec) -> tuple[str, ...]:
        """The packages `spec`'s handler may come from in this process: the node's,
        and its code bundle's where that bundle is the one on this import path."""
        if not spec.code:
            return self.handler_packages
        if self.bundle is None or self.bundle.ref != spec.code:
            raise GfaasError(
                ErrorCode.HANDLER_ERROR,
                f"{spec.name}: its code bundle {spec.code} is not on this worker's import "
                "path: a function with a code bundle runs only in instances of its own",
            )
        return (*self.bundle.packages, *self.handler_packages)

    def servable(self, spec: FunctionSpec) -> FunctionSpec:
        """The version of `spec` to run here. A redeploy that changed the code bundle
        cannot be loaded into this process (its modules are in `sys.modules`, the new
        bundle is not on its path): until the scheduler replaces it with an instance
        of the new version, it serves the version it loaded, so no call fails for it."""
        mine = self.bundle.ref if self.bundle is not None else ""
        if spec.code == mine:
            return spec
        entry = self._loaded.get(spec.name)
        if entry is not None and entry.spec.code == mine:
            return entry.spec
        # Not loaded yet (or never, the redeploy came first): the version this
        # instance was started for.
        started = self.started_for
        if started is not None and started.name == spec.name and started.code == mine:
            return started
        return spec

    def resident(self) -> list[str]:
        return sorted({cache_key(e.spec) for e in self._loaded.values()})

    def models_in_use(self) -> set[str]:
        """Models whose host-tier mapping a handler here still reads: being built,
        swapping in, or built on the mapping itself (shared weights). A model copied
        onto the device reads it no more. (A cache key is the model's name where the
        function has one, else the function's, which names nothing in the tier.)"""
        busy = set(self._loading.values())
        for e in self._loaded.values():
            reading = self.share_weights or not all(s.landed.is_set() for s in e.ctx.swaps)
            if e.spec.model and reading:
                busy.add(e.spec.model)
        return busy

    def sizes(self) -> dict[str, int]:
        return {cache_key(e.spec): e.size for e in self._loaded.values()}

    def report(self) -> TierReport:
        """The device tier by cache key, for the heartbeat (the scheduler's view)."""
        self._settle()
        now = self._clock()
        keys = {name: cache_key(e.spec) for name, e in self._loaded.items()}
        keys.update(self._loading)
        report = TierReport(capacity=self.cache.capacity)
        for name, entry in self.cache.entries.items():
            key = keys.get(name, name)
            # Two functions over one model hold two copies: their sizes add up.
            report.sizes[key] = report.sizes.get(key, 0) + entry.size
            # Still landing: 0 says "not measured yet" (the scheduler uses its profile).
            load_s = 0.0 if name in self._landing else entry.load_s
            report.load_s[key] = max(report.load_s.get(key, 0.0), load_s)
            report.scores[key] = report.scores.get(key, 0.0) + self.cache.popularity(name, now)
            if name in self._loading:
                report.loading.append(key)
        return report

    @asynccontextmanager
    async def use(self, spec: FunctionSpec, *, wait_s: float = math.inf) -> AsyncIterator[Loaded]:
        """The warm handler for `spec`, pinned (never evicted) while in use.

        When models in use fill the device, a load waits (up to `wait_s`) for one to
        be released instead of failing: the request queues on the worker."""
        entry = await self._get(spec, wait_s)
        self.cache = self.cache.use(spec.name, self._clock())
        try:
            yield entry
        finally:
            self.cache = self.cache.release(spec.name)
            self._settle()
            self._note_unpinned()

    def _note_unpinned(self) -> None:
        self._unpinned.set()
        self._unpinned = anyio.Event()

    async def _get(self, spec: FunctionSpec, wait_s: float = math.inf) -> Loaded:
        entry = self._loaded.get(spec.name)
        if entry is not None and entry.spec == spec:
            self.hits += 1
            return entry
        lock = self._locks.setdefault(spec.name, anyio.Lock())
        async with lock:
            entry = self._loaded.get(spec.name)
            if entry is not None and entry.spec == spec:
                return entry
            if entry is not None and _builds_alike(entry.spec, spec):
                # Redeployed with nothing the handler was built from changed (its
                # description, SLO, scaling keys): the warm handler serves the new spec.
                entry.spec = spec
                entry.limiter.total_tokens = spec.concurrency
                return entry
            if entry is not None:  # redeployed with another handler, model or code
                # The old version's calls still running finish on it; then it goes.
                await self._until_unused(spec.name, wait_s)
                self._drop(spec.name)
            with tracing.tracer().start_as_current_span(
                "worker model load",
                attributes={"gfaas.function": spec.name, "gfaas.model": spec.model},
            ) as span:
                entry = await self._load(spec, wait_s)
                span.set_attribute("gfaas.bytes", entry.size)
            self._loaded[spec.name] = entry
            return entry

    async def host_model(self, model: str) -> tuple[HostModel, Path | None]:
        """`model` in the node's host tier, and the file it was read from if it was: the
        tier has it, or its blob streams in (no file, no unpickling); else the pushed
        file, unpickled into the tier (a tier this process only maps waits for its
        agent's copy instead: ModelStore.fill_host_tier)."""
        host: HostModel | None = None
        weights: Path | None = None
        with tracing.tracer().start_as_current_span(
            "worker model fetch", attributes={"gfaas.model": model}
        ):
            try:
                if self._fill is not None:
                    host = await self._fill(model, self.host_tier)
                if host is None:
                    weights = await self._fetch(model)
            except GfaasError:
                raise  # the store's own word (model_unavailable: not there, corrupt)
            except Exception as exc:
                # The store's reach (a NATS timeout, a lost connection, a full disk):
                # the platform's fault, retried, where it came as the function's own
                # (handler_error, stored as an async call's final result).
                raise GfaasError(
                    ErrorCode.UNAVAILABLE,
                    f"the weights of model {model!r} could not be fetched: {described(exc)}",
                ) from exc
        if host is None:
            assert weights is not None
            file = weights
            try:
                host = await anyio.to_thread.run_sync(
                    self.host_tier.get_or_load, model, file.stem, lambda: file
                )
            except Exception as exc:
                raise GfaasError(
                    ErrorCode.MODEL_UNAVAILABLE,
                    f"weights of model {model!r} cannot be read: {described(exc)}",
                ) from exc
        return host, weights

    async def _load(self, spec: FunctionSpec, wait_s: float = math.inf) -> Loaded:
        packages = self.packages_for(spec)
        refusal = handler_refusal(spec.handler, packages)
        if refusal is not None:
            raise GfaasError(ErrorCode.HANDLER_ERROR, refusal)
        started = time.perf_counter()
        # SAGE's parallel setup: the handler is imported and its model's skeleton built
        # (in a thread) while the weights come into the host tier (and, on a GPU, onto
        # the device); the build waits only for what needs the weights themselves.
        arrival = WeightsArrival() if spec.model else None
        ctx = LoadContext(
            spec=spec,
            device=self.device,
            fetch_file=self._file_fetcher(spec.model) if spec.model else None,
            threads=self.threads,
            group_bytes=self.group_bytes,
            shared=self.share_weights,
            arrival=arrival,
        )
        built: list[Handler] = []
        failed: list[BaseException] = []
        reserved = False
        swap_started = started
        tier_loads = self.host_tier.loads  # one more after: the tier was filled for us
        host: HostModel | None = None
        size = 0
        try:
            async with anyio.create_task_group() as tg:

                async def build() -> None:
                    try:
                        with tracing.tracer().start_as_current_span(
                            "worker swap-in", attributes={"gfaas.device": self.device}
                        ):
                            built.append(
                                await anyio.to_thread.run_sync(build_handler, spec, ctx, packages)
                            )
                    except Exception as exc:
                        failed.append(exc)
                        tg.cancel_scope.cancel()  # the weights are not wanted any more

                tg.start_soon(build)
                try:
                    host, weights, shared_copy, swap_started = await self._weights_in(spec, wait_s)
                    size = host.nbytes if host is not None else 0
                    reserved = True
                    if arrival is not None:
                        arrival.arrive(host, weights, shared_copy)
                except Exception as exc:
                    failed.insert(0, exc)  # the fetch's error says more than the build's
                finally:
                    # Whatever stopped the fetch (a cancellation too): the build thread
                    # must not wait for weights that will not come.
                    if arrival is not None:
                        arrival.fail(described(failed[0]) if failed else "the load was cancelled")
        except BaseException:  # cancelled: what was reserved goes back
            if reserved:
                self.cache = self.cache.release(spec.name).evict([spec.name])
                self._note_unpinned()
            raise
        finally:
            self._loading.pop(spec.name, None)
        if failed or not built:
            if reserved:
                self.cache = self.cache.release(spec.name).evict([spec.name])
                self._note_unpinned()
            first = failed[0] if failed else GfaasError(ErrorCode.INTERNAL, "the build stopped")
            if isinstance(first, GfaasError):
                raise first
            raise GfaasError(
                ErrorCode.HANDLER_ERROR,
                f"loading {spec.name} failed: {described(first)}",
            ) from first
        handler = built[0]
        weights_from = "store" if self.host_tier.loads > tier_loads else "host"
        done = time.perf_counter()
        # A pipelined swap-in is still copying when the handler is built: until its
        # last group lands the load time so far stands in (for eviction), and
        # `_settle` records the real one.
        if ctx.swaps:
            self._landing[spec.name] = (swap_started, started, ctx.swaps)
        load_ms = (done - started) * 1000.0
        # Record what a reload (from the host tier, not the object store) costs, for
        # eviction's cost model and the scheduler's swap-in predictions.
        self.cache = (
            self.cache.release(spec.name)
            .evict([spec.name])
            .insert(spec.name, size, done - swap_started, self._clock())
        )
        self.loads += 1
        self.swap_ms_total += load_ms
        loaded = Loaded(
            spec=spec,
            handler=handler,
            limiter=anyio.CapacityLimiter(spec.concurrency),
            size=size,
            load_ms=load_ms,
            ctx=ctx,
            weights_from="" if host is None else weights_from,
        )
        if arrival is not None:
            steps = {"skeleton": arrival.built_at, "weights": arrival.arrived_at}
            loaded.setup_at = {step: at for step, at in steps.items() if at}
        self._settle(loaded)
        return loaded

    async def _weights_in(
        self, spec: FunctionSpec, wait_s: float
    ) -> tuple[HostModel | None, Path | None, DeviceWeights | None, float]:
        """`spec`'s weights in the host tier (and the file they were read from, if
        they were), the device's copy of them when instances share one, and the
        device-tier space reserved and pinned for them; last, when the part a reload
        from the host tier would also pay began."""
        host: HostModel | None = None
        weights: Path | None = None
        # Under way from here: the host tier's copy it gets is read until the build
        # is done (`models_in_use`), through the wait for room below too, so the
        # prefetcher does not drop it meanwhile (a push replaced it) and empty the
        # load's tensors. `_load` removes it, whatever happens.
        self._loading[spec.name] = cache_key(spec)
        if spec.model:
            host, weights = await self.host_model(spec.model)
        swap_started = time.perf_counter()
        # The device tier holds model weights; a handler without a model keeps only
        # its working memory, which is per request, not cached.
        size = host.nbytes if host is not None else 0
        # On a GPU, the device's one copy of the weights from the agent (made now if
        # no instance holds one); asked before the space is reserved, which must not
        # wait on anything.
        shared_copy = None
        if self.share_weights and host is not None and self._device_weights is not None:
            shared_copy = await self._device_weights(host.name)
        # Reserved before the build gets the weights, so concurrent loads cannot
        # overfill; pinned, so that they cannot evict it half-built either.
        await self._make_room(spec, size, wait_s)
        now = self._clock()
        self.cache = self.cache.insert(spec.name, size, 0.0, now).use(spec.name, now)
        return host, weights, shared_copy, swap_started

    def _file_fetcher(self, model: str) -> Callable[[], Path]:
        """The pushed file, fetched when a handler asks for it (from its build thread)."""
        fetch = self._fetch

        async def fetched() -> Path:
            return await fetch(model)

        def fetch_file() -> Path:
            return anyio.from_thread.run(fetched)

        return fetch_file

    def _settle(self, fresh: Loaded | None = None) -> None:
        """Record the load time, up to the last group landing, of swap-ins now landed.

        `fresh`: the handler `_load` is about to return (not yet in `_loaded`)."""
        for name, (swap_started, started, swaps) in list(self._landing.items()):
            if not all(s.landed.is_set() for s in swaps):
                continue
            loaded = fresh if fresh is not None and fresh.spec.name == name else None
            loaded = loaded or self._loaded.get(name)
            if loaded is None or loaded.ctx.swaps is not swaps:
                continue  # built and not yet handed over, or replaced
            del self._landing[name]
            landed = max(s.finished_at for s in swaps)
            entry = self.cache.entries.get(name)
            if entry is not None:
                entries = dict(self.cache.entries)
                entries[name] = replace(entry, load_s=max(entry.load_s, landed - swap_started))
                self.cache = DeviceCache(self.cache.capacity, entries, self.cache.half_life_s)
            load_ms = max(loaded.load_ms, (landed - started) * 1000.0)
            self.swap_ms_total += load_ms - loaded.load_ms
            loaded.load_ms = load_ms

    async def _make_room(self, spec: FunctionSpec, size: int, wait_s: float) -> None:
        reason = ""
        with anyio.move_on_after(wait_s) as scope:
            while True:
                self._settle()
                choice = choose_victims(self.cache, spec.name, size, self._clock())
                if not isinstance(choice, CannotFit):
                    for key in choice.keys:
                        self._drop(key)
                    return
                if choice.permanent:
                    raise GfaasError(
                        ErrorCode.MODEL_UNAVAILABLE, f"{choice.reason} on {self.device}"
                    )
                # Models in use pin the memory: wait for one to be released.
                reason = choice.reason
                self.room_waits += 1
                await self._unpinned.wait()
        assert scope.cancelled_caught
        raise GfaasError(
            ErrorCode.DEADLINE_EXCEEDED,
            f"{reason} on {self.device}, and none was released in time",
        )

    async def _until_unused(self, name: str, wait_s: float) -> None:
        """Wait (up to `wait_s`) until no call uses `name`'s loaded handler."""
        with anyio.move_on_after(wait_s) as scope:
            while (e := self.cache.entries.get(name)) is not None and e.pins > 0:
                await self._unpinned.wait()
        if scope.cancelled_caught:
            raise GfaasError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"{name}: the calls of its previous version still run on {self.device}",
            )

    def _drop(self, name: str) -> None:
        # The device copy goes; the host tier keeps its copy for the next swap-in.
        self._loaded.pop(name, None)
        self._landing.pop(name, None)
        if name in self.cache.entries:
            self.cache = self.cache.evict([name])
            self.evictions += 1

"""Loaded function handlers, kept warm in an LRU between requests.

A handler instance holds its model on the worker's device; evicting it drops that
copy. (Issue 4 replaces plain LRU with the cost-aware cache.)
"""

from __future__ import annotations

import importlib
import inspect
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import anyio

from shared.errors import GfaasError
from shared.function import LoadContext
from shared.schema import ErrorCode, FunctionSpec

Handler = Callable[[dict[str, Any]], Mapping[str, Any]]
WeightsFetcher = Callable[[str], Awaitable[Path]]


# Handlers that have run faster than this (moving average) run on the event loop:
# a thread hand-off costs more than the work itself.
INLINE_BELOW_MS = 0.3


@dataclass
class Loaded:
    spec: FunctionSpec
    handler: Handler
    limiter: anyio.CapacityLimiter
    ewma_ms: float = float("inf")

    @property
    def runs_inline(self) -> bool:
        return self.ewma_ms < INLINE_BELOW_MS

    def observe(self, exec_ms: float) -> None:
        self.ewma_ms = (
            exec_ms if self.ewma_ms == float("inf") else 0.8 * self.ewma_ms + 0.2 * exec_ms
        )


def resolve(ref: str) -> Any:
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise GfaasError(ErrorCode.HANDLER_ERROR, f"cannot import {module_name!r}: {exc}") from None
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise GfaasError(ErrorCode.HANDLER_ERROR, f"{module_name!r} has no {attr!r}") from None
    return obj


def build_handler(spec: FunctionSpec, ctx: LoadContext) -> Handler:
    target = resolve(spec.handler)
    if inspect.isclass(target):
        instance: Any = cast(Any, target)(ctx)
        if not callable(instance):
            raise GfaasError(ErrorCode.HANDLER_ERROR, f"{spec.handler} instances are not callable")
        handler: Handler = instance
        return handler
    if callable(target):
        fn: Handler = target
        return fn
    raise GfaasError(ErrorCode.HANDLER_ERROR, f"{spec.handler} is neither a class nor a function")


class HandlerCache:
    def __init__(
        self, *, device: str, threads: int, capacity: int, fetch_weights: WeightsFetcher
    ) -> None:
        self.device = device
        self.threads = threads
        self.capacity = max(1, capacity)
        self._fetch = fetch_weights
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()
        self._locks: dict[str, anyio.Lock] = {}
        self.loads = 0
        self.hits = 0

    def resident(self) -> list[str]:
        """Cache keys the scheduler sees: the model name, or the function's for none."""
        return [entry.spec.model or entry.spec.name for entry in self._loaded.values()]

    async def get(self, spec: FunctionSpec) -> Loaded:
        entry = self._loaded.get(spec.name)
        if entry is not None and entry.spec == spec:
            self._loaded.move_to_end(spec.name)
            self.hits += 1
            return entry
        lock = self._locks.setdefault(spec.name, anyio.Lock())
        async with lock:
            entry = self._loaded.get(spec.name)
            if entry is not None and entry.spec == spec:
                return entry
            weights = await self._fetch(spec.model) if spec.model else None
            ctx = LoadContext(
                spec=spec, device=self.device, weights_path=weights, threads=self.threads
            )
            try:
                handler = await anyio.to_thread.run_sync(build_handler, spec, ctx)
            except GfaasError:
                raise
            except Exception as exc:
                raise GfaasError(
                    ErrorCode.HANDLER_ERROR,
                    f"loading {spec.name} failed: {type(exc).__name__}: {exc}",
                ) from exc
            entry = Loaded(
                spec=spec, handler=handler, limiter=anyio.CapacityLimiter(spec.concurrency)
            )
            self._loaded[spec.name] = entry
            self._loaded.move_to_end(spec.name)
            self.loads += 1
            while len(self._loaded) > self.capacity:
                self._loaded.popitem(last=False)
            return entry

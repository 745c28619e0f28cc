"""The policy interface and the baseline policies (round robin, least loaded)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from shared.schema import FunctionKind


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What the scheduler knows of one worker (built from heartbeats + its own books)."""

    worker_id: str
    device: str  # "cpu" or "cuda:N"
    capacity: int
    outstanding: int = 0
    resident: frozenset[str] = frozenset()  # models (or functions without a model) loaded
    memory_free: int = 0

    @property
    def has_room(self) -> bool:
        return self.outstanding < self.capacity

    @property
    def is_gpu(self) -> bool:
        return self.device.startswith("cuda")


@dataclass(frozen=True, slots=True)
class RequestView:
    invocation_id: str
    function: str
    kind: FunctionKind = FunctionKind.CPU
    model: str = ""
    arrived_at: float = 0.0
    deadline: float = float("inf")
    slo_ms: float = 1000.0

    @property
    def cache_key(self) -> str:
        """What must be resident on a worker for this request to run warm."""
        return self.model or self.function


class Policy(Protocol):
    name: str

    def choose(
        self, request: RequestView, workers: Sequence[WorkerView], now: float
    ) -> str | None:
        """The worker to run `request` on, or None to keep it queued (all full)."""
        ...


def eligible(request: RequestView, workers: Sequence[WorkerView]) -> list[WorkerView]:
    """Workers with room, preferring the device kind the function asks for.

    A GPU function runs on a CPU worker when no GPU worker exists (the CPU backend
    is a full implementation, not a stub); it never waits for a GPU that isn't there.
    """
    with_room = [w for w in workers if w.has_room]
    if request.kind is FunctionKind.GPU and any(w.is_gpu for w in workers):
        return [w for w in with_room if w.is_gpu]
    if request.kind is FunctionKind.CPU and any(not w.is_gpu for w in workers):
        return [w for w in with_room if not w.is_gpu]
    return with_room


@dataclass
class RoundRobin:
    name: str = "round_robin"
    _cursor: int = field(default=0, repr=False)

    def choose(
        self, request: RequestView, workers: Sequence[WorkerView], now: float
    ) -> str | None:
        candidates = sorted(eligible(request, workers), key=lambda w: w.worker_id)
        if not candidates:
            return None
        pick = candidates[self._cursor % len(candidates)]
        self._cursor += 1
        return pick.worker_id


@dataclass
class LeastLoaded:
    """Least outstanding requests relative to capacity; the FaaS default baseline."""

    name: str = "least_loaded"

    def choose(
        self, request: RequestView, workers: Sequence[WorkerView], now: float
    ) -> str | None:
        candidates = eligible(request, workers)
        if not candidates:
            return None
        best = min(
            candidates,
            key=lambda w: (w.outstanding / max(w.capacity, 1), w.outstanding, w.worker_id),
        )
        return best.worker_id


POLICIES: dict[str, Callable[[], Policy]] = {
    "round_robin": RoundRobin,
    "least_loaded": LeastLoaded,
    # issue 4's policies register here too
    "load_balance": LeastLoaded,
}


def make_policy(name: str) -> Policy:
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}") from None
    return factory()

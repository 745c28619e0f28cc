"""The policy interface and the baseline policies (round robin, least loaded).

Views are immutable snapshots. The optional fields (cache, profile, swap backlog,
per-request profile numbers) default to "unknown"; policies fall back to plain
load balancing when they are missing, so a scheduler that only knows heartbeats
still works with every policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from shared.scheduling.cache import DeviceCache
from shared.schema import FunctionKind

# PCIe 3.0 x16 with pinned host memory moves about 12 GB/s (../shared/RESEARCH.md, FaaSwap).
DEFAULT_LINK_BANDWIDTH = 12e9


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """Calibrated costs of one device, shared by the predictors and the simulator.

    Interference model: a request that starts while `k` others run on the same
    device takes `exec_s * (1 + interference * k)`. Linear per co-runner is crude
    but monotone and cheap, and it is what both the SLO predictor and the
    simulator assume, so their disagreement is zero by construction.
    """

    link_bandwidth: float = DEFAULT_LINK_BANDWIDTH  # bytes/s, host -> device
    swap_overhead_s: float = 0.002  # per swap-in: allocation + launch of the copies
    interference: float = 0.2  # slowdown per co-running request

    def swap_s(self, nbytes: int) -> float:
        return self.swap_overhead_s + nbytes / self.link_bandwidth

    def slowdown(self, co_runners: int) -> float:
        return 1.0 + self.interference * max(co_runners, 0)


DEFAULT_PROFILE = DeviceProfile()


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What the scheduler knows of one worker (built from heartbeats + its own books)."""

    worker_id: str
    device: str  # "cpu" or "cuda:N"
    capacity: int
    outstanding: int = 0
    resident: frozenset[str] = frozenset()  # models (or functions without a model) loaded
    memory_free: int = 0
    # Optional, for the cache-aware policies:
    memory_total: int = 0
    cache: DeviceCache | None = field(default=None, hash=False)
    profile: DeviceProfile = DEFAULT_PROFILE
    # When the swap-ins already queued on this worker's host link finish (the
    # scheduler's clock, like `now`); in the past = the link is idle.
    link_busy_until: float = 0.0
    # The node it runs on ("": not reported), for requests whose inputs are pooled there.
    node: str = ""
    # An instance serves this function alone ("": any function not run as instances).
    function: str = ""

    @property
    def has_room(self) -> bool:
        return self.outstanding < self.capacity

    @property
    def is_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def swap_backlog_s(self, now: float) -> float:
        """Seconds until this worker's host link is free for another swap-in."""
        return max(self.link_busy_until - now, 0.0)


@dataclass(frozen=True, slots=True)
class RequestView:
    invocation_id: str
    function: str
    kind: FunctionKind = FunctionKind.CPU
    model: str = ""
    arrived_at: float = 0.0
    deadline: float = float("inf")
    slo_ms: float = 1000.0
    # Optional profile numbers; 0 means unknown.
    exec_s: float = 0.0  # warm execution time on an idle device
    model_bytes: int = 0
    # Torpor's RRC for this request's function (see slo.rrc); > threshold = behind its SLO.
    rrc: float = 0.0
    # A workflow stage: the worker whose pool holds its inputs (see `near_instead`).
    near: str = ""
    # The node whose pool holds its by-handle inputs (see `on_input_node`).
    node: str = ""
    # Its function runs as instances of its own (shared.spec.wants_instances): only
    # they take it, and with none yet it waits for one to start.
    instanced: bool = False

    @property
    def cache_key(self) -> str:
        """What must be resident on a worker for this request to run warm."""
        return self.model or self.function

    @property
    def due(self) -> float:
        """The absolute time the request must finish by."""
        if self.deadline != float("inf"):
            return self.deadline
        return self.arrived_at + self.slo_ms / 1000.0


@dataclass(frozen=True, slots=True)
class Rejected:
    """An admission decision: the request cannot meet its deadline anywhere.

    The scheduler answers the caller at once (ErrorCode.OVERLOADED or
    DEADLINE_EXCEEDED) instead of queueing work that is already late.
    """

    invocation_id: str
    reason: str


# A worker id, a rejection, or None = keep the request queued.
Decision = str | Rejected | None


class Policy(Protocol):
    name: str

    def choose(self, request: RequestView, workers: Sequence[WorkerView], now: float) -> str | None:
        """The worker to run `request` on, or None to keep it queued (all full)."""
        ...


class AdmittingPolicy(Protocol):
    """A policy that can also refuse a request (see `decide`)."""

    name: str

    def choose(
        self, request: RequestView, workers: Sequence[WorkerView], now: float
    ) -> str | None: ...

    def decide(self, request: RequestView, workers: Sequence[WorkerView], now: float) -> Decision:
        """Like choose, but says Rejected where choose would only say None."""
        ...


def decide(
    policy: Policy, request: RequestView, workers: Sequence[WorkerView], now: float
) -> Decision:
    """One request's decision under any policy; only admitting policies ever reject."""
    # getattr, not isinstance on a runtime-checkable Protocol: that costs ~6 us a call.
    if request.instanced and not any(w.function == request.function for w in workers):
        return None  # scaling from zero: it waits (to its deadline) for an instance
    admit = getattr(policy, "decide", None)
    decision: Decision = (
        admit(request, workers, now) if admit is not None else policy.choose(request, workers, now)
    )
    if (request.near or request.node) and isinstance(decision, str):
        if request.near and decision != request.near:
            decision = near_instead(request, workers, decision)
        if request.node:
            decision = on_input_node(request, workers, decision)
    return decision


def near_instead(request: RequestView, workers: Sequence[WorkerView], chosen: str) -> str:
    """A workflow stage goes where its inputs are (same device: read in place, no
    copy) when that worker has room, is of the kind the policy picked, is not busier
    than the policy's pick by more than one request, and costs no extra model load."""
    near = next((w for w in workers if w.worker_id == request.near), None)
    picked = next((w for w in workers if w.worker_id == chosen), None)
    if near is None or picked is None or near.outstanding >= near.capacity:
        return chosen
    if near.is_gpu != picked.is_gpu or near.outstanding > picked.outstanding + 1:
        return chosen
    key = request.cache_key
    if key in picked.resident and key not in near.resident:
        return chosen
    return near.worker_id


def on_input_node(request: RequestView, workers: Sequence[WorkerView], chosen: str) -> str:
    """A request whose inputs sit in a node's pool goes to a worker on that node (the
    bytes are read in place, not copied between nodes) when one there would do as
    well as the policy's pick, by `near_instead`'s rules: room, the kind the policy
    picked, not busier by more than one request, no extra model load. Among those,
    warm first, then the least loaded."""
    picked = next((w for w in workers if w.worker_id == chosen), None)
    if picked is None or picked.node == request.node:
        return chosen
    key = request.cache_key
    warm_pick = key in picked.resident
    there = [
        w
        for w in workers
        if w.node == request.node
        and w.outstanding < w.capacity
        and w.is_gpu == picked.is_gpu
        and w.outstanding <= picked.outstanding + 1
        and (key in w.resident or not warm_pick)
    ]
    if not there:
        return chosen
    best = min(
        there,
        key=lambda w: (
            key not in w.resident,
            w.outstanding / max(w.capacity, 1),
            w.outstanding,
            w.worker_id,
        ),
    )
    return best.worker_id


def eligible(request: RequestView, workers: Sequence[WorkerView]) -> list[WorkerView]:
    """Workers with room, preferring the device kind the function asks for.

    A GPU function runs on a CPU worker when no GPU worker exists (the CPU backend
    is a full implementation, not a stub); it never waits for a GPU that isn't there.
    """
    # One pass in the common case: this runs for every decision over every worker.
    gpu = request.kind is FunctionKind.GPU
    mine = request.function if request.instanced else ""
    typed = [
        w
        for w in workers
        if w.outstanding < w.capacity and w.device.startswith("cuda") is gpu and w.function == mine
    ]
    if typed or any(w.device.startswith("cuda") is gpu and w.function == mine for w in workers):
        return typed
    return [w for w in workers if w.outstanding < w.capacity and w.function == mine]


def same_kind(request: RequestView, workers: Sequence[WorkerView]) -> list[WorkerView]:
    """Like `eligible` but with full workers too: where the request could ever run."""
    gpu = request.kind is FunctionKind.GPU
    mine = request.function if request.instanced else ""
    serving = [w for w in workers if w.function == mine]
    typed = [w for w in serving if w.device.startswith("cuda") is gpu]
    return typed or serving


@dataclass
class RoundRobin:
    name: str = "round_robin"
    _cursor: int = field(default=0, repr=False)

    def choose(self, request: RequestView, workers: Sequence[WorkerView], now: float) -> str | None:
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

    def choose(self, request: RequestView, workers: Sequence[WorkerView], now: float) -> str | None:
        candidates = eligible(request, workers)
        if not candidates:
            return None
        best = min(
            candidates,
            key=lambda w: (w.outstanding / max(w.capacity, 1), w.outstanding, w.worker_id),
        )
        return best.worker_id


def _load_balance() -> Policy:
    return LeastLoaded(name="load_balance")


def _locality() -> Policy:
    from shared.scheduling.locality import Locality

    return Locality()


def _locality_fifo() -> Policy:
    from shared.scheduling.locality import Locality

    return Locality(name="locality_fifo", out_of_order=False)


def _slo() -> Policy:
    from shared.scheduling.slo import SloAware

    return SloAware()


POLICIES: dict[str, Callable[[], Policy]] = {
    "round_robin": RoundRobin,
    "least_loaded": LeastLoaded,
    "load_balance": _load_balance,
    # GPU-FaaS LALB + out-of-order dispatch; `locality_fifo` is LALB alone.
    "locality": _locality,
    "locality_fifo": _locality_fifo,
    "slo": _slo,
}


def make_policy(name: str) -> Policy:
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}") from None
    return factory()

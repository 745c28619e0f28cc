"""The worker's books (what runs, what ran, which async attempts it claimed), and the
heartbeat and status details built from them."""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field

import anyio

from services.gpu_worker.device import memory_info
from services.gpu_worker.models import HandlerCache
from services.gpu_worker.staging import Staging
from shared.schema import WorkerHeartbeat, now_millis

# When a spare (standby.py) read its assignment, on the wall clock (0: not a spare).
assigned_at = 0.0


class SetupClock:
    """How long each step of a worker's start took, in ms (an instance's cold start:
    its status shows them), and when each ended on the wall clock (`at`: the other
    services' timestamps of the same start line up with it, bench/coldstart.py)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.last = self.started
        self.steps: dict[str, float] = {}
        self.at: dict[str, float] = {}
        if assigned_at:
            self.at["assigned"] = assigned_at
        self.at["serve"] = time.time()

    def mark(self, step: str) -> None:
        now = time.perf_counter()
        self.steps[step] = round((now - self.last) * 1000.0, 1)
        self.at[step] = time.time()
        self.last = now


@dataclass
class Books:
    worker_id: str
    device: str
    node: str
    # How many invocations run at once (Settings.capacity).
    limit: int
    # What heartbeats offer: `limit`, and 0 once stopping (the scheduler sends nothing more).
    capacity: int
    inflight: int = 0
    completed: int = 0
    failed: int = 0
    # Invocations turned away at capacity (handed back to the scheduler, or `overloaded`).
    refused: int = 0
    # Async attempts claimed and whose results are not stored yet (services/gpu_worker/claims.py).
    claimed: set[str] = field(default_factory=set)
    # Set while nothing runs (shutdown waits for it).
    idle: anyio.Event = field(default_factory=anyio.Event)
    # An instance: the one function it serves, and the agent that started it.
    function: str = ""
    agent: str = ""
    # An instance whose handler and model are still loading (WorkerHeartbeat.starting).
    starting: bool = False
    # Its start, step by step (SetupClock.steps), and when each step ended
    # (SetupClock.at, wall clock); its first run's receipt, execution and answer too.
    setup_ms: dict[str, float] = field(default_factory=dict)
    setup_at: dict[str, float] = field(default_factory=dict)
    # This process's id in its heartbeats (WorkerHeartbeat.boot).
    boot: str = field(default_factory=lambda: secrets.token_hex(8))

    def __post_init__(self) -> None:
        self.idle.set()

    def first(self, step: str) -> None:
        """The wall-clock time of `step` of the first run (kept once)."""
        self.setup_at.setdefault(step, time.time())

    @property
    def full(self) -> bool:
        return self.inflight >= self.limit

    def start(self) -> None:
        if self.inflight == 0:
            self.idle = anyio.Event()
        self.inflight += 1

    def finish(self, ok: bool) -> None:
        self.inflight -= 1
        if ok:
            self.completed += 1
        else:
            self.failed += 1
        if self.inflight == 0:
            self.idle.set()


def heartbeat(books: Books, handlers: HandlerCache) -> WorkerHeartbeat:
    mem = memory_info(books.device)
    tier = handlers.report()
    return WorkerHeartbeat(
        worker_id=books.worker_id,
        device=books.device,
        pid=os.getpid(),
        boot=books.boot,
        memory_total=mem.total,
        memory_used=mem.used,
        memory_free=mem.free,
        models=handlers.resident(),
        inflight=books.inflight,
        capacity=books.capacity,
        sent_at=now_millis() / 1000.0,
        cache_capacity=tier.capacity,
        model_bytes=tier.sizes,
        model_load_s={k: round(v, 6) for k, v in tier.load_s.items()},
        model_score={k: round(v, 4) for k, v in tier.scores.items()},
        loading=tier.loading,
        claimed=sorted(books.claimed),
        node=books.node,
        function=books.function,
        agent=books.agent,
        starting=books.starting,
    )


def details(books: Books, handlers: HandlerCache, staging: Staging) -> dict[str, object]:
    """The worker's `status` details."""
    hb = heartbeat(books, handlers)
    return {
        "worker_id": books.worker_id,
        # The user it runs as: an instance's is the handler user's where it switched.
        "uid": os.getuid(),
        "device": books.device,
        "function": books.function,
        "setup_ms": books.setup_ms,
        "setup_at": books.setup_at,
        "inflight": books.inflight,
        "completed": books.completed,
        "failed": books.failed,
        "refused": books.refused,
        "models": hb.models,
        "model_loads": handlers.loads,
        "model_hits": handlers.hits,
        # Input handles verified on the lease board vs by asking the broker.
        "handle_checks": {
            "local": staging.broker.local_checks,
            "remote": staging.broker.remote_checks,
        },
        "remote_reads": staging.remote_reads,
        "evictions": handlers.evictions,
        "room_waits": handlers.room_waits,
        "host_tier_loads": handlers.host_tier.loads,
        "device_cache": {
            "capacity": handlers.cache.capacity,
            "used": handlers.cache.used,
            "models": handlers.sizes(),
        },
        "memory_free": hb.memory_free,
    }


# -- metrics (shared.metrics.WorkerMetrics): read in the scrape's thread ---------------------


def memory_by_kind(device: str) -> dict[str, int]:
    """`gfaas_device_memory_bytes{kind}`: the device's memory (NVML on CUDA, the host's
    on CPU), as the heartbeat reports it."""
    mem = memory_info(device)
    return {"total": mem.total, "used": mem.used, "free": mem.free}


def utilization(device: str) -> float | None:
    """`gfaas_device_utilization`: how busy the device was lately, 0..1 (NVML's
    GPU utilisation on CUDA, the host's CPU utilisation since the last call on CPU);
    None when it cannot be read."""
    if device.startswith("cuda"):
        from services.gpu_worker import device_cuda

        if not device_cuda._nvml():
            return None
        import pynvml

        try:
            index = int(device.partition(":")[2] or 0)
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu) / 100.0
        except Exception:  # NVML error: no sample rather than a failed scrape
            return None
    import psutil

    return float(psutil.cpu_percent(interval=None)) / 100.0

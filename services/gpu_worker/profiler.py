"""Profiling a function on this node's device: latency and throughput per (spatial
share, temporal quota), batch 1, as the autoscaler plans with them.

Measured in the agent's process, on the handler the worker's cache loads: each
configuration runs the handler back to back for a while on inputs made from the
spec's declared inputs (ones; -1 dimensions as 1). The temporal quota is applied
by a token arbiter of its own holding only this function with that quota as its
cap, so what is measured is the gating instances get. The spatial share is, on a
CPU, the number of cores the running thread is pinned to (and torch's threads);
on a GPU an MPS share needs a process of its own, so the rows are measured with the
whole device's SMs and say so (`spatial`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence

import anyio
import torch

from services.gpu_worker.execute import run_metered
from services.gpu_worker.models import HandlerCache, Loaded
from shared.errors import GfaasError
from shared.scheduling import packing
from shared.schema import ErrorCode, FunctionSpec, Profile, ProfileRow, now_millis
from shared.sharing.cpu import cores_for, node_cores
from shared.sharing.runner import TokenRunner
from shared.sharing.tokens import TokenArbiter

QUOTAS = (0.25, 0.5, 1.0)
# Each configuration runs at least this many times and this long.
MIN_RUNS = 8
MIN_S = 0.3
# ... and at most this long (a slow function is profiled on fewer runs).
MAX_S = 2.0


# SM shares a GPU is profiled at, each in a process under that MPS share
# (Agent.profile_per_share): FaST-GShare's grid, thinned to what a profile can afford.
GPU_SM_SHARES = (0.25, 0.5, 1.0)


def sm_grid(device: str, cores: int) -> tuple[float, ...]:
    """Spatial shares one process measures: on a CPU each distinct core count, at
    most four of them, whose share is a whole percent; on a GPU the whole device
    (see the module's note)."""
    if device.startswith("cuda"):
        return (1.0,)
    counts = sorted({max(1, round(cores * f)) for f in (0.25, 0.5, 0.75, 1.0)})
    # The packer places whole percents only (packing.units): a row of 2 of 3 cores
    # (0.6667) made every plan that chose it fail, and a percent near it (0.66) is
    # not 2 cores side by side with its neighbours' (cores_at), so neither is a row.
    return tuple(c / cores for c in counts if c * packing.UNITS % cores == 0)


def share_grid(device: str, cores: int) -> tuple[float, ...]:
    """Spatial shares measured one process each, the share applied to the process:
    GPU_SM_SHARES on a GPU, the core counts of `sm_grid` on a CPU."""
    return GPU_SM_SHARES if device.startswith("cuda") else sm_grid(device, cores)


def sample_inputs(spec: FunctionSpec, device: str) -> dict[str, torch.Tensor]:
    if not spec.inputs:
        raise GfaasError(
            ErrorCode.BAD_REQUEST,
            f"{spec.name} declares no inputs: give its spec `inputs` (names, dtypes, "
            "shapes) to profile it",
        )
    out = {}
    for t in spec.inputs:
        shape = [1 if d == -1 else d for d in t.shape]
        out[t.name] = torch.ones(shape, dtype=getattr(torch, t.dtype.value), device=device)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


async def measure(
    entry: Loaded,
    inputs: dict[str, torch.Tensor],
    quota: float,
    window_s: float,
    cores: frozenset[int] | None,
) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, req/s) of back-to-back runs under a quota."""
    runner = TokenRunner(TokenArbiter(window_s))
    runner.arbiter.add("profile", base=quota, maximum=quota)
    latencies: list[float] = []
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        if (len(latencies) >= MIN_RUNS and elapsed >= MIN_S) or elapsed >= MAX_S:
            break
        t0 = time.monotonic()
        async with runner.turn("profile") as turn:
            _, _, turn.used_s = await anyio.to_thread.run_sync(run_pinned, entry, inputs, cores)
        latencies.append((time.monotonic() - t0) * 1000.0)
    total = time.monotonic() - started
    return percentile(latencies, 0.5), percentile(latencies, 0.99), len(latencies) / total


async def profile(
    spec: FunctionSpec,
    handlers: HandlerCache,
    *,
    device: str,
    agent: str,
    spatial: str,
    window_s: float,
    share: float = 0.0,
) -> Profile:
    """The function's rows at each spatial share of `sm_grid` and each quota; with
    `share`, one share only: what this process was given (its agent applied it, as
    to an instance: Agent.profile_per_share), measured whole and labelled `share`."""
    inputs = sample_inputs(spec, device)
    pool = sorted(node_cores())
    rows = []
    async with handlers.use(spec) as entry:
        await anyio.to_thread.run_sync(run_metered, entry, inputs, {})  # warm up
        threads = torch.get_num_threads()
        for sm in (share,) if share else sm_grid(device, len(pool)):
            cuda = device.startswith("cuda")
            # A given share is this process's already: its cores, or its MPS share.
            cores = None if cuda or share else frozenset(pool[: cores_for(sm, len(pool))])
            if cores is not None:
                torch.set_num_threads(len(cores))
            try:
                for quota in QUOTAS:
                    p50, p99, rate = await measure(entry, inputs, quota, window_s, cores)
                    rows.append(
                        ProfileRow(
                            sm_share=round(sm, 4),
                            time_quota=quota,
                            p50_ms=round(p50, 3),
                            p99_ms=round(p99, 3),
                            throughput=round(rate, 3),
                        )
                    )
            finally:
                torch.set_num_threads(threads)
    return Profile(
        function=spec.name,
        device=device,
        agent=agent,
        rows=rows,
        measured_at=now_millis() / 1000.0,
        spatial=spatial if device.startswith("cuda") else "cores",
    )


def run_pinned(
    entry: Loaded, inputs: dict[str, torch.Tensor], cores: frozenset[int] | None
) -> tuple[object, float, float]:
    """`run_metered` on `cores` only (the calling thread's, restored after: it is one
    of anyio's pool threads, shared with everything else)."""
    if cores is None or not hasattr(os, "sched_setaffinity"):
        return run_metered(entry, inputs, {})
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        return run_metered(entry, inputs, {})
    finally:
        os.sched_setaffinity(0, before)

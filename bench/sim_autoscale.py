"""Autoscaling from zero vs a static allocation sized for the peak (issue 8's goal).

    .venv/bin/python -m bench.sim_autoscale

One bursty trace from `gfaas/sim/workload.py` (35 functions, seed 1, the generator's
on/off bursts, per-function clusters and a diurnal swing, 300 s) on 200 GPUs
sharing by space and time. Static: each function's instances sized by the same
autoscaler for its highest rate in any second of the trace, all ready at t=0 and
kept. Autoscaled: from zero, every 0.5 s, scaling in after `idle_s`. Both plan for
bursts of 8 simultaneous requests of a function (the trace's clusters are geometric
with mean 2: 8 or more hold < 1% of the requests). Then the cold-start cost is
varied: seconds to fetch a model no tier on the node holds. Prints tables; writes
docs/img/sim_autoscale.png when matplotlib is there.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.plotting import pyplot, save
from gfaas.sim.sharemodel import shared_functions
from gfaas.sim.sharing import (
    SharingCluster,
    SharingOptions,
    SharingResult,
    StartCost,
    simulate_sharing,
)
from gfaas.sim.workload import Workload, WorkloadSpec, generate
from shared.scheduling.autoscale import AutoscaleSettings

SPEC = WorkloadSpec(n_functions=35, duration_s=300.0, rate=1000.0, seed=1)
# Room for the static allocation (about 92 GPUs' worth, which 100 GPUs cannot pack).
CLUSTER = SharingCluster(nodes=50, gpus_per_node=4)
IDLE_S = (5.0, 10.0, 30.0)
FETCH_S = (0.25, 1.0, 4.0)
SWEEP_IDLE_S = 10.0
TARGET = 0.99
GOAL = 0.5
PNG = Path("docs/img/sim_autoscale.png")


def burst_for(spec: WorkloadSpec, tail: float = 0.01) -> int:
    """Cluster size that fewer than `tail` of the requests reach (geometric sizes)."""
    p = 1.0 / max(spec.burst_mean, 1.0)
    if p >= 1.0:
        return 1
    # A request is k-th or later in its cluster with probability (1 - p)^(k - 1).
    return 1 + math.ceil(math.log(tail) / math.log(1.0 - p))


def peaks(workload: Workload) -> dict[str, float]:
    """Each function's highest count of requests in any one-second bin."""
    counts: dict[str, dict[int, int]] = {f.name: {} for f in workload.functions}
    for a in workload.arrivals:
        bins = counts[a.function]
        bins[int(a.time_s)] = bins.get(int(a.time_s), 0) + 1
    return {name: float(max(b.values(), default=0)) for name, b in counts.items()}


def row(label: str, r: SharingResult, static: SharingResult) -> str:
    zero = r.from_zero_s
    mean_zero = f"{np.mean(zero):.2f}" if zero else "-"
    max_zero = f"{max(zero):.2f}" if zero else "-"
    tiers = "/".join(str(n) for n in r.starts_by_tier)
    return (
        f"{label:<25}{r.slo_attainment:>8.2%}{r.instance_s:>8.0f}"
        f"{r.instance_s / static.instance_s:>9.2f}x{r.share_s:>9.0f}"
        f"{r.share_s / static.share_s:>9.2f}x{r.starts:>7d}{tiers:>15}{r.refused:>8d}"
        f"{len(zero):>7d}{mean_zero:>8}{max_zero:>7}"
    )


def main() -> None:
    started = time.perf_counter()
    workload = generate(SPEC)
    functions = shared_functions(workload.functions)
    settings = AutoscaleSettings(burst=burst_for(SPEC))
    base = SharingOptions(settings=settings, horizon_s=SPEC.duration_s)
    static = simulate_sharing(
        functions,
        workload.arrivals,
        CLUSTER,
        replace(base, autoscale=False, prewarm=peaks(workload)),
    )
    # The same allocation on half the GPUs: does it pack?
    half = replace(CLUSTER, nodes=CLUSTER.nodes // 2)
    static_half = simulate_sharing(
        functions, workload.arrivals, half, replace(base, autoscale=False, prewarm=peaks(workload))
    )
    runs = {
        idle: simulate_sharing(functions, workload.arrivals, CLUSTER, replace(base, idle_s=idle))
        for idle in IDLE_S
    }
    offered = len(workload.arrivals) / SPEC.duration_s
    print(
        f"{SPEC.n_functions} functions, {offered:.0f} req/s offered over {SPEC.duration_s:.0f} s, "
        f"{CLUSTER.n_gpus} GPUs, bursts planned for {settings.burst} requests"
    )
    header = (
        f"{'':<25}{'SLO met':>8}{'inst-s':>8}{'vs static':>10}{'share-s':>9}{'vs static':>10}"
        f"{'starts':>7}{'dev/host/none':>15}{'refused':>8}{'from 0':>7}{'mean s':>8}{'max s':>7}"
    )
    print(
        f"static allocation: {static.mean_share:.1f} GPUs' worth of device share; on "
        f"{half.n_gpus} GPUs {static_half.refused} of its placements are refused and "
        f"{static_half.slo_attainment:.2%} of requests meet their SLO"
    )
    print(header)
    print(row("static, sized for peak", static, static))
    for idle, r in runs.items():
        print(row(f"autoscaled, idle {idle:.0f} s", r, static))
    passing = [
        (r.instance_s / static.instance_s, idle)
        for idle, r in runs.items()
        if r.slo_attainment >= TARGET
    ]
    if passing:
        best, idle = min(passing)
        verdict = "met" if best <= GOAL else "not met"
        print(
            f"\nlowest instance-seconds at >= {TARGET:.0%} SLO attainment: {best:.2f}x static "
            f"(idle {idle:.0f} s); goal <= {GOAL}x: {verdict}"
        )
    else:
        print(f"\nno autoscaled run reached {TARGET:.0%} SLO attainment; goal not met")

    print(f"\ncold-start cost (idle {SWEEP_IDLE_S:.0f} s): a model in no tier of the node")
    print(header)
    sweep = {}
    for fetch in FETCH_S:
        start = StartCost(fetch_s=fetch)
        options = replace(base, idle_s=SWEEP_IDLE_S, start=start)
        sweep[fetch] = simulate_sharing(functions, workload.arrivals, CLUSTER, options)
        label = f"fetch {fetch:.2f} s + start {start.process_s:.1f} s"
        print(row(label, sweep[fetch], static))
    print(f"total {time.perf_counter() - started:.0f} s")
    plot(static, runs)


def plot(static: SharingResult, runs: dict[float, SharingResult]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    t = [s[0] for s in static.samples]
    axes[0].plot(t, [s[1] for s in static.samples], label="static, sized for peak", color="k")
    axes[1].plot(t, [s[2] for s in static.samples], label="static, sized for peak", color="k")
    for idle, r in runs.items():
        ts = [s[0] for s in r.samples]
        label = f"autoscaled, idle {idle:.0f} s"
        axes[0].plot(ts, [s[1] for s in r.samples], label=label, linewidth=0.8)
        axes[1].plot(ts, [s[2] for s in r.samples], label=label, linewidth=0.8)
    axes[0].set(xlabel="time (s)", ylabel="instances", title="Instances over a bursty trace")
    axes[1].set(xlabel="time (s)", ylabel="GPUs' worth of device share", title="Device share held")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    save(fig, PNG)


if __name__ == "__main__":
    main()

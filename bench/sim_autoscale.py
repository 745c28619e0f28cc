"""Autoscaling from zero vs a static allocation sized for the peak (issue 8's goal).

    .venv/bin/python -m bench.sim_autoscale

One bursty trace from `gfaas/sim/workload.py` (35 functions, seed 1, the generator's
on/off bursts, per-function clusters and a diurnal swing, 300 s) on 200 GPUs
sharing by space and time. Static: each function's instances sized by the same
autoscaler for its highest rate in any second of the trace, all ready at t=0 and
kept. Autoscaled: from zero, every 0.5 s (and at once when a request would answer
later than half its SLO), on the larger of the rates over the last 2 s and 0.25 s,
scaling in after `idle_s`, or, with two keep-alives, the instances beyond the
burst floor after `surplus_idle_s` and the last ones after `idle_s`.

Both plan with the same rule: a burst model of each function's clusters
(geometric sizes, exponential gaps; the burst floor leaves at most 0.25% of a
function's requests late), the queueing of such clusters in Kingman's
approximation (ca^2 = 2 * mean - 1, deterministic service), and an instance cost of
a tenth of a GPU beyond its slot. The autoscaled runs measure each function's
clusters from its arrivals as they come (`shared/scheduling/clusters.py`, as the
live scheduler does; `MEASURED`); the static allocation, sized at t=0, and the
`known shape` rows for comparison take the trace's (mean 2, gaps 5 ms apart on
average: `settings_for`). For reference, the static allocation under the previous
rule (8 simultaneous requests, burstiness 2, no instance cost) is printed too.
Then the cold-start cost is varied: seconds to fetch a model no tier on the node
holds. Prints tables; writes docs/img/sim_autoscale.png when matplotlib is there.
"""

from __future__ import annotations

import argparse
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
# Two keep-alives: (instances beyond the burst floor, the last ones).
SURPLUS_IDLE_S = ((0.5, 30.0), (1.0, 30.0), (2.0, 30.0))
FETCH_S = (0.25, 1.0, 4.0)
SWEEP = (0.5, 30.0)  # the keep-alives of the cold-start sweep
BURST_BUDGET = 0.0025  # of a function's requests, left late by a burst at idle instances
INSTANCE_COST = 0.1  # GPUs' worth of device share an instance costs beyond its slot
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


def settings_for(spec: WorkloadSpec) -> AutoscaleSettings:
    """The plan rule with the trace's clusters as the burst model (known shape)."""
    return AutoscaleSettings(
        burst_mean=spec.burst_mean,
        burst_gap_ms=spec.burst_gap_s * 1000.0,
        burst_budget=BURST_BUDGET,
        # Poisson clusters of geometric size with mean m: ca^2 = E[K^2] / E[K] = 2m - 1;
        # service is deterministic (cs^2 = 0).
        burstiness=max(2.0 * spec.burst_mean - 1.0, 1.0),
        instance_cost=INSTANCE_COST,
    )


# The same rule with each function's clusters as measured (`clusters.shaped` sets
# the burst model and raises the burstiness to that of the clusters); until they
# show, Kingman's default burstiness (2) and a floor of one request, as the live
# scheduler's defaults.
MEASURED = AutoscaleSettings(burst_budget=BURST_BUDGET, instance_cost=INSTANCE_COST)

# The rule before the burst model: 8 simultaneous requests, Kingman's default
# burstiness, configurations ranked by dominant share alone.
PREVIOUS = AutoscaleSettings(burst=8)


def options(base: SharingOptions, idle: tuple[float | None, float]) -> SharingOptions:
    """Autoscaled from zero: `idle` = (surplus keep-alive or None, last keep-alive)."""
    return replace(
        base,
        surplus_idle_s=idle[0],
        idle_s=idle[1],
        rate_window_s=2.0,
        burst_window_s=0.25,
        react_at=0.5,
    )


def label(idle: tuple[float | None, float], what: str = "autoscaled") -> str:
    if idle[0] is None:
        return f"{what}, idle {idle[1]:.0f} s"
    return f"{what}, idle {idle[0]:g} s / {idle[1]:.0f} s"


def spread(values: list[float]) -> str:
    """min-max (median) of `values`."""
    return f"{min(values):.3g}-{max(values):.3g} (median {float(np.median(values)):.3g})"


def worst(r: SharingResult) -> float:
    """The lowest SLO attainment of any one function."""
    return min((1.0 - m / n for m, n in r.missed.values() if n), default=1.0)


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
        f"{label:<32}{r.slo_attainment:>8.2%}{worst(r):>8.2%}{r.instance_s:>8.0f}"
        f"{r.instance_s / static.instance_s:>9.2f}x{r.share_s:>9.0f}"
        f"{r.share_s / static.share_s:>9.2f}x{r.starts:>7d}{tiers:>16}{r.refused:>8d}"
        f"{len(zero):>7d}{mean_zero:>8}{max_zero:>7}"
    )


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()  # --help; no options
    started = time.perf_counter()
    workload = generate(SPEC)
    functions = shared_functions(workload.functions)
    settings = settings_for(SPEC)
    base = SharingOptions(settings=MEASURED, horizon_s=SPEC.duration_s)
    known = replace(base, settings=settings, measure_clusters=False)
    fixed = replace(known, autoscale=False, prewarm=peaks(workload))
    static = simulate_sharing(functions, workload.arrivals, CLUSTER, fixed)
    previous = simulate_sharing(
        functions, workload.arrivals, CLUSTER, replace(fixed, settings=PREVIOUS)
    )
    # The same allocation on half the GPUs: does it pack?
    half = replace(CLUSTER, nodes=CLUSTER.nodes // 2)
    static_half = simulate_sharing(functions, workload.arrivals, half, fixed)
    idles: list[tuple[float | None, float]] = [(None, idle) for idle in IDLE_S]
    idles += list(SURPLUS_IDLE_S)
    runs = {
        idle: simulate_sharing(functions, workload.arrivals, CLUSTER, options(base, idle))
        for idle in idles
    }
    knowns: dict[tuple[float | None, float], SharingResult] = {
        idle: simulate_sharing(functions, workload.arrivals, CLUSTER, options(known, idle))
        for idle in SURPLUS_IDLE_S
    }
    offered = len(workload.arrivals) / SPEC.duration_s
    print(
        f"{SPEC.n_functions} functions, {offered:.0f} req/s offered over {SPEC.duration_s:.0f} s, "
        f"{CLUSTER.n_gpus} GPUs; bursts: clusters of {SPEC.burst_mean:g} requests on average "
        f"{settings.burst_gap_ms:g} ms apart, at most {BURST_BUDGET:.2%} late; "
        f"burstiness {settings.burstiness:g}; instance cost {INSTANCE_COST:g}"
    )
    shapes = [s for s in runs[SWEEP].shapes.values() if s is not None]
    print(
        f"autoscaled rows: each function's clusters as measured from its arrivals; at the "
        f"end of the trace ({label(SWEEP)}) mean {spread([s.mean for s in shapes])}, gap "
        f"{spread([s.gap_s * 1000.0 for s in shapes])} ms over {len(shapes)} functions; "
        f"static and 'known shape' rows: the trace's shape"
    )
    header = (
        f"{'':<32}{'SLO met':>8}{'worst':>8}{'inst-s':>8}{'vs static':>10}{'share-s':>9}"
        f"{'vs static':>10}{'starts':>7}{'dev/host/none':>16}{'refused':>8}{'from 0':>7}"
        f"{'mean s':>8}{'max s':>7}"
    )
    print(
        f"static allocation: {static.mean_share:.1f} GPUs' worth of device share; on "
        f"{half.n_gpus} GPUs {static_half.refused} of its placements are refused and "
        f"{static_half.slo_attainment:.2%} of requests meet their SLO"
    )
    print(header)
    print(row("static, sized for peak", static, static))
    print(row("static, previous rule", previous, static))
    for idle, r in runs.items():
        print(row(label(idle), r, static))
    for idle, r in knowns.items():
        print(row(label(idle, "known shape"), r, static))
    print()
    verdict(runs, static, previous, "measured shape")
    verdict(knowns, static, previous, "known shape")

    print(f"\ncold-start cost ({label(SWEEP)}): a model in no tier of the node")
    print(header)
    for fetch in FETCH_S:
        start = StartCost(fetch_s=fetch)
        result = simulate_sharing(
            functions, workload.arrivals, CLUSTER, replace(options(base, SWEEP), start=start)
        )
        print(row(f"fetch {fetch:.2f} s + start {start.process_s:.1f} s", result, static))
    print(f"total {time.perf_counter() - started:.0f} s")
    plot(static, {idle: runs[idle] for idle in (*idles[:1], SWEEP)})


def verdict(
    runs: dict[tuple[float | None, float], SharingResult],
    static: SharingResult,
    previous: SharingResult,
    what: str,
) -> None:
    passing = [
        (r.instance_s / static.instance_s, label(idle), r)
        for idle, r in runs.items()
        if r.slo_attainment >= TARGET
    ]
    if not passing:
        print(f"{what}: no autoscaled run reached {TARGET:.0%} SLO attainment; goal not met")
        return
    best, which, r = min(passing, key=lambda p: p[0])
    met = "met" if best <= GOAL else "not met"
    print(
        f"{what}: lowest instance-seconds at >= {TARGET:.0%} SLO attainment: {best:.2f}x "
        f"static ({which}, {r.slo_attainment:.2%}); goal <= {GOAL}x: {met}; "
        f"{r.instance_s / previous.instance_s:.2f}x the previous rule's static allocation"
    )


def plot(static: SharingResult, runs: dict[tuple[float | None, float], SharingResult]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    t = [s[0] for s in static.samples]
    axes[0].plot(t, [s[1] for s in static.samples], label="static, sized for peak", color="k")
    axes[1].plot(t, [s[2] for s in static.samples], label="static, sized for peak", color="k")
    for idle, r in runs.items():
        ts = [s[0] for s in r.samples]
        name = label(idle)
        axes[0].plot(ts, [s[1] for s in r.samples], label=name, linewidth=0.8)
        axes[1].plot(ts, [s[2] for s in r.samples], label=name, linewidth=0.8)
    axes[0].set(xlabel="time (s)", ylabel="instances", title="Instances over a bursty trace")
    axes[1].set(xlabel="time (s)", ylabel="GPUs' worth of device share", title="Device share held")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    save(fig, PNG)


if __name__ == "__main__":
    main()

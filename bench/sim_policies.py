"""Compare load_balance / locality / slo in the simulator (issue 4's goals).

    .venv/bin/python -m bench.sim_policies

Two clusters, each with a working set 3x its total model cache: 35 functions on
4 GPUs (GPU-FaaS's 35-model set), swept over offered load, and 1,000 functions
on 100 GPUs at two loads. Prints tables; writes docs/img/sim_policies.png.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from bench.plotting import pyplot, save
from gfaas.sim.simulator import ClusterSpec, SimResult, simulate
from gfaas.sim.workload import Workload, WorkloadSpec, generate
from shared.scheduling import make_policy

POLICIES = ("load_balance", "locality", "slo")
# GPU-FaaS's LALB without out-of-order dispatch, on the small cluster only.
SMALL_POLICIES = ("load_balance", "locality_fifo", "locality", "slo")
CACHE = 1_500_000_000  # per GPU, for weights
RATIO = 3.0  # working set / total cache
PNG = Path("docs/img/sim_policies.png")
COLORS = {"load_balance": "C0", "locality_fifo": "C1", "locality": "C2", "slo": "C3"}


@dataclass(frozen=True)
class Case:
    label: str
    n_functions: int
    n_gpus: int
    rate: float
    duration_s: float


def workload_for(case: Case) -> Workload:
    return generate(
        WorkloadSpec(
            n_functions=case.n_functions,
            duration_s=case.duration_s,
            rate=case.rate,
            total_model_bytes=int(RATIO * CACHE * case.n_gpus),
            max_model_bytes=CACHE // 2,
            # Shorter on/off sojourns than the default so a short trace sees many bursts.
            on_s=1.0,
            off_s=3.0,
            seed=1,
        )
    )


def cluster_for(case: Case) -> ClusterSpec:
    return ClusterSpec(
        nodes=max(case.n_gpus // 4, 1), gpus_per_node=min(case.n_gpus, 4), cache_bytes=CACHE
    )


def run(case: Case, policies: tuple[str, ...] = POLICIES) -> dict[str, SimResult]:
    workload = workload_for(case)
    cluster = cluster_for(case)
    return {p: simulate(workload, cluster, make_policy(p)) for p in policies}


def table(title: str, case: Case, results: dict[str, SimResult], offered: float) -> None:
    base = results["load_balance"]
    print(
        f"\n{title}: {case.n_functions} functions, {case.n_gpus} GPUs, "
        f"offered {offered:.0f} req/s over {case.duration_s:.0f} s"
    )
    print(
        f"{'policy':<13}{'mean ms':>9}{'p50 ms':>9}{'p99 ms':>9}{'hit':>7}{'SLO met':>9}"
        f"{'rejected':>9}{'req/s':>8}{'mean vs LB':>12}{'p99 vs LB':>11}"
    )
    for name, r in results.items():
        print(
            f"{name:<13}{r.mean_s * 1e3:>9.1f}{r.p50_s * 1e3:>9.1f}{r.p99_s * 1e3:>9.1f}"
            f"{r.hit_rate:>7.1%}{r.slo_attainment:>9.1%}{r.rejected:>9d}{r.throughput:>8.0f}"
            f"{base.mean_s / r.mean_s:>11.1f}x{base.p99_s / r.p99_s:>10.1f}x"
        )


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()  # --help; no options
    started = time.perf_counter()
    sweep: list[tuple[float, dict[str, SimResult]]] = []
    for rate in (30.0, 45.0, 60.0, 75.0, 90.0, 105.0, 120.0):
        case = Case("small", 35, 4, rate, 120.0)
        offered = len(workload_for(case).arrivals) / case.duration_s
        results = run(case, SMALL_POLICIES)
        sweep.append((offered, results))
        table("small cluster", case, results, offered)
    big: list[tuple[str, float, dict[str, SimResult]]] = []
    for label, rate in (("light", 1000.0), ("medium", 1500.0), ("heavy", 2500.0)):
        case = Case(label, 1000, 100, rate, 20.0)
        offered = len(workload_for(case).arrivals) / case.duration_s
        results = run(case)
        big.append((label, offered, results))
        table(f"large cluster, {label} load", case, results, offered)
    plot(sweep, big)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


def plot(
    sweep: list[tuple[float, dict[str, SimResult]]],
    big: list[tuple[str, float, dict[str, SimResult]]],
) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    loads = [offered for offered, _ in sweep]
    for name in SMALL_POLICIES:
        axes[0].plot(
            loads,
            [r[name].mean_s * 1e3 for _, r in sweep],
            marker="o",
            label=name,
            color=COLORS[name],
        )
        axes[1].plot(
            loads,
            [r[name].slo_attainment * 100 for _, r in sweep],
            marker="o",
            label=name,
            color=COLORS[name],
        )
    axes[0].set(
        yscale="log",
        xlabel="offered load (req/s)",
        ylabel="mean latency (ms)",
        title="35 functions, 4 GPUs, working set 3x cache",
    )
    axes[1].set(
        xlabel="offered load (req/s)",
        ylabel="SLO attainment (%)",
        title="SLO attainment (rejections count as misses)",
    )
    axes[1].axhline(99, color="grey", linestyle=":")
    axes[1].axhline(90, color="grey", linestyle=":")
    width = 0.25
    for k, name in enumerate(POLICIES):
        xs = [i + (k - 1) * width for i in range(len(big))]
        axes[2].bar(
            xs, [r[name].mean_s * 1e3 for _, _, r in big], width, label=name, color=COLORS[name]
        )
    axes[2].set_xticks(
        range(len(big)), [f"{label}\n{offered:.0f} req/s" for label, offered, _ in big]
    )
    axes[2].set(yscale="log", ylabel="mean latency (ms)", title="1,000 functions, 100 GPUs")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    save(fig, PNG)


if __name__ == "__main__":
    main()

"""load_balance vs locality vs slo on a live platform, same trace (issue 4).

    .venv/bin/python -m bench.live_policies [--duration 30] [--rate 40] [--workers 3]

One nats-server; per policy a fresh platform (scheduler, ingress, memory broker
and `--workers` CPU workers, each its own process, as `gfaas up` runs them)
with a device tier of `--cache-mb` per worker. `--functions` MLP models with
seeded weights (gfaas.sim.workload's log-normal sizes, scaled so they total
`--ratio` times the cache of all workers together) are pushed to the object
store once. An Azure-like trace (gfaas.sim.workload, seeded) is replayed open
loop: each arrival is sent at its time whatever is still running.

Before each replay every function is called once (fills the node's host tier
and disk cache, which the trace would otherwise pay for under the first policy
only); counters are read before and after the replay. Reported per policy:
mean/p50/p99 latency of successful calls, the share of calls that loaded no
model ("hit"), SLO attainment (on time and successful / all calls: refusals,
errors and timeouts are misses), and ratios to load_balance. Writes
docs/img/live_policies.png.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import nats
import numpy as np
from nats.aio.client import Client as NATS

from bench.live_models import WIDTH, write_mlp
from bench.plotting import pyplot, save
from gfaas.client import Client
from gfaas.sim.workload import Workload, WorkloadSpec, generate
from gfaas.supervisor import Supervisor
from shared.config import Settings
from shared.errors import GfaasError
from shared.natsd import nats_server
from shared.schema import FunctionKind, FunctionSpec

MIB = 1024 * 1024
PNG = Path("docs/img/live_policies.png")
COLORS = {"load_balance": "C0", "locality_fifo": "C1", "locality": "C2", "slo": "C3"}


@dataclass
class Call:
    function: str
    latency_s: float
    ok: bool
    code: str = ""


@dataclass
class Run:
    policy: str
    calls: list[Call] = field(default_factory=list)
    loads: int = 0
    evictions: int = 0
    rejected: int = 0
    wall_s: float = 0.0
    slo_s: dict[str, float] = field(default_factory=dict)
    # Per worker, the scheduler's fitted swap-in cost: (overhead ms, MB/s).
    profiles: list[tuple[float, float]] = field(default_factory=list)


def make_workload(args: argparse.Namespace) -> Workload:
    cache = args.cache_mb * MIB
    return generate(
        WorkloadSpec(
            n_functions=args.functions,
            duration_s=args.duration,
            rate=args.rate,
            total_model_bytes=int(args.ratio * cache * args.workers),
            median_model_bytes=cache // 4,
            model_sigma=0.5,
            max_model_bytes=cache // 2,
            on_s=1.0,
            off_s=3.0,
            seed=args.seed,
        )
    )


def specs_for(workload: Workload, slo_ms: float) -> list[FunctionSpec]:
    return [
        FunctionSpec(
            name=f.name,
            handler="bench.live_models:Mlp",
            kind=FunctionKind.GPU,
            model=f.model,
            slo_ms=slo_ms,
            timeout_ms=10_000,
            concurrency=2,
        )
        for f in workload.functions
    ]


async def push_models(url: str, workload: Workload, work: Path) -> int:
    nc = await nats.connect(url)
    client = Client(nc)
    total = 0
    try:
        for i, f in enumerate(workload.functions):
            layers = max(round(f.model_bytes / (WIDTH * (WIDTH + 1) * 4)), 1)
            path = work / "weights" / f"{f.model}.pt"
            total += write_mlp(path, layers, seed=i)
            await client.push_model(f.model, path)
    finally:
        await nc.drain()
    return total


async def wait_ready(client: Client, workers: int, specs: list[FunctionSpec]) -> None:
    with anyio.fail_after(60):
        while True:
            try:
                sched = (await client.status("scheduler", timeout=1)).details
                ingress = (await client.status("ingress", timeout=1)).details
            except Exception:
                await anyio.sleep(0.2)
                continue
            known = set(ingress.get("functions", []))
            if len(sched["workers"]) >= workers and all(s.name in known for s in specs):
                return
            await anyio.sleep(0.2)


async def counters(nc: NATS, workers: int) -> tuple[int, int]:
    details = await Client(nc).statuses("gpu-worker", expect=workers)
    return (
        sum(d["model_loads"] for d in details.values()),
        sum(d["evictions"] for d in details.values()),
    )


async def replay(
    url: str, policy: str, workload: Workload, specs: list[FunctionSpec], workers: int
) -> Run:
    nc = await nats.connect(url, max_reconnect_attempts=-1)
    client = Client(nc)
    run = Run(policy)
    x = np.random.default_rng(0).standard_normal((1, WIDTH)).astype(np.float32)
    try:
        for spec in specs:
            await client.deploy(spec)
        await wait_ready(client, workers, specs)
        for spec in specs:  # warm-up: host tier and disk cache, not measured
            await client.invoke(spec.name, {"x": x}, timeout=30)
        await anyio.sleep(1.0)  # let heartbeats report the warm-up's loads
        loads0, evictions0 = await counters(nc, workers)
        rejected0 = (await client.status("scheduler")).details["rejected"]
        run.slo_s = {s.name: s.slo_ms / 1000.0 for s in specs}

        async def call(function: str) -> None:
            t = time.perf_counter()
            try:
                reply = await client.invoke_reply(function, {"x": x}, timeout=10)
            except GfaasError as exc:
                run.calls.append(Call(function, time.perf_counter() - t, False, str(exc.code)))
                return
            latency = time.perf_counter() - t
            error = reply.error
            code = f"{error.code}: {kind_of(error.reason)}" if error is not None else ""
            run.calls.append(Call(function, latency, error is None, code))

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for a in workload.arrivals:
                delay = started + a.time_s - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
                tg.start_soon(call, a.function)
        run.wall_s = time.perf_counter() - started
        await anyio.sleep(1.0)
        loads1, evictions1 = await counters(nc, workers)
        run.loads, run.evictions = loads1 - loads0, evictions1 - evictions0
        sched = (await client.status("scheduler")).details
        run.rejected = sched["rejected"] - rejected0
        run.profiles = [
            (w["swap_overhead_ms"], w["link_bandwidth"] / 1e6) for w in sched["workers"].values()
        ]
    finally:
        await nc.drain()
    return run


def kind_of(reason: str) -> str:
    """A short label for an error reason (the table counts errors by label)."""
    for needle, label in (
        ("deadline passed", "SLO passed while queued"),
        ("no worker can finish", "SLO infeasible"),
        ("pin the memory", "worker cache pinned"),
        ("at capacity", "worker full"),
    ):
        if needle in reason:
            return label
    return reason[:40]


@dataclass(frozen=True)
class Summary:
    policy: str
    calls: int
    ok: int
    mean_ms: float
    p50_ms: float
    p99_ms: float
    hit: float
    slo: float
    rejected: int
    errors: dict[str, int]
    loads: int
    profiles: list[tuple[float, float]]


def summarize(run: Run) -> Summary:
    slo_s = run.slo_s
    ok = [c.latency_s for c in run.calls if c.ok]
    lat = np.array(ok) if ok else np.zeros(1)
    met = sum(1 for c in run.calls if c.ok and c.latency_s <= slo_s[c.function])
    errors: dict[str, int] = {}
    for c in run.calls:
        if not c.ok:
            errors[c.code] = errors.get(c.code, 0) + 1
    dispatched = len(run.calls) - run.rejected
    return Summary(
        policy=run.policy,
        calls=len(run.calls),
        ok=len(ok),
        mean_ms=float(lat.mean()) * 1e3,
        p50_ms=float(np.percentile(lat, 50)) * 1e3,
        p99_ms=float(np.percentile(lat, 99)) * 1e3,
        hit=1.0 - run.loads / max(dispatched, 1),
        slo=met / max(len(run.calls), 1),
        rejected=run.rejected,
        errors=errors,
        loads=run.loads,
        profiles=run.profiles,
    )


def print_table(rows: list[Summary]) -> None:
    base = next((r for r in rows if r.policy == "load_balance"), rows[0])
    print(
        f"{'policy':<13}{'calls':>7}{'ok':>7}{'mean ms':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'loads':>7}{'hit':>7}{'SLO met':>9}{'refused':>8}"
        f"{'mean vs LB':>12}{'p99 vs LB':>11}  errors"
    )
    for r in rows:
        print(
            f"{r.policy:<13}{r.calls:>7}{r.ok:>7}{r.mean_ms:>9.1f}{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}"
            f"{r.loads:>7}{r.hit:>7.1%}{r.slo:>9.1%}{r.rejected:>8}"
            f"{base.mean_ms / r.mean_ms:>11.1f}x{base.p99_ms / r.p99_ms:>10.1f}x"
            f"  {r.errors or '-'}"
        )
    print("fitted swap-in per worker (overhead ms, MB/s):")
    for r in rows:
        print(f"  {r.policy:<13}" + ", ".join(f"({o:.1f}, {b:.0f})" for o, b in r.profiles))


def plot(rows: list[Summary], title: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = [r.policy for r in rows]
    colors = [COLORS.get(n, "C4") for n in names]
    axes[0].bar(names, [r.mean_ms for r in rows], color=colors)
    axes[0].set(ylabel="mean latency (ms)", yscale="log", title="mean latency")
    axes[1].bar(names, [r.p99_ms for r in rows], color=colors)
    axes[1].set(ylabel="p99 latency (ms)", yscale="log", title="p99 latency")
    axes[2].bar(names, [r.slo * 100 for r in rows], color=colors)
    axes[2].axhline(99, color="grey", linestyle=":")
    axes[2].axhline(90, color="grey", linestyle=":")
    axes[2].set(ylabel="SLO attainment (%)", ylim=(0, 100), title="SLO met (refusals miss)")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    save(fig, PNG)


def start_platform(url: str, state: Path, policy: str, args: argparse.Namespace) -> Supervisor:
    os.environ.update(
        {
            "GFAAS_POLICY": policy,
            "GFAAS_DEVICE_CACHE_MB": str(args.cache_mb),
            "GFAAS_CAPACITY": str(args.capacity),
            "GFAAS_HEARTBEAT_S": "0.2",
            "GFAAS_HTTP_ENABLED": "0",
            "GFAAS_SHM_NAMESPACE": f"gfaas-live-{secrets.token_hex(3)}",
        }
    )
    settings = Settings(
        nats_url=url,
        state_dir=state,
        log_level="warning",
        policy=policy,
        metrics_port=0,  # any free ports: the defaults may be taken (a platform beside)
    )
    sup = Supervisor(settings=settings, nats_url=url, workers=args.workers)
    sup.start()
    return sup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policies", default="load_balance,locality,slo")
    parser.add_argument("--duration", type=float, default=30.0, help="trace seconds")
    parser.add_argument("--rate", type=float, default=40.0, help="mean requests/s")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--cache-mb", type=int, default=16, help="device tier per worker")
    parser.add_argument("--ratio", type=float, default=3.0, help="working set / all caches")
    parser.add_argument("--functions", type=int, default=24)
    parser.add_argument("--capacity", type=int, default=4, help="requests per worker")
    parser.add_argument("--slo-ms", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    try:
        workload = make_workload(args)
    except ValueError as exc:  # the working set cannot fit --functions models
        parser.error(f"{exc}: more --functions, or a smaller --ratio or fewer --workers")
    specs = specs_for(workload, args.slo_ms)
    started = time.perf_counter()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp, nats_server(Path(tmp) / "nats") as server:
        total = anyio.run(push_models, server.url, workload, Path(tmp))
        print(
            f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
            f"{args.workers} CPU workers x {args.cache_mb} MiB device tier; "
            f"{args.functions} models, {total / MIB:.0f} MiB in all "
            f"({total / (args.cache_mb * MIB * args.workers):.1f}x the caches); "
            f"trace: {len(workload.arrivals)} calls in {args.duration:.0f} s "
            f"({len(workload.arrivals) / args.duration:.0f}/s), seed {args.seed}; "
            f"SLO {args.slo_ms:g} ms; capacity {args.capacity}/worker",
            flush=True,
        )
        for i, policy in enumerate(args.policies.split(",")):
            sup = start_platform(server.url, Path(tmp) / f"state{i}", policy, args)
            try:
                runs.append(anyio.run(replay, server.url, policy, workload, specs, args.workers))
            finally:
                sup.stop()
            print(f"  {policy}: replayed in {runs[-1].wall_s:.1f} s", flush=True)
    rows = [summarize(r) for r in runs]
    print()
    print_table(rows)
    plot(
        rows,
        f"{args.functions} models ({args.ratio:g}x the device tiers), {args.workers} CPU workers, "
        f"{len(workload.arrivals) / args.duration:.0f} req/s, SLO {args.slo_ms:g} ms",
    )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

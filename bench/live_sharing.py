"""Live sharing on this machine (issue 8, benchmark 1): a mix of functions with SLOs,
served (a) as today, by one worker holding the whole device, time-sliced, and (b) as
instances the autoscaler starts from zero, each with a share of the device.

One nats-server; per mode a fresh platform with every service its own process, as
`gfaas up` runs them (one gpu-worker: on this CPU machine the device is the node's
cores). Each function burns a fixed amount of CPU per call (`bench/sharing_funcs.py`).
For each offered rate (Poisson arrivals, open loop, every function at its share of
the rate) the calls run for `--duration` s after a warm-up; *SLO met* is on time and
successful over all calls. The figure of merit is the highest offered rate each mode
serves at >= 99% SLO attainment; *share* is the device share the instances held
(sum of sm_share x time_quota over instances, time-averaged; 1.0 for the whole
worker).

    .venv/bin/python -m bench.live_sharing [--rates 20,40,60,80] [--duration 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np

from bench.node import start_node
from gfaas.client import Client
from gfaas.supervisor import Supervisor
from shared.errors import GfaasError
from shared.natsd import nats_server
from shared.schema import DType, FunctionKind, FunctionSpec, TensorSpec

# (name, CPU ms per call, SLO ms, share of the offered rate)
MIX = (("small", 2.0, 40.0, 0.5), ("mid", 5.0, 80.0, 0.3), ("big", 10.0, 150.0, 0.2))
MS_INPUT = [TensorSpec(name="ms", dtype=DType.FLOAT32, shape=[1])]


def specs(instanced: bool, gpu: bool = False) -> list[FunctionSpec]:
    extra = {"max_instances": 4, "idle_s": 30.0} if instanced else {}
    return [
        FunctionSpec(
            name=f"{name}-{'i' if instanced else 'w'}",
            # On a GPU: 2, 5 or 10 products of 2048x2048 matrices (bench/sharing_funcs.py).
            handler=f"bench.sharing_funcs:gpu_{name}" if gpu else f"bench.sharing_funcs:spin{ms:g}",
            kind=FunctionKind.GPU if gpu else FunctionKind.CPU,
            slo_ms=slo,
            concurrency=1 if instanced else 8,
            memory_mb=64,
            inputs=MS_INPUT,
            **extra,  # type: ignore[arg-type]
        )
        for name, ms, slo, _ in MIX
    ]


@dataclass
class Result:
    mode: str
    rate: float
    calls: int
    met: int
    p99_ms: float
    share: float
    instances: float

    @property
    def attainment(self) -> float:
        return self.met / max(self.calls, 1)


async def offer(
    client: Client, fns: list[FunctionSpec], rate: float, duration: float, seed: int
) -> tuple[int, int, list[float]]:
    rng = np.random.default_rng(seed)
    calls = met = 0
    latencies: list[float] = []

    async def call(spec: FunctionSpec, ms: float) -> None:
        nonlocal calls, met
        started = time.perf_counter()
        try:
            await client.invoke(spec.name, {"ms": np.array([ms], dtype=np.float32)}, timeout=5)
            ok = True
        except GfaasError:
            ok = False
        took = (time.perf_counter() - started) * 1000.0
        calls += 1
        latencies.append(took)
        met += ok and took <= spec.slo_ms

    end = time.perf_counter() + duration
    async with anyio.create_task_group() as tg:
        while (now := time.perf_counter()) < end:
            await anyio.sleep(float(rng.exponential(1.0 / rate)))
            pick = rng.choice(len(MIX), p=[m[3] for m in MIX])
            tg.start_soon(call, fns[pick], MIX[pick][1])
            del now
    return calls, met, latencies


async def sample(client: Client, into: list[tuple[float, int]]) -> None:
    while True:
        into.append(await held_share(client))
        await anyio.sleep(0.5)


async def held_share(client: Client) -> tuple[float, int]:
    status = await client.status("scheduler", timeout=2)
    live = (status.details.get("instances") or {}).get("live") or {}
    items = [i for v in live.values() for i in v]
    return sum(i["sm_share"] * i["time_quota"] for i in items), len(items)


async def run_mode(
    url: str, mode: str, rates: list[float], args: argparse.Namespace
) -> list[Result]:
    fns = specs(mode == "instances", gpu=args.gpu)
    out = []
    async with Client.connect(url) as client:
        for spec in fns:
            await client.deploy(spec, handler_check=False)
        if mode == "instances":
            # As a user would (and as the scheduler does after a deploy): profiled
            # first, so the autoscaler plans with measured shares.
            for spec in fns:
                profile = await client.profile(spec.name)
                print(
                    f"{mode:12} profile of {spec.name}: "
                    + ", ".join(
                        f"({r.sm_share:g},{r.time_quota:g}) p99 {r.p99_ms:.1f} ms "
                        f"{r.throughput:.0f}/s"
                        for r in profile.rows
                    ),
                    flush=True,
                )
        await anyio.sleep(1.0)
        # The first call of each function: from zero instances, in instances mode.
        for spec, (_, ms, _, _) in zip(fns, MIX, strict=True):
            started = time.perf_counter()
            await client.invoke(spec.name, {"ms": np.array([ms], dtype=np.float32)}, timeout=30)
            first = (time.perf_counter() - started) * 1000.0
            print(f"{mode:12} first call of {spec.name}: {first:7.1f} ms", flush=True)
        if mode == "instances":
            status = await client.status("scheduler", timeout=2)
            for f, plan in (status.details.get("instances") or {}).get("plans", {}).items():
                print(f"{mode:12} plan of {f}: {plan}", flush=True)
        for rate in rates:
            # Warm-up (instances start from zero here; not measured).
            await offer(client, fns, rate, args.warmup, seed=args.seed + 1000)
            shares: list[tuple[float, int]] = []
            async with anyio.create_task_group() as tg:
                if mode == "instances":
                    tg.start_soon(sample, client, shares)
                calls, met, lat = await offer(client, fns, rate, args.duration, seed=args.seed)
                tg.cancel_scope.cancel()
            share = float(np.mean([s for s, _ in shares])) if shares else 1.0
            count = float(np.mean([n for _, n in shares])) if shares else 1.0
            p99 = float(np.percentile(lat, 99)) if lat else 0.0
            r = Result(mode, rate, calls, met, p99, share, count)
            print(
                f"{mode:12} {rate:6.0f}/s  calls {calls:5}  SLO met {r.attainment:6.1%}  "
                f"p99 {p99:7.1f} ms  share {share:4.2f}  instances {count:4.1f}",
                flush=True,
            )
            out.append(r)
        if mode == "instances":
            await per_instance(client)
    return out


async def per_instance(client: Client) -> None:
    """Each instance's calls served over the whole run, beside its share."""
    status = await client.status("scheduler", timeout=2)
    live = (status.details.get("instances") or {}).get("live") or {}
    shares = {
        i["instance"]: (f, i["sm_share"], i["time_quota"]) for f, v in live.items() for i in v
    }
    for worker in await client.status_all("gpu-worker", timeout=1.0):
        name = str(worker.details.get("worker_id", ""))
        if name in shares:
            f, sm, quota = shares[name]
            print(
                f"instance {name} of {f}: sm {sm:g} x time {quota:g} (share {sm * quota:.3f}), "
                f"{worker.details.get('completed', 0)} calls served in {worker.uptime_s:.0f} s",
                flush=True,
            )


def start(url: str, state: Path) -> Supervisor:
    return start_node(url, state, "share")


def best(rows: list[Result]) -> float:
    ok = [r.rate for r in rows if r.attainment >= 0.99]
    return max(ok) if ok else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", default="20,40,60,80,100")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--modes", default="time-shared,instances")
    parser.add_argument(
        "--gpu", action="store_true", help="GPU handlers (matrix products) on a cuda worker"
    )
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; mix {MIX}")
    results: dict[str, list[Result]] = {}
    with tempfile.TemporaryDirectory() as tmp, nats_server(Path(tmp) / "nats") as server:
        for mode in args.modes.split(","):
            sup = start(server.url, Path(tmp) / mode)
            try:
                time.sleep(4.0)
                results[mode] = anyio.run(run_mode, server.url, mode, rates, args)
            finally:
                sup.stop()
    if len(results) < 2:
        return
    base, shared = best(results["time-shared"]), best(results["instances"])
    print(
        f"\nhighest rate at >= 99% SLO met: time-shared {base:.0f}/s, instances "
        f"{shared:.0f}/s, ratio {shared / base if base else float('inf'):.2f}x"
    )


if __name__ == "__main__":
    main()

"""1 MiB transfers while a big transfer runs on the same link: fair sharing vs FIFO.

Real memcpy between shared-memory slabs, issued chunk by chunk by the copier in the
order the link scheduler decides. Goal: with sharing, a small transfer's latency
stays within 2x its idle latency plus one chunk time.

    .venv/bin/python -m bench.dp_isolation [--big-mib 1024]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import Future
from typing import Any

import numpy as np

from bench.dp_common import IMG, MiB, machine, percentile, table
from bench.plotting import pyplot
from shared.dataplane.bandwidth import LinkScheduler, Mode
from shared.dataplane.copier import Copier, CopyResult
from shared.dataplane.shm import ShmBackend
from shared.schema import DType

SMALL = MiB


def views(
    shm: ShmBackend, size: int, created: list[str]
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    a = shm.create_slab(size, "bench", prefault=True)
    b = shm.create_slab(size, "bench", prefault=True)
    created += [a.segment, b.segment]
    src = shm.as_numpy(a.segment, 0, size, DType.UINT8, [size])
    dst = shm.as_numpy(b.segment, 0, size, DType.UINT8, [size])
    src[:] = 1
    return src, dst


def memcpy_rate(src: np.ndarray[Any, Any], dst: np.ndarray[Any, Any]) -> float:
    n = min(len(src), 256 * MiB)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(dst[:n], src[:n])
        best = min(best, time.perf_counter() - t)
    return n / best


def idle_latencies(copier: Copier, small: tuple[Any, Any], n: int = 200) -> list[float]:
    out = []
    for i in range(n):
        out.append(copier.submit(f"s{i}", small[1], small[0], SMALL).result().latency_s)
        time.sleep(0.0005)
    return out


def loaded(
    mode: Mode, chunk: int, rate: float, big: tuple[Any, Any], small: tuple[Any, Any]
) -> tuple[list[float], float]:
    """Open-loop probes every millisecond while the big copy runs, three times over."""
    sched = LinkScheduler("mem0", capacity=rate, chunk_bytes=chunk, mode=mode)
    lat: list[float] = []
    bigs: list[float] = []
    with Copier(sched) as copier:
        idle_latencies(copier, small, 20)  # warm the thread and the pages
        for rep in range(3):
            done = copier.submit(f"big{rep}", big[1], big[0], len(big[0]), flow="bulk")
            probes: list[Future[CopyResult]] = []
            while not done.done():
                probes.append(
                    copier.submit(f"s{rep}-{len(probes)}", small[1], small[0], SMALL, flow="small")
                )
                time.sleep(0.001)
            end = done.result().finished_at
            bigs.append(done.result().latency_s)
            # Only probes issued while the big copy was still running count.
            lat += [r.latency_s for r in (p.result() for p in probes) if r.submitted_at < end]
    return lat, percentile(bigs, 50)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big-mib", type=int, default=1024)
    args = parser.parse_args()
    big_size = args.big_mib * MiB
    shm = ShmBackend(prefix="gfaas-bench-")
    created: list[str] = []
    try:
        big = views(shm, big_size, created)
        small = views(shm, SMALL, created)
        rate = memcpy_rate(*big)
        with Copier(LinkScheduler("mem0", capacity=rate)) as copier:
            idle_latencies(copier, small, 20)
            idle = idle_latencies(copier, small)
        idle_p50 = percentile(idle, 50)
        runs: dict[str, list[float]] = {"idle": idle}
        rows: list[list[object]] = [
            [
                "idle",
                "-",
                len(idle),
                idle_p50 * 1e3,
                percentile(idle, 99) * 1e3,
                max(idle) * 1e3,
                1.0,
                "-",
                "-",
                "-",
            ]
        ]
        for mode, chunk in (
            (Mode.FIFO, 2 * MiB),
            (Mode.FAIR, MiB),
            (Mode.FAIR, 2 * MiB),
            (Mode.FAIR, 4 * MiB),
        ):
            lat, big_s = loaded(mode, chunk, rate, big, small)
            bound = 2 * idle_p50 + chunk / rate
            name = f"{mode.value} {chunk // MiB} MiB"
            runs[name] = lat
            p50, p99 = percentile(lat, 50), percentile(lat, 99)
            rows.append(
                [
                    mode.value,
                    chunk // MiB,
                    len(lat),
                    p50 * 1e3,
                    p99 * 1e3,
                    max(lat) * 1e3,
                    p50 / idle_p50,
                    bound * 1e3,
                    "yes" if p99 <= bound else "no",
                    big_s * 1e3,
                ]
            )
        print(
            f"machine: {machine()}; memcpy {rate / 1e9:.1f} GB/s; big transfer "
            f"{args.big_mib} MiB, probes {SMALL // MiB} MiB"
        )
        print(
            table(
                [
                    "mode",
                    "chunk MiB",
                    "probes",
                    "p50 ms",
                    "p99 ms",
                    "max ms",
                    "p50 / idle p50",
                    "goal ms (2x idle + chunk)",
                    "p99 within goal",
                    "big transfer ms",
                ],
                rows,
            )
        )
        plot(runs)
    finally:
        for name in created:
            shm.destroy_slab(name)


def plot(runs: dict[str, list[float]]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, lat in runs.items():
        xs = sorted(x * 1e3 for x in lat)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("1 MiB transfer latency (ms, log)")
    ax.set_ylabel("fraction of transfers")
    ax.set_title("1 MiB copies beside a big copy on one link")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / "dp_isolation.png", dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()

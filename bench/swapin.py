"""Time to a model's first result from each tier, per model size (issue 4).

    .venv/bin/python -m bench.swapin [--sizes 4,16,64,256] [--repeats 5]

A stack of Linear(1024, 1024) + ReLU layers with seeded weights (4 MiB per
layer), batch-1 forward, on this machine's CPU with the worker's thread count.
Every path ends with the first forward's output in hand:

* cold: the worker's miss path: object-store fetch (shared/modelstore.py) into
  an empty disk cache, publish into the host tier (shared memory), build from it
  (pipelined, as the worker does), forward;
* host tier: the model already in shared memory: build, copying every weight
  group before the forward (`instantiate(pipelined=False)`);
* pipelined: the same, but the forward starts at once and each layer waits
  only for its own group (`instantiate(pipelined=True)`);
* resident: the model already built on the device: forward only.

Median of `--repeats` runs (cold: fewer for big models, it is slow); ratios are
against cold in the same run. Writes docs/img/swapin.png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import nats
import torch
from torch import nn

from bench.plotting import pyplot, save
from shared.modelstore import ModelStore
from shared.modelswap import HostTier, instantiate, tier_prefix
from shared.natsd import nats_server

WIDTH = 1024
LAYER_MIB = WIDTH * (WIDTH + 1) * 4 / 2**20
PNG = Path("docs/img/swapin.png")
STAGES = ("cold", "host tier", "pipelined", "resident")


def mlp(layers: int) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        mods: list[nn.Module] = []
        for _ in range(layers):
            mods += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
        return nn.Sequential(*mods)

    return factory


def write_weights(path: Path, layers: int) -> int:
    torch.manual_seed(4)
    model = mlp(layers)()
    torch.save(model.state_dict(), path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model(x)
        return out


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0


async def cold_runs(
    store: ModelStore, name: str, factory: Callable[[], nn.Module], x: torch.Tensor, n: int
) -> list[float]:
    out = []
    for i in range(n):
        prefix = tier_prefix(f"gfaas-swapin-{os.getpid()}-c{i}")
        tier = HostTier(prefix)
        with tempfile.TemporaryDirectory() as cache:
            t = time.perf_counter()
            path = await store.fetch(name, Path(cache))
            host = tier.get_or_load(name, path.stem, lambda p=path: p)  # type: ignore[misc]
            model, _ = instantiate(factory, host, "cpu", pipelined=True)
            forward(model, x)
            out.append(time.perf_counter() - t)
        del model
        tier.purge()
    return out


def tier_runs(
    tier: HostTier,
    name: str,
    digest: str,
    factory: Callable[[], nn.Module],
    x: torch.Tensor,
    n: int,
    pipelined: bool,
) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        host = tier.cached(name, digest)
        assert host is not None
        model, _ = instantiate(factory, host, "cpu", pipelined=pipelined)
        forward(model, x)
        out.append(time.perf_counter() - t)
        del model
    return out


def resident_runs(model: nn.Module, x: torch.Tensor, n: int) -> list[float]:
    forward(model, x)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        forward(model, x)
        out.append(time.perf_counter() - t)
    return out


async def bench(url: str, work: Path, sizes: list[int], repeats: int) -> list[dict[str, float]]:
    nc = await nats.connect(url)
    store = await ModelStore.open(nc.jetstream())
    tier = HostTier(tier_prefix(f"gfaas-swapin-{os.getpid()}"))
    x = torch.randn(1, WIDTH)
    rows = []
    try:
        for mib in sizes:
            layers = max(round(mib / LAYER_MIB), 1)
            factory = mlp(layers)
            name = f"mlp-{mib}m"
            path = work / f"{name}.pt"
            nbytes = write_weights(path, layers)
            await store.push(name, path)
            cold = await cold_runs(store, name, factory, x, max(2, repeats // (1 + mib // 64)))
            local = await store.fetch(name, work / "cache")
            digest = local.stem
            tier.get_or_load(name, digest, lambda p=local: p)  # type: ignore[misc]
            unpiped = tier_runs(tier, name, digest, factory, x, repeats, pipelined=False)
            piped = tier_runs(tier, name, digest, factory, x, repeats, pipelined=True)
            host = tier.cached(name, digest)
            assert host is not None
            model, _ = instantiate(factory, host, "cpu", pipelined=False)
            warm = resident_runs(model, x, repeats * 4)
            row = {
                "MiB": nbytes / 2**20,
                "cold": median_ms(cold),
                "host tier": median_ms(unpiped),
                "pipelined": median_ms(piped),
                "resident": median_ms(warm),
            }
            rows.append(row)
            print_row(row, len(cold), repeats)
            del model
            tier.evict(name, digest)
    finally:
        tier.purge()
        await nc.drain()
    return rows


def print_header() -> None:
    print(
        f"{'weights MiB':>11} {'cold ms':>9} {'host tier ms':>13} {'pipelined ms':>13}"
        f" {'resident ms':>12} {'host/cold':>10} {'piped/cold':>11} {'resident/cold':>14}"
        f" {'piped/host':>11}  runs"
    )


def print_row(row: dict[str, float], cold_n: int, n: int) -> None:
    cold = row["cold"]
    print(
        f"{row['MiB']:>11.1f} {cold:>9.1f} {row['host tier']:>13.2f} {row['pipelined']:>13.2f}"
        f" {row['resident']:>12.3f} {row['host tier'] / cold:>10.3f}"
        f" {row['pipelined'] / cold:>11.3f} {row['resident'] / cold:>14.4f}"
        f" {row['pipelined'] / row['host tier']:>11.2f}  cold {cold_n}, others {n}",
        flush=True,
    )


def plot(rows: list[dict[str, float]]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = [r["MiB"] for r in rows]
    for stage in STAGES:
        ax.plot(sizes, [r[stage] for r in rows], marker="o", label=stage)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="model weights (MiB)",
        ylabel="time to first result (ms)",
        title="Swap-in by tier (CPU, batch-1 MLP forward)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save(fig, PNG)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="4,16,64,256", help="MiB of weights, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (worker default)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"torch {torch.__version__}, {args.threads} torch thread(s)"
    )
    print_header()
    with tempfile.TemporaryDirectory() as tmp, nats_server(Path(tmp) / "nats") as server:
        rows = anyio.run(bench, server.url, Path(tmp), sizes, args.repeats)
    print()
    plot(rows)


if __name__ == "__main__":
    main()

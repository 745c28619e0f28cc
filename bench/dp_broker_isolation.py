"""Isolation through the memory-broker service: 1 MiB copies beside a 1 GiB copy.

    .venv/bin/python -m bench.dp_broker_isolation [--big-mib 1024] [--runs 3]

The library-level `bench.dp_isolation` drives the copier in-process; here every copy
is a `copy` request to a real broker process over NATS (`BrokerClient.copy`): the
broker leases the destination, chunks the copy through its link scheduler, and
answers when it is done. Per mode (the broker's `GFAAS_LINK_MODE`, fair or fifo), a
fresh broker: first 1 MiB copies one after another on an idle link (the baseline),
then `--runs` times a big copy with 1 MiB copies issued every 2 ms beside it (each
probe's latency is request to answer). Goal (issue 3): with sharing, a probe beside
the big copy within 2x its idle latency plus one chunk time.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import nats
from nats.aio.client import Client as NATS

from bench.dp_common import MiB, machine, percentile, table
from shared.dataplane.backend import tensor_from_handle
from shared.dataplane.client import BrokerClient
from shared.errors import GfaasError
from shared.natsd import nats_server
from shared.schema import DEFAULT_TENANT, CopyRequest, Handle

NODE = "bench"
CHUNK_KB = 2048
PROBE_EVERY_S = 0.002


async def wait_for(broker: BrokerClient) -> None:
    with anyio.fail_after(30):
        while True:
            try:
                (h,) = await broker.lease([1], owner="bench")
                await broker.release([h], "bench", DEFAULT_TENANT)
                return
            except GfaasError:
                await anyio.sleep(0.1)


async def copy_once(broker: BrokerClient, source: Handle) -> float:
    started = time.perf_counter()
    copy = await broker.copy(CopyRequest(source=source, device="cpu", owner="bench"), "default")
    elapsed = time.perf_counter() - started
    await broker.release([copy], "bench", DEFAULT_TENANT, wait=False)
    return elapsed


async def measure(url: str, big_mib: int, runs: int) -> dict[str, list[float]]:
    nc: NATS = await nats.connect(url)
    broker = BrokerClient(nc, NODE, timeout=120.0)
    await wait_for(broker)
    big, small = await broker.lease([big_mib * MiB, MiB], owner="bench")
    for h in (big, small):
        tensor_from_handle(h, "uint8", [h.nbytes]).fill_(1)  # touch every page once
    for _ in range(3):  # warm the copier thread and the destination slabs
        await copy_once(broker, small)
    await copy_once(broker, big)
    out: dict[str, list[float]] = {"idle": [], "busy": [], "big": []}
    for _ in range(200):
        out["idle"].append(await copy_once(broker, small))

    async def run_big(done: anyio.Event) -> None:
        out["big"].append(await copy_once(broker, big))
        done.set()

    for _ in range(runs):
        done = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_big, done)
            await anyio.sleep(0.01)  # the big copy has started
            while not done.is_set():
                out["busy"].append(await copy_once(broker, small))
                await anyio.sleep(PROBE_EVERY_S)
        await anyio.sleep(0.2)
    await broker.release([big, small], "bench", DEFAULT_TENANT)
    await nc.drain()
    return out


def run_mode(url: str, tmp: Path, mode: str, big_mib: int, runs: int) -> dict[str, list[float]]:
    env = dict(os.environ)
    env.update(
        GFAAS_NATS_URL=url,
        GFAAS_NODE=NODE,
        GFAAS_STATE_DIR=str(tmp / mode),
        GFAAS_LOG_LEVEL="warning",
        GFAAS_METRICS_PORT="0",  # 8004 may be taken (another broker, a platform)
        GFAAS_SHM_NAMESPACE=f"gfaas-bench-{secrets.token_hex(4)}",
        GFAAS_LINK_MODE=mode,
        GFAAS_COPY_CHUNK_KB=str(CHUNK_KB),
        GFAAS_POOL_CAP_MB=str(3 * big_mib + 256),
    )
    broker = subprocess.Popen([sys.executable, "-m", "services.memory_broker"], env=env)
    try:
        return anyio.run(measure, url, big_mib, runs)
    finally:
        broker.terminate()
        broker.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}; broker copies, chunks {CHUNK_KB // 1024} MiB")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, nats_server(Path(tmp) / "nats") as server:
        for mode in ("fair", "fifo"):
            r = run_mode(server.url, Path(tmp), mode, args.big_mib, args.runs)
            idle = percentile(r["idle"], 50) * 1e3
            chunk_ms = CHUNK_KB / 1024 * MiB / (args.big_mib * MiB / (min(r["big"]) or 1)) * 1e3
            goal = 2 * idle + chunk_ms
            busy50, busy99 = percentile(r["busy"], 50) * 1e3, percentile(r["busy"], 99) * 1e3
            rows.append(
                [
                    mode,
                    len(r["busy"]),
                    idle,
                    busy50,
                    busy99,
                    busy50 / idle,
                    goal,
                    "yes" if busy99 <= goal else "no",
                    percentile(r["big"], 50) * 1e3,
                ]
            )
    print(
        table(
            [
                "mode",
                "probes beside",
                "idle p50 ms",
                "beside p50 ms",
                "beside p99 ms",
                "p50 / idle",
                "goal ms (2x idle + chunk)",
                "p99 within goal",
                f"{args.big_mib} MiB copy ms",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()

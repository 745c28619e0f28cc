"""End to end: CPU preprocess -> conv model -> conv model -> CPU postprocess.

    .venv/bin/python -m bench.workflow_e2e [--requests 40] [--concurrency 8]

One platform, one run: a nats-server with max_payload 64 MiB and every service as
its own OS process (gfaas.supervisor.Supervisor, as `gfaas up` runs them: ingress,
scheduler, memory broker, one CPU worker). The functions are bench.workflow_funcs
(512x512 image: pixels 3 MiB, feature maps 8 MiB each, a 32-byte result). Two ways:

- workflow: one invocation of the deployed WorkflowSpec; ingress runs the four
  stages through the scheduler and the intermediates go by handle (each handler
  writes into its pre-leased output buffer).
- payloads: the client calls the four functions itself, every tensor by value
  through NATS (image and intermediates to the platform and back).

Both check their result against each other. Sequential latency (the two
alternate request by request), then throughput with `--concurrency` callers
(alternating blocks). Prints p50/p99, requests/s and the ratios.
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from bench.dp_common import MiB, machine, percentile, table
from bench.workflow_funcs import (
    SIDE,
    WORKFLOW,
    ConvModel,
    ConvModel2,
    postprocess,
    preprocess,
    specs,
)
from gfaas.client import Client
from gfaas.supervisor import Supervisor
from shared.config import Settings
from shared.function import LoadContext
from shared.natsd import nats_server

MAX_PAYLOAD = 64 * MiB
Call = Callable[[np.ndarray[Any, Any]], Awaitable[np.ndarray[Any, Any]]]


async def deploy(client: Client, concurrency: int) -> None:
    for spec in specs(concurrency):
        await client.deploy(spec)
    await client.deploy(WORKFLOW)


def paths(client: Client) -> dict[str, Call]:
    async def workflow(image: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return (await client.invoke(WORKFLOW.name, {"image": image}))["scores"]

    async def payloads(image: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        pixels = (await client.invoke("e2e-pre", {"image": image}))["pixels"]
        f1 = (await client.invoke("e2e-conv1", {"x": pixels}))["y"]
        f2 = (await client.invoke("e2e-conv2", {"x": f1}))["y"]
        return (await client.invoke("e2e-post", {"x": f2}))["scores"]

    return {"workflow (intermediates by handle)": workflow, "payloads (client, by value)": payloads}


async def ready(calls: dict[str, Call], image: np.ndarray[Any, Any]) -> None:
    with anyio.fail_after(120):
        while True:
            try:
                results = [await call(image) for call in calls.values()]
                np.testing.assert_allclose(results[0], results[1], rtol=1e-5)
                return
            except AssertionError:
                raise
            except Exception:  # deploys still propagating, handlers being built
                await anyio.sleep(0.5)


async def run(url: str, requests: int, concurrency: int) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8) for _ in range(8)]
    async with Client.connect(url, timeout=120.0) as client:
        await deploy(client, concurrency)
        calls = paths(client)
        await ready(calls, images[0])
        for _ in range(5):  # warm-up: handlers built, pools grown, mappings cached
            for call in calls.values():
                await call(images[0])

        seq: dict[str, list[float]] = {name: [] for name in calls}
        for i in range(requests):
            for name, call in calls.items():
                t = time.perf_counter()
                await call(images[i % len(images)])
                seq[name].append((time.perf_counter() - t) * 1000.0)

        conc: dict[str, list[float]] = {name: [] for name in calls}
        elapsed: dict[str, float] = dict.fromkeys(calls, 0.0)
        block = max(concurrency * 4, requests // 2)
        for _ in range(2):  # two alternating blocks each
            for name, call in calls.items():
                left = block

                async def caller(call: Call = call, name: str = name) -> None:
                    nonlocal left
                    while left > 0:
                        left -= 1
                        t = time.perf_counter()
                        await call(images[left % len(images)])
                        conc[name].append((time.perf_counter() - t) * 1000.0)

                started = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for _ in range(concurrency):
                        tg.start_soon(caller)
                elapsed[name] += time.perf_counter() - started

    return {
        name: {
            "seq_n": len(seq[name]),
            "seq_p50": percentile(seq[name], 50),
            "seq_p99": percentile(seq[name], 99),
            "conc_n": len(conc[name]),
            "conc_p50": percentile(conc[name], 50),
            "conc_p99": percentile(conc[name], 99),
            "rps": len(conc[name]) / elapsed[name],
        }
        for name in calls
    }


def compute_only(requests: int) -> dict[str, float]:
    """The four handlers called in this process, one after another: no platform."""
    import torch

    torch.set_num_threads(1)
    by_name = {s.name: s for s in specs(1)}
    conv1 = ConvModel(LoadContext(spec=by_name["e2e-conv1"], device="cpu"))
    conv2 = ConvModel2(LoadContext(spec=by_name["e2e-conv2"], device="cpu"))
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8))
    took: list[float] = []
    for i in range(requests + 5):
        t = time.perf_counter()
        pixels = preprocess({"image": image})["pixels"]
        f1 = conv1({"x": pixels})["y"]
        f2 = conv2({"x": f1})["y"]
        postprocess({"x": f2})
        if i >= 5:
            took.append((time.perf_counter() - t) * 1000.0)
    return {"seq_n": len(took), "seq_p50": percentile(took, 50), "seq_p99": percentile(took, 99)}


def report(
    results: dict[str, dict[str, float]], compute: dict[str, float], concurrency: int
) -> None:
    base = results["workflow (intermediates by handle)"]
    headers = [
        "path",
        "sequential n",
        "p50 ms",
        "p99 ms",
        f"conc {concurrency} n",
        "p50 ms ",
        "p99 ms ",
        "req/s",
        "seq p50 / workflow",
        "req/s / workflow",
    ]
    rows = [
        [
            name,
            int(r["seq_n"]),
            r["seq_p50"],
            r["seq_p99"],
            int(r["conc_n"]),
            r["conc_p50"],
            r["conc_p99"],
            r["rps"],
            r["seq_p50"] / base["seq_p50"],
            r["rps"] / base["rps"],
        ]
        for name, r in results.items()
    ]
    rows.append(
        [
            "compute only (4 handlers in one process)",
            int(compute["seq_n"]),
            compute["seq_p50"],
            compute["seq_p99"],
            "-",
            "-",
            "-",
            "-",
            compute["seq_p50"] / base["seq_p50"],
            "-",
        ]
    )
    print(table(headers, rows))
    over = base["seq_p50"] - compute["seq_p50"]
    print(
        f"workflow p50 minus compute-only p50: {over:.1f} ms for 4 stages through "
        "ingress, scheduler, worker and broker"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    print(
        f"machine: {machine()}; platform: separate processes (Supervisor), 1 CPU worker "
        f"(torch threads 1), nats max_payload {MAX_PAYLOAD // MiB} MiB; "
        f"image {SIDE}x{SIDE}x3 uint8, pixels 3 MiB, feature maps 8 MiB"
    )
    with (
        tempfile.TemporaryDirectory() as tmp,
        nats_server(Path(tmp) / "nats", max_payload=MAX_PAYLOAD) as server,
    ):
        settings = Settings(
            nats_url=server.url,
            state_dir=Path(tmp) / "state",
            http_enabled=False,
            log_level="warning",
            max_payload=MAX_PAYLOAD,
            capacity=64,
            metrics_port=0,  # any free ports: the defaults may be taken (a platform beside)
        )
        # The children read these from the environment (service_env copies it).
        os.environ["GFAAS_HTTP_ENABLED"] = "0"
        os.environ["GFAAS_CAPACITY"] = "64"
        os.environ["GFAAS_SHM_NAMESPACE"] = f"gfaas-bench-{secrets.token_hex(4)}"
        sup = Supervisor(settings=settings, nats_url=server.url, workers=1)
        sup.start()
        try:
            results = anyio.run(run, server.url, args.requests, args.concurrency)
        finally:
            sup.stop()
    report(results, compute_only(args.requests), args.concurrency)


if __name__ == "__main__":
    main()

"""Platform overhead: a no-op function through the full sync path vs a bare NATS round trip.

    python -m bench.overhead [--requests 3000] [--concurrency 64] [--no-ray]
    python -m bench.overhead --telemetry [--rounds 2] [--requests 3000]

Same run, same machine: (1) bare nats-py request-reply to a responder process that
echoes the payload, (2) gfaas as deployed: client -> ingress -> worker -> client
once the scheduler has lent ingress slots for the warm function (the first call
goes through the scheduler), all services as separate processes, one worker,
(3) the same with grants off, every call client -> ingress -> scheduler -> worker
-> client, (4) Ray Serve no-op deployment (handle and HTTP) when `ray[serve]` is
installed. Prints p50/p99 latency and throughput, with ratios against the bare
round trip.

With --telemetry it measures instead what metrics and tracing add to the full sync
path, in the same run: the platform with both off (`metrics_enabled` False, no span
exporter) and with both on (every service's Prometheus endpoint, and spans written to
span files as `gfaas up` does without a collector), alternated for `--rounds`, and
prints the added p50.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import numpy as np

from gfaas.client import Client
from gfaas.supervisor import Supervisor
from shared import tracing
from shared.config import Settings
from shared.natsd import nats_server
from shared.schema import FunctionSpec

NOOP = FunctionSpec(name="noop", handler="examples.noop:noop", concurrency=64)
BODY = msgspec.msgpack.encode(
    {"inputs": [{"name": "x", "dtype": "float32", "shape": [1], "data": b"\x00" * 4}]}
)
ECHO_RESPONDER = textwrap.dedent(
    """
    import asyncio, sys, nats
    async def main():
        nc = await nats.connect(sys.argv[1])
        async def echo(msg):
            await msg.respond(msg.data)
        await nc.subscribe("bench.echo", cb=echo)
        await nc.flush()
        print("ready", flush=True)
        await asyncio.Event().wait()
    asyncio.run(main())
    """
)


@dataclass
class Result:
    name: str
    p50_ms: float
    p99_ms: float
    rps: float


async def measure(
    name: str, call: Callable[[], Awaitable[Any]], requests: int, concurrency: int
) -> tuple[Result, Result]:
    for _ in range(200):  # warm-up: connections, caches, JIT-free but lazy imports
        await call()
    seq: list[float] = []
    started = time.perf_counter()
    for _ in range(requests):
        t = time.perf_counter()
        await call()
        seq.append(time.perf_counter() - t)
    seq_elapsed = time.perf_counter() - started

    conc: list[float] = []
    remaining = requests * 3

    async def loop() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t = time.perf_counter()
            await call()
            conc.append(time.perf_counter() - t)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(loop)
    conc_elapsed = time.perf_counter() - started

    def summarise(label: str, lat: list[float], elapsed: float) -> Result:
        arr = np.array(lat) * 1000
        return Result(
            label, float(np.percentile(arr, 50)), float(np.percentile(arr, 99)), len(lat) / elapsed
        )

    return (
        summarise(f"{name} (sequential)", seq, seq_elapsed),
        summarise(f"{name} (concurrency {concurrency})", conc, conc_elapsed),
    )


async def bench_bare(url: str, requests: int, concurrency: int) -> list[Result]:
    proc = subprocess.Popen(
        [sys.executable, "-c", ECHO_RESPONDER, url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        nc = await nats.connect(url)

        async def bare() -> None:
            await nc.request("bench.echo", BODY, timeout=10)

        results = list(await measure("bare nats request-reply", bare, requests, concurrency))
        await nc.drain()
        return results
    finally:
        proc.terminate()
        proc.wait()


async def bench_gfaas(url: str, name: str, requests: int, concurrency: int) -> list[Result]:
    nc = await nats.connect(url)

    async def full() -> None:
        msg = await nc.request("gfaas.v1.invoke.noop", BODY, timeout=10)
        if msg.headers and msg.headers.get("Gfaas-Status") != "ok":
            raise RuntimeError(msgspec.msgpack.decode(msg.data))

    results = list(await measure(name, full, requests, concurrency))
    status = await nc.request("gfaas.v1.status.ingress", b"", timeout=5)
    direct = msgspec.msgpack.decode(status.data)["details"]["direct"]["sent"]
    print(f"{name}: {direct} of the invocations went straight to the worker")
    await nc.drain()
    return results


# (row name, grant TTL): as deployed, and with every call through the scheduler.
VARIANTS = (("gfaas full sync path", 2.0), ("gfaas via scheduler (grants off)", 0.0))


def bench_platform(url: str, tmp: Path, requests: int, concurrency: int) -> list[Result]:
    results: list[Result] = []
    for name, ttl in VARIANTS:
        settings = Settings(
            nats_url=url,
            state_dir=tmp / f"state-{ttl}",
            http_enabled=False,
            log_level="warning",
            capacity=256,
            grant_ttl_s=ttl,
            metrics_port=0,  # any free ports: the defaults may be taken (a platform beside)
        )
        os.environ.update(GFAAS_HTTP_ENABLED="0", GFAAS_CAPACITY="256", GFAAS_GRANT_TTL_S=str(ttl))
        sup = Supervisor(settings=settings, nats_url=url, workers=1)
        sup.start()
        try:
            anyio.run(prepare_gfaas, url)
            results += anyio.run(bench_gfaas, url, name, requests, concurrency)
        finally:
            sup.stop()
    return results


async def prepare_gfaas(url: str) -> None:
    async with Client.connect(url) as client:
        await client.deploy(NOOP)
        with anyio.fail_after(90):
            while True:
                try:
                    reply = await client.invoke_reply("noop", {"x": np.zeros(1, np.float32)})
                    if reply.error is None:
                        return
                except Exception:
                    pass
                await anyio.sleep(0.25)


# (row name, metrics on, tracing on): off and on first, then each alone.
TELEMETRY = (
    ("telemetry off", False, False),
    ("telemetry on (metrics + span files)", True, True),
    ("metrics only", True, False),
    ("tracing only (span files)", False, True),
)


def bench_telemetry(
    url: str, tmp: Path, requests: int, concurrency: int, rounds: int
) -> dict[str, list[Result]]:
    """The full sync path with metrics and tracing off, then on, `rounds` times over;
    results by variant name, one (sequential, concurrent) pair per round."""
    found: dict[str, list[Result]] = {name: [] for name, _, _ in TELEMETRY}
    for r in range(rounds):
        for i, (name, metrics, traced) in enumerate(TELEMETRY):
            state = tmp / f"state-telemetry-{r}-{i}"
            settings = Settings(
                nats_url=url,
                state_dir=state,
                http_enabled=False,
                log_level="warning",
                capacity=256,
                metrics_enabled=metrics,
                metrics_port=0,
            )
            os.environ.update(
                GFAAS_HTTP_ENABLED="0",
                GFAAS_CAPACITY="256",
                GFAAS_GRANT_TTL_S="2.0",
                GFAAS_METRICS_PORT="0",
                # On: spans to files, as `gfaas up` without a collector; off: none.
                GFAAS_TRACE_DIR=str(tracing.trace_dir(state)) if traced else "",
                OTEL_EXPORTER_OTLP_ENDPOINT="",
            )
            sup = Supervisor(settings=settings, nats_url=url, workers=1)
            sup.start()
            try:
                anyio.run(prepare_gfaas, url)
                found[name] += anyio.run(bench_gfaas, url, name, requests, concurrency)
            finally:
                sup.stop()
            if traced:
                spans = len(tracing.read_spans(tracing.trace_dir(state)))
                print(f"{name}, round {r + 1}: {spans} spans written")
    return found


def print_telemetry(found: dict[str, list[Result]]) -> None:
    off_name = TELEMETRY[0][0]
    print(f"\n{'variant':50} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9}")
    for results in found.values():
        for r in results:
            print(f"{r.name:50} {r.p50_ms:8.3f} {r.p99_ms:8.3f} {r.rps:9.0f}")
    for on_name, _, _ in TELEMETRY[1:]:
        for kind in ("sequential", "concurrency"):
            off = [r.p50_ms for r in found[off_name] if kind in r.name]
            on = [r.p50_ms for r in found[on_name] if kind in r.name]
            base, with_ = float(np.median(off)), float(np.median(on))
            print(
                f"{on_name}: added p50 ({kind}) {with_ - base:+.3f} ms "
                f"({(with_ / base - 1) * 100:+.1f}%), median of {len(off)} rounds: "
                f"off {base:.3f} ms, on {with_:.3f} ms"
            )


def bench_ray(requests: int, concurrency: int) -> list[Result]:
    try:
        import ray
        from ray import serve
    except ImportError:
        print("ray[serve] not installed: skipping the Ray Serve comparison")
        return []
    import httpx

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @serve.deployment(max_ongoing_requests=concurrency)
    class NoOp:
        async def __call__(self, request: Any = None) -> bytes:
            return b"ok"

    handle = serve.run(NoOp.bind(), route_prefix="/noop")  # type: ignore[attr-defined]

    async def via_handle() -> None:
        await handle.remote()

    async def run_all() -> list[Result]:
        results = list(await measure("ray serve handle", via_handle, requests, concurrency))
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as http:

            async def via_http() -> None:
                r = await http.post("http://127.0.0.1:8000/noop", content=BODY)
                r.raise_for_status()

            results += await measure("ray serve http", via_http, requests // 2, concurrency)
        return results

    try:
        return anyio.run(run_all)
    finally:
        serve.shutdown()
        ray.shutdown()


def print_table(results: list[Result], baseline: dict[str, Result]) -> None:
    print(f"\n{'path':50} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9}  vs bare p50  vs bare req/s")
    for r in results:
        base = baseline["sequential" if "sequential" in r.name else "concurrent"]
        print(
            f"{r.name:50} {r.p50_ms:8.3f} {r.p99_ms:8.3f} {r.rps:9.0f}"
            f"  {r.p50_ms / base.p50_ms:10.2f}x  {r.rps / base.rps:11.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument(
        "--telemetry", action="store_true", help="metrics and tracing on vs off, instead"
    )
    parser.add_argument("--rounds", type=int, default=2, help="--telemetry: off/on rounds")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cpus, python {sys.version.split()[0]}")
    if args.telemetry:
        with tempfile.TemporaryDirectory() as tmp, nats_server(Path(tmp) / "nats") as server:
            found = bench_telemetry(
                server.url, Path(tmp), args.requests, args.concurrency, args.rounds
            )
        print_telemetry(found)
        return
    with tempfile.TemporaryDirectory() as tmp, nats_server(Path(tmp) / "nats") as server:
        results = anyio.run(bench_bare, server.url, args.requests, args.concurrency)
        results += bench_platform(server.url, Path(tmp), args.requests, args.concurrency)
    baseline = {"sequential": results[0], "concurrent": results[1]}
    if not args.no_ray:
        results += bench_ray(args.requests, args.concurrency)
    print_table(results, baseline)
    by_name = {r.name: r for r in results}
    gfaas_seq = by_name["gfaas full sync path (sequential)"]
    gfaas_conc = by_name[f"gfaas full sync path (concurrency {args.concurrency})"]
    for peer in ("ray serve handle", "ray serve http"):
        seq = by_name.get(f"{peer} (sequential)")
        conc = by_name.get(f"{peer} (concurrency {args.concurrency})")
        if seq and conc:
            print(
                f"gfaas vs {peer}: p50 {seq.p50_ms / gfaas_seq.p50_ms:.1f}x lower, "
                f"throughput {gfaas_conc.rps / conc.rps:.1f}x higher"
            )


if __name__ == "__main__":
    main()

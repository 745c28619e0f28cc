"""Stage-to-stage handoff of an intermediate tensor: by handle, by value, host staging.

    .venv/bin/python -m bench.dp_handoff [--quick]

Three processes beside a real nats-server (max_payload 64 MiB, max_pending 256 MiB):
the memory broker (`python -m services.memory_broker`), a producer (this process)
and a consumer (this module with `--consumer`). Per size, the four ways alternate
rep by rep, so all see the same machine noise; each rep starts with a 20 ms pause
so the previous rep's big transfers (server GC, freed pages) are done, then one
untimed tiny request wakes the consumer, then the bare round trip and the handoff
run back to back:

- bare: a 100-byte NATS request-reply to the consumer (the baseline).
- by handle: the producer leases a float32 buffer from the broker (timed apart:
  "lease"), its compute fills the view in place (not timed), then the timed
  handoff: the msgpack Handle in a request to the consumer, which verifies it as a
  worker does (on the node's lease board; a handle the board cannot vouch for would
  go to the broker), views it as a tensor through its cached mapping and reads the first 256
  elements and the last one, and replies. The producer then releases (timed apart).
- by value: the producer serialises its output tensor (`.numpy().tobytes()`) and
  sends the raw bytes as the request (no envelope, so exactly 64 MiB still fits);
  the consumer views the message bytes as a tensor and reads the same elements.
  Sizes over the server's max_payload are not sent.
- host staging: the producer writes its tensor into a fresh file in /dev/shm (one
  per transfer) and sends the path; the consumer reads the file into a fresh tensor
  of its own, unlinks it, reads the same elements, and replies.

Prints p50/p99 per size and the ratios; writes docs/img/dp_handoff.png.
Goals: by handle within 2x the bare round trip at every size; by handle >= 200x
faster than by value at 64 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import nats
import numpy as np
import torch
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from bench.dp_common import IMG, MiB, machine, percentile, table
from shared.dataplane.backend import tensor_from_handle
from shared.dataplane.board import board_name
from shared.dataplane.client import BrokerClient
from shared.natsd import nats_server
from shared.schema import DEFAULT_TENANT, Handle, decode, encode

KiB = 1 << 10
SIZES = (64 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB)
MAX_PAYLOAD = 64 * MiB
TOUCH = 256  # elements read at the front of the tensor, plus the last one
TINY = b"x" * 100
SETTLE_S = 0.02
NODE = "local"
OWNER = "bench-producer"
TIMING = struct.Struct("<ddd")  # check s, view s, checksum


def reps_for(size: int, quick: bool) -> int:
    reps = 200 if size <= 4 * MiB else 60 if size <= 16 * MiB else 20
    return max(5, reps // 5) if quick else reps


def touch(view: torch.Tensor) -> float:
    return float(view[:TOUCH].sum()) + float(view[-1])


# -- the consumer (another process) ----------------------------------------------------


def copy_out(path: str, count: int) -> torch.Tensor:
    """Host staging's consumer side: the staged file into a fresh tensor of its own."""
    own = torch.empty(count, dtype=torch.float32)
    buf = memoryview(own.numpy()).cast("B")
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < len(buf):
            n = f.readinto(buf[got:])
            if not n:
                raise RuntimeError(f"{path}: short read {got}/{len(buf)}")
            got += n
    os.unlink(path)
    return own


async def consumer(url: str) -> None:
    nc = await nats.connect(url, name="bench-consumer", max_outstanding_pings=10)
    namespace = os.environ["GFAAS_SHM_NAMESPACE"]
    broker = BrokerClient(nc, NODE, board=board_name(namespace, NODE))

    async def on_echo(msg: Msg) -> None:
        await msg.respond(b"")

    async def on_handle(msg: Msg) -> None:
        t0 = time.perf_counter()
        handle = decode(msg.data, Handle)
        await broker.check([handle], DEFAULT_TENANT)
        t1 = time.perf_counter()
        view = tensor_from_handle(handle, "float32", [handle.nbytes // 4])
        value = touch(view)
        t2 = time.perf_counter()
        await msg.respond(TIMING.pack(t1 - t0, t2 - t1, value))

    async def on_value(msg: Msg) -> None:
        with warnings.catch_warnings():
            # A read-only view of the message is what "by value" means here: the
            # consumer only reads it, so torch's non-writable warning does not apply.
            warnings.simplefilter("ignore", UserWarning)
            view = torch.from_numpy(np.frombuffer(msg.data, dtype=np.float32))
        await msg.respond(TIMING.pack(0.0, 0.0, touch(view)))

    async def on_stage(msg: Msg) -> None:
        path, _, count = msg.data.decode().partition("|")
        own = copy_out(path, int(count))
        await msg.respond(TIMING.pack(0.0, 0.0, touch(own)))

    limit = 4 * MAX_PAYLOAD
    await nc.subscribe("bench.echo", cb=on_echo)
    await nc.subscribe("bench.handle", cb=on_handle)
    await nc.subscribe("bench.value", cb=on_value, pending_bytes_limit=limit)
    await nc.subscribe("bench.stage", cb=on_stage)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


# -- the producer (this process) -------------------------------------------------------


async def timed(call: Callable[[], Awaitable[bytes]]) -> tuple[float, bytes]:
    t = time.perf_counter()
    data = await call()
    return time.perf_counter() - t, data


async def wait_for_broker(broker: BrokerClient) -> None:
    with anyio.fail_after(60):
        while True:
            try:
                handles = await broker.lease([1], owner=OWNER)
                await broker.release(handles, OWNER, DEFAULT_TENANT)
                return
            except Exception:
                await anyio.sleep(0.2)


class Stats:
    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}

    def add(self, key: str, seconds: float) -> None:
        self.samples.setdefault(key, []).append(seconds * 1000.0)

    def p(self, key: str, q: float) -> float:
        return percentile(self.samples.get(key, []), q)


async def measure_size(
    nc: NATS, broker: BrokerClient, size: int, reps: int, stage_dir: Path
) -> Stats:
    count = size // 4
    src = torch.arange(count, dtype=torch.float32)  # the producer's output, by value/staging
    expected = float(src[:TOUCH].sum()) + float(src[-1])
    stats = Stats()
    over = size > MAX_PAYLOAD

    async def request(subject: str, body: bytes) -> bytes:
        msg = await nc.request(subject, body, timeout=60)
        return msg.data

    for rep in range(reps + 2):  # two warm-up rounds: mappings, slabs, first faults
        keep = rep >= 2

        t = time.perf_counter()
        (handle,) = await broker.lease([size], owner=OWNER)
        lease_s = time.perf_counter() - t
        view = tensor_from_handle(handle, "float32", [count])
        view.copy_(src)  # the producer's compute writing its output in place: not timed
        body = encode(handle)
        # Let the previous rep's big transfers settle (the server's GC, freed pages),
        # so the bare round trip and the handoff both start from a quiet machine.
        await anyio.sleep(SETTLE_S)
        await request("bench.echo", TINY)  # wake the consumer after the pause: not timed

        took, _ = await timed(lambda: request("bench.echo", TINY))
        if keep:
            stats.add("bare", took)

        took, data = await timed(lambda: request("bench.handle", body))  # noqa: B023
        check_s, view_s, value = TIMING.unpack(data)
        assert value == expected, (value, expected)
        del view
        t = time.perf_counter()
        await broker.release([handle], OWNER, DEFAULT_TENANT)
        release_s = time.perf_counter() - t
        if keep:
            stats.add("lease", lease_s)
            stats.add("handle", took)
            stats.add("release", release_s)
            stats.add("check", check_s)
            stats.add("view", view_s)

        if not over:

            async def by_value() -> bytes:
                return await request("bench.value", src.numpy().tobytes())

            took, data = await timed(by_value)
            assert TIMING.unpack(data)[2] == expected
            if keep:
                stats.add("value", took)

        path = stage_dir / f"gfaas-bench-stage-{os.getpid()}-{secrets.token_hex(4)}"

        async def staged() -> bytes:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)  # noqa: B023
            try:
                out = memoryview(src.numpy()).cast("B")
                done = 0
                while done < len(out):
                    done += os.write(fd, out[done:])
            finally:
                os.close(fd)
            return await request("bench.stage", f"{path}|{count}".encode())  # noqa: B023

        took, data = await timed(staged)
        assert TIMING.unpack(data)[2] == expected
        if keep:
            stats.add("staging", took)
    return stats


async def producer(url: str, quick: bool) -> list[tuple[int, Stats]]:
    nc = await nats.connect(url, name="bench-producer", max_outstanding_pings=10)
    broker = BrokerClient(nc, NODE, timeout=30.0)
    await wait_for_broker(broker)
    results: list[tuple[int, Stats]] = []
    stage_dir = Path("/dev/shm")
    for size in SIZES:
        stats = await measure_size(nc, broker, size, reps_for(size, quick), stage_dir)
        results.append((size, stats))
        print(f"  {label(size)}: {len(stats.samples['handle'])} reps done", flush=True)
    await nc.drain()
    return results


def label(size: int) -> str:
    return f"{size // KiB} KiB" if size < MiB else f"{size // MiB} MiB"


def ratio(a: float, b: float) -> str:
    return "n/a" if np.isnan(a) or np.isnan(b) else f"{a / b:.3g}"


def ms(stats: Stats, key: str, q: float) -> object:
    value = stats.p(key, q)
    return "n/a (over NATS max_payload)" if np.isnan(value) else value


def report(results: list[tuple[int, Stats]]) -> None:
    headers = [
        "size",
        "reps",
        "bare p50 ms",
        "bare p99 ms",
        "handle p50 ms",
        "handle p99 ms",
        "value p50 ms",
        "value p99 ms",
        "staging p50 ms",
        "staging p99 ms",
        "handle / bare (p50)",
        "value / handle (p50)",
        "staging / handle (p50)",
    ]
    rows: list[list[object]] = []
    for size, s in results:
        rows.append(
            [
                label(size),
                len(s.samples["handle"]),
                s.p("bare", 50),
                s.p("bare", 99),
                s.p("handle", 50),
                s.p("handle", 99),
                ms(s, "value", 50),
                ms(s, "value", 99),
                s.p("staging", 50),
                s.p("staging", 99),
                ratio(s.p("handle", 50), s.p("bare", 50)),
                ratio(s.p("value", 50), s.p("handle", 50)),
                ratio(s.p("staging", 50), s.p("handle", 50)),
            ]
        )
    print(table(headers, rows))
    print("\nby handle, apart from the handoff (producer side, and inside the consumer):")
    parts = [
        "size",
        "lease p50 ms",
        "lease p99 ms",
        "release p50 ms",
        "consumer check p50 ms",
        "consumer map+view+touch p50 ms",
    ]
    print(
        table(
            parts,
            [
                [
                    label(size),
                    s.p("lease", 50),
                    s.p("lease", 99),
                    s.p("release", 50),
                    s.p("check", 50),
                    s.p("view", 50),
                ]
                for size, s in results
            ],
        )
    )
    within = all(s.p("handle", 50) <= 2 * s.p("bare", 50) for _, s in results)
    within99 = all(s.p("handle", 99) <= 2 * s.p("bare", 99) for _, s in results)
    at64 = dict(results)[64 * MiB]
    speedup = at64.p("value", 50) / at64.p("handle", 50)
    print(
        f"\ngoal: by handle within 2x the bare round trip at every size: "
        f"p50 {'met' if within else 'NOT met'}, p99 {'met' if within99 else 'NOT met'}"
    )
    print(
        f"goal: by handle >= 200x faster than by value at 64 MiB: "
        f"{speedup:.1f}x ({'met' if speedup >= 200 else 'NOT met'})"
    )


def plot(results: list[tuple[int, Stats]]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, name in (
        ("bare", "bare NATS round trip (100 B)"),
        ("handle", "by handle (lease-board check, cached mapping)"),
        ("value", "by value through NATS"),
        ("staging", "host staging (/dev/shm file per transfer)"),
    ):
        xs = [size / MiB for size, s in results if s.samples.get(key)]
        p50 = [s.p(key, 50) for _, s in results if s.samples.get(key)]
        p99 = [s.p(key, 99) for _, s in results if s.samples.get(key)]
        (line,) = ax.plot(xs, p50, marker="o", label=f"{name} p50")
        ax.plot(xs, p99, linestyle=":", color=line.get_color(), alpha=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tensor size (MiB)")
    ax.set_ylabel("handoff latency (ms), p50 solid, p99 dotted")
    ax.set_title("Stage-to-stage handoff between two processes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = IMG / "dp_handoff.png"
    fig.savefig(out, dpi=120)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer reps (a smoke run)")
    parser.add_argument("--consumer", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consumer:
        asyncio.run(consumer(args.consumer))
        return
    torch.set_num_threads(1)
    print(f"machine: {machine()}; nats max_payload {MAX_PAYLOAD // MiB} MiB")
    namespace = f"gfaas-bench-{secrets.token_hex(4)}"
    with (
        tempfile.TemporaryDirectory() as tmp,
        nats_server(Path(tmp) / "nats", max_payload=MAX_PAYLOAD) as server,
    ):
        env = dict(os.environ)
        env.update(
            GFAAS_NATS_URL=server.url,
            GFAAS_STATE_DIR=str(Path(tmp) / "state"),
            GFAAS_LOG_LEVEL="warning",
            GFAAS_METRICS_PORT="0",  # 8004 may be taken (another broker, a platform)
            GFAAS_SHM_NAMESPACE=namespace,
            GFAAS_NODE=NODE,
        )
        procs: list[subprocess.Popen[Any]] = [
            subprocess.Popen([sys.executable, "-m", "services.memory_broker"], env=env)
        ]
        try:
            cons = subprocess.Popen(
                [sys.executable, "-m", "bench.dp_handoff", "--consumer", server.url],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(cons)
            assert cons.stdout is not None
            if cons.stdout.readline().strip() != "ready":
                raise RuntimeError("the consumer did not start")
            results = anyio.run(producer, server.url, args.quick)
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(30)
    report(results)
    out = plot(results)
    if out is not None:
        print(f"\nplot: {out.relative_to(IMG.parent.parent)}")


if __name__ == "__main__":
    main()

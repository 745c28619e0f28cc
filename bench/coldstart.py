"""Cold starts (issue 9): time to the first answer of a function with no instance.

For MLPs of about 10 MB, 100 MB (and 1 GB with --large) of float32 weights
(bench/live_models.py, 1 MiB a layer):

- container: what a container FaaS does on a cold start: a fresh `python` process
  that imports torch, `torch.load`s the weights file, builds the model, loads the
  state dict and runs one forward (its wall time from spawn to the output);
- gfaas, fresh process: the function's first request with no instance and no spare
  (GFAAS_AGENT_SPARES=0): the agent starts an instance process, which imports,
  connects, fetches the weights into the host tier, builds and answers;
- gfaas, spare: the same with a pre-started spare process (the default): the agent
  assigns it, so no interpreter or torch import is paid on the request path.

Each gfaas start is measured twice: from the object store (the node's host tier
does not hold the model yet) and from the host tier (it does: the instance before
went idle and stopped). Both with the node's prefetch off (GFAAS_HOST_PREFETCH_MB=0),
which would otherwise put a deployed model into the tier before its first request.
Then, with prefetch on (the default), `prefetch` is the time from the deploy until
the model is in the tier (off the request path) and `spare prefetched` the first
answer of a request sent once it is: what a first request after a deploy gets.
`copy` is one plain copy of the weights in memory (the floor a load could reach on
a CPU: there is no host-to-device link here).

    .venv/bin/python -m bench.coldstart [--large]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import nats.errors
import numpy as np
import torch

from bench.live_models import WIDTH, write_mlp
from bench.node import start_node
from gfaas.client import Client
from gfaas.supervisor import Supervisor
from shared.natsd import nats_server
from shared.schema import FunctionSpec

CONTAINER = """
import sys, time
t0 = float(sys.argv[2])
import torch
from bench.live_models import mlp
state = torch.load(sys.argv[1], weights_only=True)
layers = sum(1 for k in state if k.endswith(".weight"))
model = mlp(layers)
model.load_state_dict(state)
with torch.inference_mode():
    model(torch.ones(1, 512))
print(time.time() - t0)
"""


def container_s(path: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    out = subprocess.run(
        [sys.executable, "-c", CONTAINER, str(path), repr(time.time())],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def copy_s(path: Path) -> float:
    state = torch.load(path, weights_only=True)
    flat = [t.contiguous() for t in state.values()]
    started = time.perf_counter()
    for t in flat:
        t.clone()
    return time.perf_counter() - started


async def ingress_functions(client: Client) -> list[str]:
    """The functions ingress knows ([] while it does not answer yet: a loaded machine
    starts it slowly)."""
    try:
        status = await client.status("ingress", timeout=2)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return []
    return list(status.details.get("functions", []))


async def agent(client: Client) -> dict[str, Any]:
    for status in await client.status_all("gpu-worker", timeout=1.0):
        if "agent" in status.details:
            return dict(status.details["agent"])
    return {}


# The steps of a start from a spare, in the order they happen, and who records them:
# the client (sent, answered), the scheduler's `cold_starts` (arrived, scale,
# joined, commanded, dispatched) and the instance's `setup_at` (the rest).
STEPS = {
    "sent": "client sends the request (to ingress)",
    "arrived": "scheduler has it: no instance",
    "scale": "scheduler decides to scale from zero",
    "assigned": "spare reads its assignment (the agent started it)",
    "serve": "instance's serve() begins (settings, logging, event loop)",
    "connect": "instance connected to NATS",
    "stores": "instance opened its stores",
    "skeleton": "instance's build needs the weights (handler imported, skeleton built)",
    "weights": "the weights are in the host tier, and device space is reserved",
    "subscribed": "instance subscribed while it loads, beats 'starting'",
    "handler": "instance loaded handler and model",
    "ready": "instance loaded, beats 'ready'",
    "joined": "scheduler heard its first heartbeat",
    "commanded": "scheduler's start command answered",
    "dispatched": "scheduler sent the queued request",
    "run_received": "instance received it",
    "run_staged": "its inputs are staged (before the handler is there, if loading)",
    "run_started": "instance starts executing",
    "run_executed": "instance executed it",
    "run_answered": "instance replied",
    "answered": "client has the answer",
}


async def timeline(client: Client, fn: str, sent: float, answered: float) -> dict[str, float]:
    """When each step of `fn`'s start happened (wall clock, one machine), as far as the
    services report them (the instance is still up: idle_s has not passed)."""
    out = {"sent": sent, "answered": answered}
    status = await client.status("scheduler", timeout=2)
    out.update((status.details.get("cold_starts") or {}).get(fn) or {})
    for worker in await client.status_all("gpu-worker", timeout=1.0):
        if worker.details.get("function") == fn:
            out.update(worker.details.get("setup_at") or {})
    return out


def print_timeline(name: str, at: dict[str, float]) -> None:
    print(f"\n{name}, start from a spare (ms since sent):")
    sent = at["sent"]
    last = sent
    for step, when in sorted(at.items(), key=lambda x: x[1]):
        since, step_ms = (when - sent) * 1000, (when - last) * 1000
        print(f"  {since:7.1f}  +{step_ms:6.1f}  {step:13} {STEPS.get(step, '')}")
        last = when


def mlp_spec(fn: str, model: str, path: Path, *, parallel: bool = True) -> FunctionSpec:
    """The function `fn` serving the MLP `model` (weights at `path`), one instance
    that goes after a second idle. `parallel`: a handler that knows its depth (the
    models are named m<layers>) and builds its skeleton while the weights come;
    else one that reads its depth from the weights, so its setup runs in sequence."""
    layers = model.removeprefix("m")
    return FunctionSpec(
        name=fn,
        handler=f"bench.live_models:Mlp{layers}" if parallel else "bench.live_models:Mlp",
        model=model,
        max_instances=1,
        idle_s=1.0,
        memory_mb=max(256, path.stat().st_size // 2**20 * 3),
        timeout_ms=120_000,
        slo_ms=60_000,
    )


async def first_answers(
    url: str, models: dict[str, Path], spares: bool, parallel: bool = True
) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Per model: [from the object store, from the host tier] seconds to the first
    answer; and with spares, the timeline of the start from the host tier
    (`parallel`: see mlp_spec)."""
    out: dict[str, list[float]] = {}
    timelines: dict[str, dict[str, float]] = {}
    x = np.ones((1, WIDTH), dtype=np.float32)
    async with Client.connect(url) as client:
        for name, path in models.items():
            await client.push_model(name, path)
            fn = f"{name}-{'s' if spares else 'f'}{'' if parallel else 'q'}"
            spec = mlp_spec(fn, name, path, parallel=parallel)
            await client.deploy(spec, handler_check=False)
            with anyio.fail_after(30):  # until ingress is up and has heard of it
                while fn not in await ingress_functions(client):
                    await anyio.sleep(0.1)
            with anyio.fail_after(60):  # and the scheduler has heard the node's agent
                while not (await client.status("scheduler")).details["instances"]["agents"]:
                    await anyio.sleep(0.2)
            times = []
            for where in ("object store", "host tier"):
                if spares:  # a spare is started and has imported everything
                    with anyio.fail_after(60):
                        while (await agent(client)).get("spares", 0) < 1:
                            await anyio.sleep(0.2)
                    await anyio.sleep(4.0)
                sent, started = time.time(), time.perf_counter()
                await client.invoke(fn, {"x": x}, timeout=120)
                times.append(time.perf_counter() - started)
                if spares:
                    timelines[f"{name}, model in the {where}"] = await timeline(
                        client, fn, sent, time.time()
                    )
                # Idle for idle_s: the instance goes (the host tier keeps the weights).
                with anyio.fail_after(60):
                    while True:
                        status = await client.status("scheduler", timeout=2)
                        live = (status.details.get("instances") or {}).get("live") or {}
                        if not live.get(fn):
                            break
                        await anyio.sleep(0.2)
            out[name] = times
            await client.remove(fn, force=True)
    return out, timelines


async def prefetched_answers(url: str, models: dict[str, Path]) -> dict[str, list[float]]:
    """Per model, with the node's prefetch on: [deploy until the model is in the host
    tier, first answer of a request sent then] seconds (a spare started)."""
    out: dict[str, list[float]] = {}
    x = np.ones((1, WIDTH), dtype=np.float32)
    async with Client.connect(url) as client:
        for name, path in models.items():
            await client.push_model(name, path)
            fn = f"{name}-p"
            spec = mlp_spec(fn, name, path)
            deployed = time.perf_counter()
            await client.deploy(spec, handler_check=False)
            with anyio.fail_after(120):
                while name not in await prefetched(client):
                    await anyio.sleep(0.05)
            prefetch_s = time.perf_counter() - deployed
            with anyio.fail_after(60):
                while fn not in await ingress_functions(client):
                    await anyio.sleep(0.1)
                while (await agent(client)).get("spares", 0) < 1:
                    await anyio.sleep(0.2)
            await anyio.sleep(4.0)  # the spare has imported everything
            started = time.perf_counter()
            await client.invoke(fn, {"x": x}, timeout=120)
            out[name] = [prefetch_s, time.perf_counter() - started]
            await client.remove(fn, force=True)
    return out


async def prefetched(client: Client) -> list[str]:
    """What the node's worker has put into its host tier (the first to answer: the
    bench's node has one worker, and `status_all` would wait out its timeout)."""
    try:
        status = await client.status("gpu-worker", timeout=2)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return []
    return list((status.details.get("prefetch") or {}).get("models", []))


def start(url: str, state: Path, spares: bool, prefetch: bool = False) -> Supervisor:
    return start_node(
        url,
        state,
        "cold",
        {
            "GFAAS_HOST_PREFETCH_MB": "-1" if prefetch else "0",
            "GFAAS_AGENT_SPARES": "1" if spares else "0",
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--large", action="store_true", help="also a 1 GB model")
    parser.add_argument(
        "--spare-only", action="store_true", help="only the starts from a spare (no container)"
    )
    args = parser.parse_args()
    sizes = {"m10": 10, "m100": 100} | ({"m1000": 1000} if args.large else {})
    print(
        f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp, nats_server(Path(tmp) / "nats") as server:
        models = {}
        for name, layers in sizes.items():
            models[name] = Path(tmp) / f"{name}.pt"
            write_mlp(models[name], layers, seed=1)
        rows: dict[str, dict[str, Any]] = {n: {} for n in models}
        nan = float("nan")
        for name, path in models.items():
            rows[name]["MB"] = path.stat().st_size / 1e6
            rows[name]["container"] = (
                nan if args.spare_only else min(container_s(path) for _ in range(2))
            )
            rows[name]["copy"] = copy_s(path)
            rows[name]["fresh store"] = rows[name]["fresh tier"] = nan
        timelines: dict[str, dict[str, float]] = {}
        # (spares, parallel setup): "in sequence" is a spare whose handler needs the
        # weights before it can build anything (the steps one after another).
        runs = [(True, True), (True, False)] + ([] if args.spare_only else [(False, True)])
        for spares, parallel in runs:
            sup = start(server.url, Path(tmp) / f"state-{spares}-{parallel}", spares)
            try:
                time.sleep(4.0)
                got, lines = anyio.run(first_answers, server.url, models, spares, parallel)
            finally:
                sup.stop()
            if parallel and spares:
                timelines = lines
            for name, (store, tier) in got.items():
                key = "spare" if spares else "fresh"
                key = key if parallel else "in sequence"
                rows[name][f"{key} store"] = store
                rows[name][f"{key} tier"] = tier
        sup = start(server.url, Path(tmp) / "state-prefetch", True, prefetch=True)
        try:
            time.sleep(4.0)
            for name, (fetched, first) in anyio.run(prefetched_answers, server.url, models).items():
                rows[name]["prefetch"] = fetched
                rows[name]["spare prefetched"] = first
        finally:
            sup.stop()
    for name, at in timelines.items():
        print_timeline(name, at)
    cols = [
        "container",
        "fresh store",
        "fresh tier",
        "spare store",
        "spare tier",
        "in sequence store",
        "in sequence tier",
        "prefetch",
        "spare prefetched",
        "copy",
    ]
    print(
        f"\n{'model':8} {'MB':>6} "
        + " ".join(f"{c:>16}" for c in cols)
        + "  container/spare tier  container/spare prefetched  store: sequence/parallel"
    )
    for name, row in rows.items():
        print(
            f"{name:8} {row['MB']:6.0f} "
            + " ".join(f"{row[c] * 1000:14.0f}ms" for c in cols)
            + f"  {row['container'] / row['spare tier']:20.1f}x"
            + f"  {row['container'] / row['spare prefetched']:26.1f}x"
            + f"  {row['in sequence store'] / row['spare store']:24.2f}x"
        )


if __name__ == "__main__":
    main()

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
went idle and stopped). `copy` is one plain copy of the weights in memory (the
floor a load could reach on a CPU: there is no host-to-device link here).

    .venv/bin/python -m bench.coldstart [--large]
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
from typing import Any

import anyio
import numpy as np
import torch

from bench.live_models import WIDTH, write_mlp
from gfaas.client import Client
from gfaas.supervisor import Supervisor
from shared.config import Settings
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


async def agent(client: Client) -> dict[str, Any]:
    for status in await client.status_all("gpu-worker", timeout=1.0):
        if "agent" in status.details:
            return dict(status.details["agent"])
    return {}


async def first_answers(url: str, models: dict[str, Path], spares: bool) -> dict[str, list[float]]:
    """Per model: [from the object store, from the host tier] seconds to the first answer."""
    out: dict[str, list[float]] = {}
    x = np.ones((1, WIDTH), dtype=np.float32)
    async with Client.connect(url) as client:
        for name, path in models.items():
            await client.push_model(name, path)
            fn = f"{name}-{'s' if spares else 'f'}"
            spec = FunctionSpec(
                name=fn,
                handler="bench.live_models:Mlp",
                model=name,
                max_instances=1,
                idle_s=1.0,
                memory_mb=max(256, path.stat().st_size // 2**20 * 3),
                timeout_ms=120_000,
                slo_ms=60_000,
            )
            await client.deploy(spec, handler_check=False)
            with anyio.fail_after(30):  # until ingress has heard of it
                while fn not in (await client.status("ingress", timeout=2)).details.get(
                    "functions", []
                ):
                    await anyio.sleep(0.1)
            times = []
            for _ in range(2):
                if spares:  # a spare is started and has imported everything
                    with anyio.fail_after(60):
                        while (await agent(client)).get("spares", 0) < 1:
                            await anyio.sleep(0.2)
                    await anyio.sleep(4.0)
                started = time.perf_counter()
                await client.invoke(fn, {"x": x}, timeout=120)
                times.append(time.perf_counter() - started)
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
    return out


def start(url: str, state: Path, spares: bool) -> Supervisor:
    os.environ.update(
        {
            "GFAAS_HEARTBEAT_S": "0.2",
            "GFAAS_HTTP_ENABLED": "0",
            "GFAAS_GRPC_ENABLED": "0",
            "GFAAS_METRICS_ENABLED": "0",
            "GFAAS_AGENT_SPARES": "1" if spares else "0",
            "GFAAS_SHM_NAMESPACE": f"gfaas-cold-{secrets.token_hex(3)}",
        }
    )
    settings = Settings(nats_url=url, state_dir=state, log_level="warning")
    sup = Supervisor(settings=settings, nats_url=url, workers=1)
    sup.start()
    return sup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--large", action="store_true", help="also a 1 GB model")
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
        for name, path in models.items():
            rows[name]["MB"] = path.stat().st_size / 1e6
            rows[name]["container"] = min(container_s(path) for _ in range(2))
            rows[name]["copy"] = copy_s(path)
        for spares in (False, True):
            sup = start(server.url, Path(tmp) / f"state-{spares}", spares)
            try:
                time.sleep(4.0)
                got = anyio.run(first_answers, server.url, models, spares)
            finally:
                sup.stop()
            for name, (store, tier) in got.items():
                key = "spare" if spares else "fresh"
                rows[name][f"{key} store"] = store
                rows[name][f"{key} tier"] = tier
    cols = ["container", "fresh store", "fresh tier", "spare store", "spare tier", "copy"]
    print(
        f"\n{'model':8} {'MB':>6} " + " ".join(f"{c:>12}" for c in cols) + "  container/spare tier"
    )
    for name, row in rows.items():
        ratio = row["container"] / row["spare tier"]
        print(
            f"{name:8} {row['MB']:6.0f} "
            + " ".join(f"{row[c] * 1000:10.0f}ms" for c in cols)
            + f"  {ratio:6.1f}x"
        )


if __name__ == "__main__":
    main()

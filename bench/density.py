"""Density (issue 9): instances of one function per device at a fixed memory budget,
with and without shared read-only weights.

One node agent with a device budget of `--budget-mb` (GFAAS_AGENT_MEMORY_MB), one
function over a 100-layer MLP (105 MB of float32 weights, bench/live_models.py)
with `memory_mb` 160 per instance and small fixed shares, so that memory is what
binds, asking for `--want` instances (min_instances). With shared weights (the
default on a CPU) instances of the model map the host tier's one copy and the
packer counts it once; without (GFAAS_SHARED_WEIGHTS=false) each instance holds its
own copy and its whole budget.

Reported for each: instances placed, the agent's booked memory, and what the
instance processes really hold, from /proc/<pid>/smaps_rollup: USS (pages only
that process maps) and PSS (each shared page divided among its mappers), summed
over the instances. Every instance is checked to answer correctly.

    .venv/bin/python -m bench.density [--budget-mb 1024] [--want 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch

from bench.coldstart import agent as agent_details
from bench.live_models import WIDTH, mlp, write_mlp
from bench.node import start_node
from gfaas.client import Client, outputs_of
from gfaas.supervisor import Supervisor
from shared.natsd import nats_server
from shared.schema import FunctionSpec

MB = 1024 * 1024
LAYERS = 100


def rollup(pid: int) -> dict[str, int]:
    """Bytes of a process's memory: rss, pss, uss (private clean + dirty)."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[-1] == "kB":
            fields[key.strip()] = int(parts[0]) * 1024
    return {
        "rss": fields.get("Rss", 0),
        "pss": fields.get("Pss", 0),
        "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
    }


async def measure(url: str, weights: Path, want: int, expected: np.ndarray) -> dict[str, Any]:
    x = np.ones((1, WIDTH), dtype=np.float32)
    async with Client.connect(url) as client:
        await client.push_model("m100", weights)
        spec = FunctionSpec(
            name="dense",
            handler="bench.live_models:Mlp",
            model="m100",
            min_instances=want,
            max_instances=want,
            memory_mb=160,
            sm_share=0.05,
            time_quota=0.05,
            idle_s=600.0,
            timeout_ms=120_000,
        )
        await client.deploy(spec, handler_check=False)
        # Until the set of ready instances has not changed for 5 s (the scheduler
        # places what fits and says why the rest does not).
        ready: list[dict[str, Any]] = []
        stable_since = time.monotonic()
        with anyio.fail_after(300):
            while time.monotonic() - stable_since < 5.0:
                agent = await agent_details(client)
                now_ready = [i for i in agent.get("instances", []) if i["state"] == "ready"]
                starting = [i for i in agent.get("instances", []) if i["state"] == "starting"]
                if len(now_ready) != len(ready) or starting:
                    ready, stable_since = now_ready, time.monotonic()
                await anyio.sleep(0.5)
        # Every instance answers, correctly: concurrent callers keep them all busy.
        answered: set[str] = set()

        async def caller() -> None:
            for _ in range(4):
                reply = await client.invoke_reply("dense", {"x": x}, timeout=120)
                assert reply.error is None, reply.error
                y = outputs_of(reply)["y"]
                np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
                answered.add(reply.worker)

        async with anyio.create_task_group() as tg:
            for _ in range(2 * len(ready)):
                tg.start_soon(caller)
        memory = [rollup(int(i["pid"])) for i in ready]
        agent = await agent_details(client)
        status = await client.status("scheduler", timeout=2)
        unplaced = (status.details.get("instances") or {}).get("unplaced") or {}
        await client.remove("dense", force=True)
    return {
        "placed": len(ready),
        "answered": len(answered),
        "booked_mb": agent.get("memory_used", 0) / MB,
        "weights": agent.get("weights", {}),
        "pss_mb": sum(m["pss"] for m in memory) / MB,
        "uss_mb": [m["uss"] / MB for m in memory],
        "rss_mb": [m["rss"] / MB for m in memory],
        "why_not_more": unplaced.get("dense", ""),
    }


def start(url: str, state: Path, budget_mb: int, shared: bool) -> Supervisor:
    return start_node(
        url,
        state,
        "dense",
        {
            "GFAAS_AGENT_MEMORY_MB": str(budget_mb),
            "GFAAS_SHARED_WEIGHTS": "true" if shared else "false",
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget-mb", type=int, default=1024)
    parser.add_argument("--want", type=int, default=16)
    args = parser.parse_args()
    print(
        f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"torch {torch.__version__}; device budget {args.budget_mb} MiB, "
        f"instances of 160 MiB over {LAYERS} x {WIDTH}x{WIDTH} float32 weights"
    )
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, nats_server(Path(tmp) / "nats") as server:
        weights = Path(tmp) / "m100.pt"
        write_mlp(weights, LAYERS, seed=1)
        model = mlp(LAYERS)
        model.load_state_dict(torch.load(weights, weights_only=True))
        with torch.inference_mode():
            expected = model(torch.ones(1, WIDTH)).numpy()
        print(f"weights: {weights.stat().st_size / MB:.1f} MiB")
        for shared in (False, True):
            sup = start(server.url, Path(tmp) / f"state-{shared}", args.budget_mb, shared)
            try:
                time.sleep(3.0)
                rows["shared" if shared else "copies"] = anyio.run(
                    measure, server.url, weights, args.want, expected
                )
            finally:
                sup.stop()
    print(
        f"\n{'weights':8} {'placed':>6} {'answered':>8} {'booked':>9} {'PSS sum':>9} "
        f"{'USS each':>16} {'RSS each':>16}  why not more"
    )
    for name, r in rows.items():
        uss, rss = r["uss_mb"] or [0.0], r["rss_mb"] or [0.0]
        print(
            f"{name:8} {r['placed']:6d} {r['answered']:8d} {r['booked_mb']:7.0f}MB "
            f"{r['pss_mb']:7.0f}MB {min(uss):6.0f}-{max(uss):5.0f}MB "
            f"{min(rss):6.0f}-{max(rss):5.0f}MB  {r['why_not_more'][:60]}"
        )
    copies, shared_row = rows["copies"], rows["shared"]
    if copies["placed"]:
        print(
            "\ninstances per device, shared / copies: "
            f"{shared_row['placed'] / copies['placed']:.2f}x"
        )
    if copies["pss_mb"] and shared_row["placed"] and copies["placed"]:
        per_shared = shared_row["pss_mb"] / shared_row["placed"]
        per_copy = copies["pss_mb"] / copies["placed"]
        print(
            f"measured memory per instance (PSS): {per_copy:.0f} MB copies, "
            f"{per_shared:.0f} MB shared"
        )


if __name__ == "__main__":
    main()

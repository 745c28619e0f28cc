"""The inference fronts against a peer: a no-op over OIP HTTP and gRPC, gfaas vs
MLServer, same machine, same run, same load generators, outside Python's process.

    python -m bench.front [--seconds 10] [--mlserver PATH/TO/mlserver]

HTTP load: `wrk` (Debian's package) POSTing the same JSON body, sequentially (one
connection) and with 64 connections. gRPC load: `python -m bench.grpc_load` in its
own process (tritonclient's stubs over grpc.aio), 1 and 64 concurrent calls.
Each path's CPU per call is read from /proc, per server process (with its children):
gfaas's services and nats-server, MLServer's process.
gfaas runs as `gfaas up` runs it (every service its own process, one worker, the
no-op function examples/noop.py); MLServer runs a no-op `MLModel` that echoes its
input (installed in its own venv: `python -m venv /tmp/mlsv && /tmp/mlsv/bin/pip
install mlserver`). Prints p50, p99 and requests/s, and gfaas's ratios to MLServer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx

from bench.overhead import prepare_gfaas
from bench.proc_cpu import per_call_ms, tree_cpu
from gfaas.supervisor import Supervisor
from shared.config import Settings
from shared.natsd import free_port, nats_server

BODY = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.0]}]})
WRK_SCRIPT = f"""
wrk.method = "POST"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
"""
MLSERVER_MODEL = textwrap.dedent(
    """
    from mlserver import MLModel
    from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

    class Noop(MLModel):
        async def load(self) -> bool:
            return True

        async def predict(self, payload: InferenceRequest) -> InferenceResponse:
            x = payload.inputs[0]
            out = ResponseOutput(name="y", shape=x.shape, datatype=x.datatype, data=x.data)
            return InferenceResponse(model_name=self.name, outputs=[out])
    """
)
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
# One measured path: its name, its latency and rate, and each server process's CPU
# milliseconds per call.
Row = tuple[str, dict[str, float], dict[str, float]]


def wrk(url: str, connections: int, seconds: float, script: Path) -> dict[str, float]:
    threads = 1 if connections == 1 else 2
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout

    def latency(pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        return float(m.group(1)) * _UNITS[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"^\s+(\d+) requests in", out, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert rps, out
    assert total, out
    assert non2xx is None, f"{url} answered errors:\n{out}"
    return {
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "rps": float(rps.group(1)),
        "requests": float(total.group(1)),
    }


def grpc_load(target: str, concurrency: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.grpc_load",
            target,
            "noop",
            "--concurrency",
            str(concurrency),
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    # Its warm-up calls cost the servers CPU too.
    result["requests"] += result.pop("warmup_calls")
    return result


def wait_ready(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/models/noop/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not become ready")


def measure(
    name: str, http: str, grpc: str, seconds: float, script: Path, servers: dict[str, int]
) -> list[Row]:
    infer = f"{http}/v2/models/noop/infer"
    loads: list[tuple[str, Callable[[], dict[str, float]]]] = []
    if shutil.which("wrk"):  # without it, the gRPC rows alone (main says so)
        loads += [
            ("HTTP, 1 connection", lambda: wrk(infer, 1, seconds, script)),
            ("HTTP, 64 connections", lambda: wrk(infer, 64, seconds, script)),
        ]
    loads += [
        ("gRPC, 1 call at a time", lambda: grpc_load(grpc, 1, seconds)),
        ("gRPC, 64 concurrent", lambda: grpc_load(grpc, 64, seconds)),
    ]
    rows: list[Row] = []
    for label, load in loads:
        before = tree_cpu(servers)
        result = load()
        cpu = per_call_ms(before, tree_cpu(servers), result["requests"])
        rows.append((f"{name} {label}", result, cpu))
    return rows


def run_gfaas(tmp: Path, seconds: float, script: Path) -> list[Row]:
    http_port, grpc_port = free_port(), free_port()
    with nats_server(tmp / "nats") as server:
        settings = Settings(
            nats_url=server.url,
            state_dir=tmp / "gfaas",
            log_level="warning",
            capacity=256,
            http_host="127.0.0.1",
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=0,  # any free ports: the defaults may be taken (a platform beside)
        )
        os.environ.update(
            GFAAS_CAPACITY="256", GFAAS_HTTP_PORT=str(http_port), GFAAS_GRPC_PORT=str(grpc_port)
        )
        sup = Supervisor(settings=settings, nats_url=server.url, workers=1)
        sup.start()
        try:
            anyio.run(prepare_gfaas, server.url)
            wait_ready(f"http://127.0.0.1:{http_port}")
            servers = {c.name: c.process.pid for c in sup.children if c.process is not None}
            servers["nats-server"] = server.process.pid
            return measure(
                "gfaas",
                f"http://127.0.0.1:{http_port}",
                f"127.0.0.1:{grpc_port}",
                seconds,
                script,
                servers,
            )
        finally:
            sup.stop()


def run_mlserver(binary: str, tmp: Path, seconds: float, script: Path) -> list[Row]:
    root = tmp / "mlserver"
    (root / "noop").mkdir(parents=True)
    (root / "noop_runtime.py").write_text(MLSERVER_MODEL)
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    (root / "settings.json").write_text(
        # Inference in the server's own process: its worker pool fails to start with
        # the uvloop it installs (0.23), and for a no-op the pool only adds a hop.
        json.dumps(
            {
                "http_port": http_port,
                "grpc_port": grpc_port,
                "metrics_port": metrics_port,
                "parallel_workers": 0,
            }
        )
    )
    (root / "noop" / "model-settings.json").write_text(
        json.dumps({"name": "noop", "implementation": "noop_runtime.Noop"})
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [binary, "start", str(root)],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"http://127.0.0.1:{http_port}")
        return measure(
            "MLServer",
            f"http://127.0.0.1:{http_port}",
            f"127.0.0.1:{grpc_port}",
            seconds,
            script,
            {"mlserver": proc.pid},
        )
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--mlserver", default=shutil.which("mlserver") or "/tmp/mlsv/bin/mlserver")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cpus, python {sys.version.split()[0]}")
    if not shutil.which("wrk"):
        print("wrk not found (Debian's package): no HTTP rows, gRPC only")
    if not Path(args.mlserver).exists():
        print(f"no MLServer at {args.mlserver}: gfaas only")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        script = tmp / "post.lua"
        script.write_text(WRK_SCRIPT)
        rows = run_gfaas(tmp, args.seconds, script)
        peer = (
            run_mlserver(args.mlserver, tmp, args.seconds, script)
            if Path(args.mlserver).exists()
            else []
        )
    print(f"\n{'path':40} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9} {'CPU ms/call':>12}")
    for name, r, cpu in rows + peer:
        print(
            f"{name:40} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['rps']:9.0f} "
            f"{sum(cpu.values()):12.3f}"
        )
    print("\nCPU ms per call, by server process (with its children)")
    for name, _, cpu in rows + peer:
        print(f"{name:40} " + "  ".join(f"{k} {v:.3f}" for k, v in cpu.items()))
    if peer:
        print("\ngfaas vs MLServer (p50: lower is better; req/s: higher is better)")
        for (name, g, _), (_, m, _) in zip(rows, peer, strict=True):
            label = name.removeprefix("gfaas ")
            p50, rps = g["p50_ms"] / m["p50_ms"], g["rps"] / m["rps"]
            print(f"{label:32} p50 {p50:.2f}x   req/s {rps:.2f}x")


if __name__ == "__main__":
    main()

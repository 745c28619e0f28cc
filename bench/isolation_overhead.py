"""What isolating handler code costs the sync path (issue 10), in one run.

    sudo python -m bench.isolation_overhead [--requests 1000] [--concurrency 64] [--rounds 2]

`gfaas up`'s embedded server and every service as its own process, one worker, the
no-op function of bench.overhead (its spec asks for no instances), alternated
`--rounds` times:

- shared worker: GFAAS_HANDLER_USER=none, the function runs inside the worker (as
  root: what a node without a handler user does);
- isolated: GFAAS_HANDLER_USER=nobody, so the agent's beat says `isolated`, the worker
  takes no runs, and the function runs as instances, as nobody (each call gated by the
  agent's token arbiter; the first one starts an instance from a spare).

Prints p50/p99 and throughput per variant, the added p50 against the shared worker,
and the time to the first answer (the isolated node scales from zero). Needs root
(switching users); the state directory is made passable for nobody.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import anyio
import numpy as np

from bench.auth_overhead import bench_variant
from bench.overhead import Result, prepare_gfaas
from gfaas.supervisor import Supervisor
from shared.config import Settings

VARIANTS = {"shared worker": "none", "isolated: instances as nobody": "nobody"}


def run_variant(
    tmp: Path, name: str, round_: int, requests: int, concurrency: int
) -> tuple[list[Result], float]:
    state = tmp / f"state-{round_}-{list(VARIANTS).index(name)}"
    user = VARIANTS[name]
    settings = Settings(
        state_dir=state,
        http_enabled=False,
        grpc_enabled=False,
        log_level="warning",
        capacity=256,
        metrics_port=0,
        nats_auth=False,
        handler_user=user,
    )
    os.environ.update(
        GFAAS_HTTP_ENABLED="0",
        GFAAS_GRPC_ENABLED="0",
        GFAAS_CAPACITY="256",
        GFAAS_GRANT_TTL_S="2.0",
        GFAAS_METRICS_PORT="0",
        GFAAS_TRACE_DIR="",
        GFAAS_HANDLER_USER=user,
        OTEL_EXPORTER_OTLP_ENDPOINT="",
    )
    sup = Supervisor(settings=settings, nats_url=None, nats_port=-1, workers=1)
    url = sup.start()
    try:
        started = time.perf_counter()
        anyio.run(prepare_gfaas, url)  # deploy, then call until the first answer
        first_s = time.perf_counter() - started
        return anyio.run(bench_variant, url, name, None, "", requests, concurrency), first_s
    finally:
        sup.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench.isolation_overhead: needs root (instances switch users)")
    found: dict[str, list[Result]] = {name: [] for name in VARIANTS}
    first: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp).chmod(0o711)  # nobody passes through to its instances' directories
        for r in range(args.rounds):
            for name in VARIANTS:
                results, first_s = run_variant(Path(tmp), name, r, args.requests, args.concurrency)
                found[name] += results
                first[name].append(first_s)
    print(f"\n{'variant':46} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9}")
    for results in found.values():
        for res in results:
            print(f"{res.name:46} {res.p50_ms:8.3f} {res.p99_ms:8.3f} {res.rps:9.0f}")
    base, isolated = VARIANTS
    for kind in ("sequential", "concurrency"):
        off = float(np.median([r.p50_ms for r in found[base] if kind in r.name]))
        on = float(np.median([r.p50_ms for r in found[isolated] if kind in r.name]))
        print(
            f"{isolated}: added p50 ({kind}) {on - off:+.3f} ms ({(on / off - 1) * 100:+.1f}%), "
            f"median of {args.rounds} rounds: shared {off:.3f} ms, isolated {on:.3f} ms"
        )
    for name in VARIANTS:
        print(f"{name}: deploy to first answer {np.median(first[name]) * 1000:.0f} ms (median)")


if __name__ == "__main__":
    main()

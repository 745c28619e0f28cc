"""What NATS authentication adds to the full sync path (issue 10), in one run.

    python -m bench.auth_overhead [--requests 2000] [--concurrency 64] [--rounds 2]

`gfaas up`'s embedded server and every service as its own process, one worker, a
no-op function (bench.overhead's), alternated `--rounds` times:

- auth off: no credentials, no permissions (`--insecure`);
- auth on, admin: every service its own NATS user with its allow-lists (the server
  checks each publish and subscription), the caller the admin in the service
  account, on the plain invoke subject: what permissions cost;
- auth on, tenant: the caller a tenant (TENANTS account, its subject, its inbox):
  the request crosses the import and its answer comes back through ingress (the
  server lets no client hand a tenant's reply subject on), one hop more.

Prints p50/p99 and throughput per variant, and the added p50 against auth off.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import msgspec
import nats
import numpy as np
from nats.aio.client import Client as NATS

from bench.overhead import BODY, Result, measure, prepare_gfaas
from gfaas.client import connect_nats
from gfaas.supervisor import PID_FILE, Supervisor
from shared import auth
from shared.config import Settings

VARIANTS = ("auth off", "auth on, admin", "auth on, tenant")
TENANT = "bench"


async def _until_connects(url: str, creds: Path) -> NATS:
    with anyio.fail_after(20):
        while True:
            try:
                return await connect_nats(url, creds=creds)
            except ConnectionError:
                await anyio.sleep(0.1)


async def bench_variant(
    url: str, name: str, creds: Path | None, tenant: str, requests: int, concurrency: int
) -> list[Result]:
    nc = await _until_connects(url, creds) if creds else await nats.connect(url)
    subject = auth.tenant_invoke(tenant, "noop") if tenant else "gfaas.v1.invoke.noop"

    async def full() -> None:
        msg = await nc.request(subject, BODY, timeout=10)
        if msg.headers and msg.headers.get("Gfaas-Status") != "ok":
            raise RuntimeError(msgspec.msgpack.decode(msg.data))

    call: Callable[[], Awaitable[None]] = full
    results = list(await measure(name, call, requests, concurrency))
    await nc.drain()
    return results


def run_variant(tmp: Path, name: str, round_: int, requests: int, concurrency: int) -> list[Result]:
    on = name != "auth off"
    state = tmp / f"state-{round_}-{VARIANTS.index(name)}"
    settings = Settings(
        state_dir=state,
        http_enabled=False,
        grpc_enabled=False,
        log_level="warning",
        capacity=256,
        metrics_port=0,
        nats_auth=on,
    )
    os.environ.update(
        GFAAS_HTTP_ENABLED="0",
        GFAAS_GRPC_ENABLED="0",
        GFAAS_CAPACITY="256",
        GFAAS_GRANT_TTL_S="2.0",
        GFAAS_METRICS_PORT="0",
        GFAAS_TRACE_DIR="",
        OTEL_EXPORTER_OTLP_ENDPOINT="",
    )
    sup = Supervisor(settings=settings, nats_url=None, nats_port=-1, workers=1)
    url = sup.start()
    try:
        directory = auth.auth_dir(settings)
        admin = directory / "admin.json" if on else None
        os.environ["GFAAS_NATS_CREDS"] = str(admin) if admin else ""
        anyio.run(prepare_gfaas, url)
        creds, tenant = admin, ""
        if name == "auth on, tenant":
            creds, _ = auth.add_tenant(directory, TENANT)
            auth.reload_server(state / "nats" / PID_FILE)
            tenant = TENANT
        return anyio.run(bench_variant, url, name, creds, tenant, requests, concurrency)
    finally:
        os.environ.pop("GFAAS_NATS_CREDS", None)
        sup.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    found: dict[str, list[Result]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in VARIANTS:
                found[name] += run_variant(Path(tmp), name, r, args.requests, args.concurrency)
    print(f"\n{'variant':46} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9}")
    for results in found.values():
        for res in results:
            print(f"{res.name:46} {res.p50_ms:8.3f} {res.p99_ms:8.3f} {res.rps:9.0f}")
    for name in VARIANTS[1:]:
        for kind in ("sequential", "concurrency"):
            off = float(np.median([r.p50_ms for r in found[VARIANTS[0]] if kind in r.name]))
            on = float(np.median([r.p50_ms for r in found[name] if kind in r.name]))
            print(
                f"{name}: added p50 ({kind}) {on - off:+.3f} ms ({(on / off - 1) * 100:+.1f}%), "
                f"median of {args.rounds} rounds: off {off:.3f} ms, on {on:.3f} ms"
            )


if __name__ == "__main__":
    main()

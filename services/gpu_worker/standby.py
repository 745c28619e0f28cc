"""A pre-started instance process: `python -m services.gpu_worker.standby`.

It pays what every instance pays before it knows its function (the interpreter,
torch and gfaas imported) and then waits on stdin for its assignment: one line of
JSON, the GFAAS_* (and CUDA_MPS_*) environment of the instance it becomes. It has
no CUDA context yet (nothing here touches the device), so an MPS share or a memory
cap set by the assignment still applies; its cores are pinned by the instance's
settings before torch's first operation. EOF instead of a line: it was not needed,
and exits. An assignment with an instance directory (the agent is root and has a
handler user) makes it switch to that user before it serves (privileges.become):
nothing of its handler has run as root.

It is a subreaper (limits.become_subreaper): the processes its handler starts stay
under it, whatever session or group they move to, and as it exits, it kills them
(its agent, killing it, kills them first: limits.kill_instance).

Everything an instance does before its first answer that does not depend on the
assignment is done here, before it (warm_up): imports that would otherwise be lazy
(the event loop's backend, uvloop, the tracing SDK, the NATS connection options),
an event loop run once, the first model build's set-up, and the heap's garbage
collection (which, left to the start, stalled the first request by 100-150 ms; the
start's timeline: `python -m bench.coldstart`).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

import anyio
import anyio.lowlevel

# The imports an instance needs, paid before the assignment.
from services.gpu_worker import limits, privileges, state
from services.gpu_worker.app import serve
from shared.config import settings_from_env
from shared.service import backend_options, run_service, settle_heap

# What the start imports lazily: for configure_tracing, connected (shared.bus) and
# metrics.start (the Prometheus endpoint's modules alone took 20-25 ms).
LAZY_IMPORTS = (
    "opentelemetry.sdk.resources",
    "opentelemetry.sdk.trace",
    "opentelemetry.sdk.trace.export",
    "opentelemetry.sdk.trace.sampling",
    "opentelemetry.sdk.metrics",
    "opentelemetry.exporter.prometheus",
    "prometheus_client",
    "shared.auth",
)


def warm_up() -> None:
    """What a start pays once per process, paid before the assignment.

    A first model build: materialising a module built on the meta device imports
    torch's symbolic-shape machinery (sympy: about 0.4 s here), and a first forward
    its kernels' set-up. The start's lazy imports (about 10 ms of the event loop's
    backend and uvloop at `anyio.run`, the tracing SDK's at `configure_tracing`,
    20-25 ms of the metrics endpoint's).
    Then the heap is collected and frozen: what the start adds is little, so the
    service's own `settle_heap` after it, and any collection meanwhile, are short.
    """
    import torch

    layer = torch.nn.Linear(4, 4, device="meta").to_empty(device="cpu")
    with torch.inference_mode():
        layer(torch.ones(1, 4))

    for module in LAZY_IMPORTS:
        importlib.import_module(module)

    async def nothing() -> None:
        await anyio.lowlevel.checkpoint()

    anyio.run(nothing, backend_options=backend_options())
    settle_heap()


def main() -> int:
    # What its handler starts stays in its tree, even in a session of its own and
    # orphaned (a daemon's double fork): the instance kills it all as it exits.
    limits.become_subreaper()
    try:
        return _main()
    finally:
        limits.kill_tree(os.getpid())


def _main() -> int:
    warm_up()
    line = sys.stdin.readline()
    state.assigned_at = time.time()
    if not line.strip():
        return 0  # the agent stopped, or no longer wants a spare
    env = json.loads(line)
    if not isinstance(env, dict):
        print("standby: the assignment must be a JSON object", file=sys.stderr)
        return 2
    os.environ.update({str(k): str(v) for k, v in env.items()})
    settings = settings_from_env()
    if settings.instance_dir:
        settings = privileges.become(settings)
    if settings.instance_profile:
        from services.gpu_worker import profile_instance

        return profile_instance.main(settings)
    return run_service("gpu-worker", serve, settings)


if __name__ == "__main__":
    sys.exit(main())

"""A function's profile measured in an instance process: `standby.main` with
GFAAS_INSTANCE_PROFILE naming the file to leave it in.

Two kinds of function are never loaded by the agent's own process, and a profile
runs the handler for seconds: on a node that isolates handler code (the agent runs
as root with a handler user) every function (issue 10: no handler code as root), and
anywhere a function with a code bundle (its modules belong in a process of their
own). The agent hands such a profile to a spare (`Agent.profile_in_instance`): as an
instance would, it switches to the handler user in its own directory where there is
one, mounts the function's bundle, loads the handler, with the limits of an instance
of the function and every core the agent has; then it measures the same grid as the
agent's profiler (profiler.py), leaves the ProfileReply in that file and exits. It
takes no runs and sends no beats: nothing but the agent hears of it.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import torch

from services.gpu_worker.app import handler_cache, measured_here, profile_function
from services.gpu_worker.device import pick_device
from shared.bus import connected
from shared.config import Settings
from shared.errors import described
from shared.logs import configure_logging, get_logger
from shared.modelstore import ModelStore
from shared.registry import Registry
from shared.schema import ErrorCode, ErrorInfo, FunctionSpec, ProfileReply, ProfileRequest, encode
from shared.service import backend_options
from shared.sharing.cpu import pin

log = get_logger("gpu_worker")


async def measure(settings: Settings) -> ProfileReply:
    device = pick_device(settings.device)
    name = f"gfaas-profile-{settings.worker_id}"
    async with connected(settings.nats_url, name, settings=settings) as nc:
        js = nc.jetstream()
        registry: Registry[FunctionSpec] = await Registry.open(js, replicas=settings.js_replicas)
        models = await ModelStore.open(js, replicas=settings.js_replicas)
        handlers = handler_cache(settings, device, models)
        here = measured_here(
            handlers, settings, device=device, agent_id=settings.instance_agent, spatial=""
        )
        return await profile_function(
            ProfileRequest(function=settings.instance_function), registry, here
        )


def main(settings: Settings) -> int:
    """Measure, and leave the reply for the agent: an error in it rather than none."""
    configure_logging(settings.log_level, json=settings.log_json)
    if settings.instance_cores:
        pin(frozenset(int(c) for c in settings.instance_cores.split(",")))
    torch.set_num_threads(max(1, settings.threads))
    try:
        reply = anyio.run(measure, settings, backend_options=backend_options())
    except Exception as exc:  # the agent must hear why, not find nothing
        log.exception("profile.crashed", function=settings.instance_function)
        reply = ProfileReply(error=ErrorInfo(code=ErrorCode.INTERNAL, reason=described(exc)))
    target = Path(settings.instance_profile)
    partial = target.with_suffix(".partial")
    partial.write_bytes(encode(reply))
    os.replace(partial, target)  # the agent reads a whole reply or none
    return 0

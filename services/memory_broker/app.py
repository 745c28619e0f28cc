"""The memory broker: one per node, owner of the pooled buffers and the links.

This slice answers status requests; leasing pooled buffers and arbitrating link
bandwidth arrive with the data plane (shared/dataplane).
"""

from __future__ import annotations

import os
import socket

import anyio
from anyio.abc import TaskStatus

from shared.bus import connected, serve_status
from shared.config import Settings
from shared.modelswap import HostTier, tier_prefix


async def serve(
    settings: Settings,
    stop: anyio.Event,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    instance = f"{socket.gethostname()}-{os.getpid()}"
    async with connected(settings.nats_url, "gfaas-memory-broker") as nc:

        def details() -> dict[str, object]:
            return {"pools": [], "leases": 0, "bytes_leased": 0}

        await serve_status(nc, "memory-broker", instance, details)
        task_status.started()
        try:
            await stop.wait()
        finally:
            # The broker is the node's memory owner and outlives workers: at its
            # shutdown the host tier goes too, so no segment outlives the platform.
            HostTier(tier_prefix(settings.shm_namespace)).purge()

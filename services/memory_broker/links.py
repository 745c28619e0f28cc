"""The node's links: one per ordered pair of devices, each with its fair scheduler
(shared.dataplane.bandwidth) and a copier thread that issues its chunks.

Every byte the broker moves goes through here: copies it is asked for, and the
moves of parked leases (spill, prefetch, bring back), which share the links as one
flow of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import anyio

from services.memory_broker.devices import gpu_engine, link_kind
from shared.dataplane.backend import tensor_from_handle
from shared.dataplane.bandwidth import LinkScheduler, Mode
from shared.dataplane.copier import Copier, NumpyEngine
from shared.schema import Handle

# Bytes/s a link is assumed to carry before measurements say otherwise; only used to
# judge whether a minimum rate is about to slip.
LINK_CAPACITY = {"host": 10e9, "pcie": 25e9, "nvlink": 300e9}

# The flow name spill, prefetch and bring-back copies carry on a link.
SPILL_FLOW = "gfaas-spill"


class Links:
    def __init__(self, *, chunk_bytes: int, mode: Mode) -> None:
        self.chunk_bytes = chunk_bytes
        self.mode = mode
        # "<src>-><dst>" -> its copier; made on a link's first copy.
        self.copiers: dict[str, Copier] = {}

    async def move(self, src: Handle, dst: Handle) -> None:
        """A parked lease's bytes to its new place (spill, prefetch, bring back): on the
        link's scheduler like every other copy, as its own flow."""
        await self.copy(src, dst, weight=1.0, flow=SPILL_FLOW)

    async def copy(
        self,
        source: Handle,
        dst: Handle,
        *,
        weight: float,
        flow: str,
        budget_s: float = 0.0,
        compute_s: float = 0.0,
    ) -> None:
        """Chunk by chunk under the link's fair scheduler; with a budget, at least the
        rate that leaves `compute_s` of it for the consumer's compute."""
        nbytes = source.nbytes
        if nbytes == 0:
            return
        src_view = tensor_from_handle(source, "uint8", [nbytes])
        dst_view = tensor_from_handle(dst, "uint8", [nbytes])
        cpu = src_view.device.type == "cpu" and dst_view.device.type == "cpu"
        copier = self._copier(source.device, dst.device, cpu=cpu)
        if isinstance(copier.engine, NumpyEngine):
            src: Any = src_view.numpy()
            out: Any = dst_view.numpy()
        else:
            src, out = src_view, dst_view
        future = copier.submit(
            f"{dst.lease_id}@{dst.device}",
            out,
            src,
            nbytes,
            weight=weight,
            flow=flow,
            deadline=time.perf_counter() + budget_s if budget_s > 0 else None,
            compute_s=compute_s,
        )
        done = asyncio.wrap_future(future)
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            # The copier thread goes on with the chunks it has: the caller's blocks
            # must stay pinned (leased to nobody else) until it lets go of them.
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await done
            raise

    def _copier(self, src: str, dst: str, *, cpu: bool) -> Copier:
        link = f"{src}->{dst}"
        copier = self.copiers.get(link)
        if copier is None:
            scheduler = LinkScheduler(
                link,
                capacity=LINK_CAPACITY[link_kind(src, dst)],
                chunk_bytes=self.chunk_bytes,
                mode=self.mode,
            )
            copier = Copier(scheduler, NumpyEngine() if cpu else gpu_engine(src, dst))
            self.copiers[link] = copier
        return copier

    def stats(self) -> dict[str, object]:
        return {
            link: {
                "utilisation": round(s.busy_s / s.elapsed_s, 4) if s.elapsed_s > 0 else 0.0,
                "bytes": s.bytes_done,
                "bytes_by_flow": s.bytes_by_flow,
                "transfers": s.transfers_done,
                "active": s.active,
            }
            for link, c in self.copiers.items()
            for s in [c.scheduler.stats()]
        }

    def close(self) -> None:
        for copier in self.copiers.values():
            copier.close()

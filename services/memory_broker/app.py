"""The memory broker: one per node, owner of the pooled buffers and the links.

It outlives workers, so data survives a worker crash. Requests on
`gfaas.v1.broker.<node>.<op>`: lease (pooled buffers, one handle each), check (may
this tenant read these handles? for a holder, also keep them while it reads), retain /
release (reference counts for fan-out), transfer (a worker hands its outputs'
references to the caller), copy (leased bytes to another device, chunked through the
link's fair scheduler). Every refusal is a HandlesReply with an error code and reason;
nothing is read or written out of bounds.

Owner liveness comes from worker heartbeats: a worker silent for longer than the
timeout loses its references. TTLs free what callers forget. Pools grow under
demand and give idle slabs back (shared.dataplane.elastic).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
import msgspec
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.memory_broker.pools import NodePools
from shared import subjects
from shared.bus import BusHealth, connected, decode_event, serve_status, watch_bus
from shared.config import PAYLOAD_HEADROOM, Settings
from shared.dataplane.backend import Backend, select_backend, tensor_from_handle
from shared.dataplane.bandwidth import LinkScheduler, Mode
from shared.dataplane.board import LeaseBoard, board_name
from shared.dataplane.client import (
    MAX_HANDLES_PER_REQUEST,
    MAX_LEASES_PER_REQUEST,
    check_count,
    check_reply_fits,
    handle_bound,
)
from shared.dataplane.copier import Copier, CopyEngine, NumpyEngine
from shared.dataplane.cuda import cuda_device_count
from shared.dataplane.elastic import ElasticConfig
from shared.dataplane.shm import ShmBackend
from shared.errors import GfaasError
from shared.logs import get_logger
from shared.modelswap import HostTier, tier_prefix
from shared.schema import (
    DEFAULT_TENANT,
    H_TENANT,
    BytesReply,
    CopyRequest,
    ErrorCode,
    Handle,
    HandlesReply,
    HandlesRequest,
    LeaseRequest,
    ReadRequest,
    WorkerHeartbeat,
    decode,
    encode,
)

log = get_logger("memory_broker")

MB = 1024 * 1024
TICK_S = 0.25
# Live leases the board can show at once (64 B each); beyond, consumers ask.
BOARD_SLOTS = 65536
# Bytes/s a link is assumed to carry before measurements say otherwise; only used to
# judge whether a minimum rate is about to slip.
LINK_CAPACITY = {"host": 10e9, "pcie": 25e9, "nvlink": 300e9}

R = TypeVar("R", bound=msgspec.Struct)
Reply = HandlesReply | BytesReply


@dataclass(frozen=True)
class Op(Generic[R]):
    """One broker operation: what it decodes, what it answers (also when refusing),
    and what runs it."""

    request: type[R]
    reply: type[Reply]
    run: Callable[[R, str], Awaitable[Reply]]


# The flow name spill, prefetch and bring-back copies carry on a link.
SPILL_FLOW = "gfaas-spill"


# A device pool kept in host shared memory, standing in for a GPU's: lets a CPU-only
# node (CI) run what a GPU node does with device pools, spilling included.
EMULATED = "emu:"


def pool_devices(configured: str = "") -> list[str]:
    """The devices this node pools: host memory, and every GPU CUDA can see, unless
    `configured` (GFAAS_POOL_DEVICES, comma-separated) names them."""
    if configured:
        named = [d.strip() for d in configured.split(",") if d.strip()]
        return ["cpu", *(d for d in dict.fromkeys(named) if d != "cpu")]
    return ["cpu", *(f"cuda:{i}" for i in range(cuda_device_count()))]


def device_backend(device: str, prefix: str) -> Backend:
    if device == "cpu":
        return host_backend(prefix)
    if device.startswith(EMULATED):
        return ShmBackend(device, prefix=prefix)
    return select_backend(device, fallback=False)


def host_backend(prefix: str) -> ShmBackend:
    """Host-memory slabs; pinned for the GPUs when this node has any."""
    if cuda_device_count() > 0:
        from shared.dataplane.cuda import PinnedShmBackend

        return PinnedShmBackend("cpu", prefix=prefix)
    return ShmBackend("cpu", prefix=prefix)


def gpu_engine(src: str, dst: str) -> CopyEngine:
    """Chunks on a dedicated stream of the GPU end of the link, an event per chunk."""
    from shared.dataplane.cuda import CudaCopyEngine

    return CudaCopyEngine(dst if dst.startswith("cuda") else src)


def link_kind(src: str, dst: str) -> str:
    if src == "cpu" and dst == "cpu":
        return "host"
    if src.startswith("cuda") and dst.startswith("cuda"):
        return "nvlink"
    return "pcie"


class Broker:
    def __init__(self, nc: NATS, settings: Settings, instance: str) -> None:
        self.nc = nc
        self.settings = settings
        self.board = LeaseBoard(board_name(settings.shm_namespace, settings.node), BOARD_SLOTS)
        self.pools = NodePools(
            node=settings.node,
            # Lease ids must stay unique across nodes and broker restarts.
            instance=f"{settings.node}-{instance}",
            default_ttl_s=settings.lease_ttl_s,
            board=self.board,
        )
        for device in pool_devices(settings.pool_devices):
            backend = device_backend(device, f"{settings.shm_namespace}-pool-")
            cap_mb = settings.pool_cap_mb
            if device == "cpu" and settings.host_pool_cap_mb:
                cap_mb = settings.host_pool_cap_mb
            config = ElasticConfig(
                slab_size=settings.slab_mb * MB,
                max_bytes=cap_mb * MB,
                cooldown_s=settings.pool_cooldown_s,
            )
            self.pools.add_device(device, backend, config)
        # A predecessor killed (SIGKILL, OOM) before its shutdown left its slabs in
        # /dev/shm, until reboot; the board it left went above, with LeaseBoard.
        left = self.pools.remove_leftovers()
        if left:
            log.warning("broker.leftovers_removed", segments=len(left), names=left[:8])
        # Checked here, so a bad GFAAS_LINK_MODE stops the broker at start.
        self.link_mode = Mode(settings.link_mode)
        self.copiers: dict[str, Copier] = {}
        # Largest `read` chunk: what fits one reply on this server.
        self.max_read = nc.max_payload - PAYLOAD_HEADROOM
        self.last_seen: dict[str, float] = {}
        # A holder silent only while we heard nobody (NATS down) keeps what it holds.
        self.health = BusHealth(settings.heartbeat_s, on_back=self.bus_back)
        self.copies = 0

    # -- requests ----------------------------------------------------------------------

    async def _answer(self, msg: Msg, op: Op[Any]) -> None:
        """Decode, run the op, reply; a refusal is the op's reply type with an error
        and a reason."""
        tenant = (msg.headers or {}).get(H_TENANT) or DEFAULT_TENANT
        kind, reply_kind = op.request, op.reply
        reply: Reply
        try:
            request = decode(msg.data, kind)
            reply = await op.run(request, tenant)
        except msgspec.MsgspecError as exc:
            reason = f"malformed {kind.__name__}: {exc}"
            reply = reply_kind(error=GfaasError(ErrorCode.BAD_REQUEST, reason).info())
        except GfaasError as exc:
            reply = reply_kind(error=exc.info())
            if not msg.reply:  # a published (unawaited) op: nobody to tell but the log
                log.info("broker.refused", subject=msg.subject, reason=exc.reason)
        except Exception as exc:  # a bug costs one request, not the broker
            log.exception("broker.request_failed", subject=msg.subject)
            reply = reply_kind(error=GfaasError(ErrorCode.INTERNAL, repr(exc)).info())
        if msg.reply:
            data = encode(reply)
            if len(data) > self.nc.max_payload:
                # Sending it would fail and leave the caller waiting for its timeout;
                # the ops bound their replies up front, so this is a missed bound.
                log.error("broker.reply_too_large", subject=msg.subject, nbytes=len(data))
                reason = (
                    f"the reply of {len(data)} bytes exceeds the bus's "
                    f"{self.nc.max_payload}-byte message limit; ask for less per request"
                )
                data = encode(reply_kind(error=GfaasError(ErrorCode.BAD_REQUEST, reason).info()))
            await msg.respond(data)

    async def refuse(self, msg: Msg, reason: str) -> None:
        if msg.reply:
            error = GfaasError(ErrorCode.BAD_REQUEST, reason).info()
            await msg.respond(encode(HandlesReply(error=error)))

    async def lease(self, req: LeaseRequest, tenant: str) -> HandlesReply:
        # Bounded before anything is allocated: leases whose reply cannot be sent
        # would be held, unknown to anyone, until their TTL.
        check_count(len(req.sizes), MAX_LEASES_PER_REQUEST, "leases")
        check_count(len(req.check), MAX_HANDLES_PER_REQUEST, "handles to check")
        if not req.sizes or any(n < 0 for n in req.sizes):
            raise GfaasError(ErrorCode.BAD_REQUEST, f"lease sizes must be >= 0: {req.sizes}")
        per_handle = handle_bound(
            pool=self.settings.node,
            device=req.device,
            tenant=tenant,
            lease_id_len=len(self.pools.table.id_prefix) + 16,
        )
        check_reply_fits(len(req.sizes), per_handle, self.nc.max_payload, "leases")
        self.pools.check(req.check, tenant)
        if req.retain:
            self.pools.retain(req.check, req.retain, tenant)
        try:
            handles = await self.pools.lease_or_spill(
                req.sizes, req.device, req.owner, tenant, req.ttl_s, time.monotonic(), self._move
            )
        except BaseException:
            if req.retain:  # all or none: no lease, no references
                for handle in req.check:
                    # One gone meanwhile (freed, expired) must not keep the others.
                    with contextlib.suppress(GfaasError):
                        self.pools.release([handle], req.retain, tenant, time.monotonic())
            raise
        return HandlesReply(handles=handles)

    async def check(self, req: HandlesRequest, tenant: str) -> HandlesReply:
        check_count(len(req.handles), MAX_HANDLES_PER_REQUEST, "handles")
        self.pools.check(req.handles, tenant)
        if req.holder:  # the checked handles stay live while the holder reads them
            self.pools.retain(req.handles, req.holder, tenant)
        return HandlesReply()

    async def retain(self, req: HandlesRequest, tenant: str) -> HandlesReply:
        check_count(len(req.handles), MAX_HANDLES_PER_REQUEST, "handles")
        self.pools.retain(req.handles, _named(req.holder, "holder"), tenant)
        return HandlesReply()

    async def release(self, req: HandlesRequest, tenant: str) -> HandlesReply:
        check_count(len(req.handles), MAX_HANDLES_PER_REQUEST, "handles")
        self.pools.release(req.handles, _named(req.holder, "holder"), tenant, time.monotonic())
        return HandlesReply()

    async def transfer(self, req: HandlesRequest, tenant: str) -> HandlesReply:
        check_count(len(req.handles), MAX_HANDLES_PER_REQUEST, "handles")
        self.pools.transfer(req.handles, _named(req.holder, "holder"), _named(req.to, "to"), tenant)
        return HandlesReply()

    async def park(self, req: HandlesRequest, tenant: str) -> HandlesReply:
        check_count(len(req.handles), MAX_HANDLES_PER_REQUEST, "handles")
        now = time.monotonic()
        next_use = now + req.next_use_s if req.next_use_s >= 0 else math.inf
        self.pools.park(req.handles, _named(req.holder, "holder"), tenant, next_use)
        return HandlesReply()

    async def unpark(self, req: HandlesRequest, tenant: str) -> HandlesReply:
        check_count(len(req.handles), MAX_HANDLES_PER_REQUEST, "handles")
        holder = _named(req.holder, "holder")
        return HandlesReply(
            handles=await self.pools.unpark(req.handles, holder, tenant, self._move)
        )

    async def read(self, req: ReadRequest, tenant: str) -> BytesReply:
        """A slice of a lease's bytes, for a consumer on another node."""
        self.pools.check([req.handle], tenant)
        h = req.handle
        end = h.nbytes if req.nbytes < 0 else req.offset + req.nbytes
        if req.offset < 0 or end > h.nbytes or end < req.offset:
            raise GfaasError(
                ErrorCode.BAD_REQUEST,
                f"read [{req.offset}, {end}) is outside the handle's {h.nbytes} bytes",
            )
        if end - req.offset > self.max_read:
            raise GfaasError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"read of {end - req.offset} bytes exceeds {self.max_read}; read in chunks",
            )
        view = tensor_from_handle(h, "uint8", [h.nbytes])[req.offset : end]
        return BytesReply(data=bytes(view.cpu().numpy()))

    async def copy(self, req: CopyRequest, tenant: str) -> HandlesReply:
        self.pools.lease_of(req.source, tenant)  # may the tenant read it here?
        now = time.monotonic()
        (dst,) = self.pools.lease([req.source.nbytes], req.device, req.owner, tenant, 0.0, now)
        budget_s = req.budget_ms / 1000.0
        try:
            await self._copy(
                req.source,
                dst,
                weight=req.weight,
                flow=req.flow or req.owner,
                budget_s=budget_s,
                compute_s=req.compute_ms / 1000.0,
            )
        except BaseException:
            self.pools.release([dst], req.owner, tenant, time.monotonic())
            raise
        self.copies += 1
        return HandlesReply(handles=[dst])

    async def _move(self, src: Handle, dst: Handle) -> None:
        """A parked lease's bytes to its new place (spill, prefetch, bring back): on the
        link's scheduler like every other copy, as its own flow."""
        await self._copy(src, dst, weight=1.0, flow=SPILL_FLOW)

    async def _copy(
        self,
        source: Handle,
        dst: Handle,
        *,
        weight: float,
        flow: str,
        budget_s: float = 0.0,
        compute_s: float = 0.0,
    ) -> None:
        """Chunk by chunk under the link's fair scheduler (shared.dataplane.bandwidth)."""
        nbytes = source.nbytes
        if nbytes == 0:
            return
        src_device = source.device
        src_view = tensor_from_handle(source, "uint8", [nbytes])
        dst_view = tensor_from_handle(dst, "uint8", [nbytes])
        link = f"{src_device}->{dst.device}"
        copier = self.copiers.get(link)
        if copier is None:
            cpu = src_view.device.type == "cpu" and dst_view.device.type == "cpu"
            scheduler = LinkScheduler(
                link,
                capacity=LINK_CAPACITY[link_kind(src_device, dst.device)],
                chunk_bytes=self.settings.copy_chunk_kb * 1024,
                mode=self.link_mode,
            )
            copier = Copier(scheduler, NumpyEngine() if cpu else gpu_engine(src_device, dst.device))
            self.copiers[link] = copier
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
        await asyncio.wrap_future(future)

    # -- liveness and housekeeping -----------------------------------------------------

    async def on_heartbeat(self, msg: Msg) -> None:
        hb = decode_event(msg, WorkerHeartbeat)
        if hb is None:
            return
        self.last_seen[hb.worker_id] = time.monotonic()

    async def on_alive(self, msg: Msg) -> None:
        self.last_seen[subjects.last_token(msg.subject)] = time.monotonic()

    def bus_back(self, at: float) -> None:
        """Back after a silence of the bus: nobody lost their references through it."""
        self.last_seen = {holder: max(seen, at) for holder, seen in self.last_seen.items()}

    def tick(self) -> None:
        now = time.monotonic()
        for worker, seen in list(self.last_seen.items()):
            if self.health.healthy(now) and now - seen > self.settings.worker_timeout_s:
                del self.last_seen[worker]
                freed = self.pools.reclaim(worker, now)
                log.warning("worker.lost", worker=worker, leases_reclaimed=freed)
        self.pools.tick(now)

    def details(self) -> dict[str, object]:
        stats = self.pools.stats()
        stats["copies"] = self.copies
        stats["links"] = {
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
        return stats

    def close(self) -> None:
        for copier in self.copiers.values():
            copier.close()
        self.pools.close()
        self.board.close()


def _named(value: str, what: str) -> str:
    if not value:
        raise GfaasError(ErrorCode.BAD_REQUEST, f"{what} must be named")
    return value


async def serve(
    settings: Settings,
    stop: anyio.Event,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    instance = f"{socket.gethostname()}-{os.getpid()}"
    async with connected(settings.nats_url, "gfaas-memory-broker") as nc:
        broker = Broker(nc, settings, instance)
        try:
            ops: dict[str, Op[Any]] = {
                "lease": Op(LeaseRequest, HandlesReply, broker.lease),
                "check": Op(HandlesRequest, HandlesReply, broker.check),
                "retain": Op(HandlesRequest, HandlesReply, broker.retain),
                "release": Op(HandlesRequest, HandlesReply, broker.release),
                "transfer": Op(HandlesRequest, HandlesReply, broker.transfer),
                "park": Op(HandlesRequest, HandlesReply, broker.park),
                "unpark": Op(HandlesRequest, HandlesReply, broker.unpark),
                "copy": Op(CopyRequest, HandlesReply, broker.copy),
                "read": Op(ReadRequest, BytesReply, broker.read),
            }
            async with anyio.create_task_group() as copies:

                async def on_request(msg: Msg) -> None:
                    # One subscription for every op, so requests are handled in the
                    # order they arrived: a transfer published (not awaited) by a
                    # worker is done before the release its caller sends next. Copies
                    # take long: they run beside, out of that order.
                    op = subjects.last_token(msg.subject)
                    entry = ops.get(op)
                    if entry is None:
                        await broker.refuse(msg, f"unknown broker operation {op!r}")
                    elif op == "copy":
                        copies.start_soon(broker._answer, msg, entry)
                    else:
                        await broker._answer(msg, entry)

                await nc.subscribe(subjects.broker_all(settings.node), cb=on_request)
                await nc.subscribe(subjects.HEARTBEAT_ALL, cb=broker.on_heartbeat)
                await nc.subscribe(subjects.ALIVE_ALL, cb=broker.on_alive)
                await serve_status(nc, "memory-broker", instance, broker.details)
                task_status.started()

                async def ticker() -> None:
                    while True:
                        await anyio.sleep(TICK_S)
                        broker.tick()
                        await broker.pools.prefetch(time.monotonic(), broker._move)

                copies.start_soon(ticker)
                copies.start_soon(watch_bus, nc, broker.health, f"broker-{settings.node}")
                await stop.wait()
                copies.cancel_scope.cancel()
        finally:
            # The broker is the node's memory owner: at its shutdown its pools and the
            # host tier go, so no segment outlives the platform.
            broker.close()
            HostTier(tier_prefix(settings.shm_namespace)).purge()

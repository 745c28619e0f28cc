"""The memory broker: one per node, owner of the pooled buffers and the links.

It outlives workers, so data survives a worker crash. Requests on
`gfaas.v1.broker.<node>.<op>`: lease (pooled buffers, one handle each), check (may
this tenant read these handles? for a holder, also keep them while it reads), retain /
release (reference counts for fan-out), transfer (a worker hands its outputs'
references to the caller), park / unpark (nobody reads these meanwhile: they may be
spilled), copy (leased bytes to another device, chunked through the link's fair
scheduler), read (bytes for another node). Every refusal is the op's reply with an
error code and reason; nothing is read or written out of bounds.

This module is the wiring: the connection, one subscription for every op (decoding
and refusals happen here, once), liveness and the periodic tick. The ops are in
handlers.py, the pools in pools.py, the links in links.py, the devices in devices.py.

Owner liveness comes from worker heartbeats: a worker silent for longer than the
timeout loses its references. TTLs free what callers forget. Pools grow under
demand and give idle slabs back (shared.dataplane.elastic).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind

from services.memory_broker.devices import pool_configs
from services.memory_broker.handlers import Handlers, Op, Reply
from services.memory_broker.links import Links
from services.memory_broker.pools import NodePools
from shared import metrics, subjects, tracing
from shared.bus import BusHealth, connected, decode_event, serve_status, watch_bus
from shared.config import Settings
from shared.dataplane.bandwidth import Mode
from shared.dataplane.board import LeaseBoard, board_name
from shared.errors import GfaasError, described
from shared.logs import get_logger
from shared.modelswap import HostTier, tier_prefix
from shared.names import is_valid_name, name_problem
from shared.schema import (
    DEFAULT_TENANT,
    H_TENANT,
    ErrorCode,
    HandlesReply,
    WorkerHeartbeat,
    decode,
    encode,
)
from shared.service import every, instance_name

log = get_logger("memory_broker")

TICK_S = 0.25
# Live leases the board can show at once (64 B each); beyond, consumers ask.
BOARD_SLOTS = 65536


def caller_tenant(msg: Msg) -> str:
    """The tenant a request acts for: its `Gfaas-Tenant` header, as every gfaas
    service has it until authentication vouches for it (the lease table checks it
    against each lease, in `LeaseTable.owned`)."""
    tenant = (msg.headers or {}).get(H_TENANT) or DEFAULT_TENANT
    if not is_valid_name(tenant):
        raise GfaasError(ErrorCode.BAD_REQUEST, name_problem("tenant", tenant))
    return tenant


class Broker:
    def __init__(self, nc: NATS, settings: Settings, instance: str) -> None:
        self.nc = nc
        self.settings = settings
        # Checked first, so a bad GFAAS_LINK_MODE stops the broker before it maps anything.
        self.links = Links(chunk_bytes=settings.copy_chunk_kb * 1024, mode=Mode(settings.link_mode))
        self.board = LeaseBoard(board_name(settings.shm_namespace, settings.node), BOARD_SLOTS)
        try:
            self._start(nc, settings, instance)
        except BaseException:
            # A broker that cannot start (a pool device this node cannot back) takes
            # its board with it: serve's `finally` only closes a broker that started.
            self.board.close()
            raise

    def _start(self, nc: NATS, settings: Settings, instance: str) -> None:
        self.pools = NodePools(
            node=settings.node,
            # Lease ids must stay unique across nodes and broker restarts.
            instance=f"{settings.node}-{instance}",
            default_ttl_s=settings.lease_ttl_s,
            links=self.links,
            board=self.board,
            max_ttl_s=settings.max_lease_ttl_s,
            tenant_bytes=settings.tenant_pool_mb * 1024 * 1024,
            tenant_leases=settings.tenant_max_leases,
        )
        for device, backend, config in pool_configs(settings):
            self.pools.add_device(device, backend, config)
        # A predecessor killed (SIGKILL, OOM) before its shutdown left its slabs in
        # /dev/shm, until reboot; the board it left went above, with LeaseBoard.
        left = self.pools.remove_leftovers()
        if left:
            log.warning("broker.leftovers_removed", segments=len(left), names=left[:8])
        self.handlers = Handlers(self.pools, self.links, max_payload=nc.max_payload)
        self.ops = self.handlers.ops()
        self.last_seen: dict[str, float] = {}
        # A holder silent only while we heard nobody (NATS down) keeps what it holds.
        self.health = BusHealth(settings.heartbeat_s, on_back=self.bus_back)
        # Pool gauges read a snapshot the loop refreshes each tick (shared.metrics).
        self.metrics = metrics.BrokerMetrics(metrics.noop())

    # -- requests ----------------------------------------------------------------------

    async def answer(self, msg: Msg, op: Op[Any]) -> None:
        """Decode, run the op, reply; a refusal is the op's reply type with an error
        and a reason."""
        kind, reply_kind = op.request, op.reply
        reply: Reply
        # A span for each op under the caller's trace context (ops outside any trace,
        # such as housekeeping releases, open none: they would each be a trace).
        traced = tracing.has_parent(msg.headers)
        with (
            tracing.handling_span(
                f"broker {subjects.last_token(msg.subject)}",
                msg.headers,
                kind=SpanKind.SERVER,
                attributes=tracing.nats_attributes(
                    msg.subject,
                    "process" if msg.reply else "receive",
                    tenant=(msg.headers or {}).get(H_TENANT) or DEFAULT_TENANT,
                ),
            )
            if traced
            else contextlib.nullcontext(None)
        ) as span:
            try:
                tenant = caller_tenant(msg)
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
                reply = reply_kind(error=GfaasError(ErrorCode.INTERNAL, described(exc)).info())
            if span is not None and reply.error is not None:
                tracing.mark_error(span, reply.error.code, reply.error.reason)
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
        self.snapshot_metrics()

    def snapshot_metrics(self) -> None:
        """What the pool gauges read, taken on the loop (scrapes run in a thread)."""
        table = self.pools.table
        usage = {device: table.usage(device) for device in self.pools.devices}
        links = {link: c.scheduler.stats() for link, c in self.links.copiers.items()}
        self.metrics.snapshot = metrics.PoolSnapshot(
            leased={d: u.bytes_leased for d, u in usage.items()},
            held={d: u.alloc.held for d, u in usage.items()},
            slabs={d: u.alloc.slabs for d, u in usage.items()},
            leases=len(table),
            spills=self.pools.spilled,
            link_bytes={
                (link, flow): n
                for link, stats in links.items()
                for flow, n in stats.bytes_by_flow.items()
            },
            link_busy_s={link: stats.busy_s for link, stats in links.items()},
        )

    def details(self) -> dict[str, object]:
        stats = self.pools.stats()
        stats["copies"] = self.handlers.copies
        stats["links"] = self.links.stats()
        return stats

    def close(self) -> None:
        self.links.close()
        self.pools.close()
        self.board.close()


async def serve(
    settings: Settings,
    stop: anyio.Event,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    instance = instance_name()
    async with connected(settings.nats_url, "gfaas-memory-broker", settings=settings) as nc:
        broker = Broker(nc, settings, instance)
        try:
            async with anyio.create_task_group() as tasks:

                async def on_request(msg: Msg) -> None:
                    # One subscription for every op, so requests are handled in the
                    # order they arrived: a transfer published (not awaited) by a
                    # worker is done before the release its caller sends next. Ops the
                    # table marks concurrent (copies: they take long) run beside, out
                    # of that order.
                    op = subjects.last_token(msg.subject)
                    entry = broker.ops.get(op)
                    if entry is None:
                        await broker.refuse(msg, f"unknown broker operation {op!r}")
                    elif entry.concurrent:
                        tasks.start_soon(broker.answer, msg, entry)
                    else:
                        await broker.answer(msg, entry)

                await nc.subscribe(subjects.broker_all(settings.node), cb=on_request)
                await nc.subscribe(subjects.HEARTBEAT_ALL, cb=broker.on_heartbeat)
                await nc.subscribe(subjects.ALIVE_ALL, cb=broker.on_alive)
                # Metrics: the Prometheus endpoint (its port in our status), closed
                # with `tasks`; the pool gauges read the broker's snapshot.
                telemetry = await tasks.start(
                    metrics.serve, settings, "memory-broker", instance, lambda: nc.is_connected
                )
                broker.metrics = metrics.BrokerMetrics(telemetry.meter)
                broker.snapshot_metrics()
                await serve_status(nc, "memory-broker", instance, broker.details)
                task_status.started()

                async def tick() -> None:
                    broker.tick()
                    await broker.pools.prefetch(time.monotonic())

                tasks.start_soon(every, TICK_S, tick)
                tasks.start_soon(watch_bus, nc, broker.health, f"broker-{settings.node}")
                await stop.wait()
                tasks.cancel_scope.cancel()
        finally:
            # The broker is the node's memory owner: at its shutdown its pools and the
            # host tier go, so no segment outlives the platform.
            broker.close()
            HostTier(tier_prefix(settings.shm_namespace)).purge()

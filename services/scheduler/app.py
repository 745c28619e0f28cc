"""The scheduler: assigns validated invocations to workers.

It reads only headers (the body is forwarded untouched), asks the configured pure
policy for a worker, and forwards the message with the caller's reply subject so
the worker answers the caller directly. It queues work when every worker is full,
and answers for invocations whose worker died.
"""

from __future__ import annotations

import os
import socket
import time

import anyio
import msgspec
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind

from services.scheduler.state import ClusterState, Invocation
from shared import subjects, tracing
from shared.bus import connected, reply_error, serve_status
from shared.config import Settings
from shared.logs import get_logger
from shared.registry import Registry
from shared.scheduling import Policy, RequestView, make_policy
from shared.schema import (
    Done,
    ErrorCode,
    FunctionSpec,
    InvocationMeta,
    WorkerHeartbeat,
    decode,
    now_millis,
)

log = get_logger("scheduler")

TICK_S = 0.1


class Scheduler:
    def __init__(
        self, nc: NATS, registry: Registry[FunctionSpec], policy: Policy, settings: Settings
    ) -> None:
        self.nc = nc
        self.registry = registry
        self.policy = policy
        self.state = ClusterState(
            worker_timeout_s=settings.worker_timeout_s, pending_limit=settings.pending_limit
        )
        self.assigned = 0

    # -- events -------------------------------------------------------------------------

    async def on_schedule(self, msg: Msg) -> None:
        try:
            meta = InvocationMeta.from_headers(msg.headers)
        except ValueError as exc:
            await reply_error(self.nc, msg.reply, "", ErrorCode.BAD_REQUEST, str(exc))
            return
        with tracing.handling_span(
            "scheduler assign",
            msg.headers,
            kind=SpanKind.CONSUMER,
            invocation_id=meta.invocation_id,
            attributes={"gfaas.function": meta.function},
        ) as span:
            spec = await self.registry.lookup(meta.function)
            if spec is None:
                tracing.mark_error(span, ErrorCode.UNKNOWN_FUNCTION, meta.function)
                await reply_error(
                    self.nc,
                    msg.reply,
                    meta.invocation_id,
                    ErrorCode.UNKNOWN_FUNCTION,
                    f"function {meta.function!r} is not deployed",
                )
                return
            headers = tracing.inject(meta.to_headers())
            inv = Invocation(
                meta=meta,
                reply=msg.reply,
                body=msg.data,
                headers=headers,
                view=RequestView(
                    invocation_id=meta.invocation_id,
                    function=spec.name,
                    kind=spec.kind,
                    model=spec.model,
                    arrived_at=time.monotonic(),
                    deadline=meta.deadline_ms / 1000.0 if meta.deadline_ms else float("inf"),
                    slo_ms=spec.slo_ms,
                ),
            )
            if not self.state.workers:
                tracing.mark_error(span, ErrorCode.NO_WORKER, "no workers")
                await reply_error(
                    self.nc,
                    msg.reply,
                    meta.invocation_id,
                    ErrorCode.NO_WORKER,
                    "no worker is available; start one with `gfaas serve gpu-worker`",
                )
                return
            worker = self.policy.choose(inv.view, self.state.views(), time.monotonic())
            if worker is not None:
                span.set_attribute("gfaas.worker", worker)
                await self._dispatch(worker, inv)
            elif not self.state.enqueue(inv):
                await reply_error(
                    self.nc,
                    msg.reply,
                    meta.invocation_id,
                    ErrorCode.OVERLOADED,
                    f"all workers are busy and {self.state.pending_limit} requests are queued",
                )

    async def on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = decode(msg.data, WorkerHeartbeat)
        except msgspec.MsgspecError as exc:
            log.warning("heartbeat.malformed", error=str(exc))
            return
        if self.state.observe(hb, time.monotonic()):
            log.info("worker.joined", worker=hb.worker_id, device=hb.device)
            await self._drain_pending()

    async def on_done(self, msg: Msg) -> None:
        try:
            done = decode(msg.data, Done)
        except msgspec.MsgspecError as exc:
            log.warning("done.malformed", error=str(exc))
            return
        self.state.finish(done.worker_id, done.invocation_id)
        if self.state.pending:
            await self._drain_pending()

    async def tick(self) -> None:
        now = time.monotonic()
        for worker_id, lost in self.state.reap(now):
            log.warning("worker.lost", worker=worker_id, inflight=len(lost))
            for inv in lost:
                await reply_error(
                    self.nc,
                    inv.reply,
                    inv.meta.invocation_id,
                    ErrorCode.WORKER_LOST,
                    f"worker {worker_id} stopped answering while running this invocation",
                )
        for inv in self.state.expire_pending(now_millis()):
            await reply_error(
                self.nc,
                inv.reply,
                inv.meta.invocation_id,
                ErrorCode.DEADLINE_EXCEEDED,
                "deadline passed while waiting for a free worker",
            )
        if self.state.pending:
            await self._drain_pending()

    # -- helpers ------------------------------------------------------------------------

    async def _dispatch(self, worker_id: str, inv: Invocation) -> None:
        self.state.assign(worker_id, inv)
        self.assigned += 1
        await self.nc.publish(
            subjects.worker_run(worker_id), inv.body, reply=inv.reply, headers=inv.headers
        )

    async def _drain_pending(self) -> None:
        now = time.monotonic()
        while self.state.pending:
            inv = self.state.pending[0]
            worker = self.policy.choose(inv.view, self.state.views(), now)
            if worker is None:
                return
            self.state.pending.popleft()
            await self._dispatch(worker, inv)

    def details(self) -> dict[str, object]:
        return {
            "policy": self.policy.name,
            "assigned": self.assigned,
            "pending": len(self.state.pending),
            "workers": {
                wid: {
                    "device": b.view.device,
                    "capacity": b.view.capacity,
                    "outstanding": b.view.outstanding,
                    "resident": sorted(b.view.resident),
                    "memory_free": b.view.memory_free,
                }
                for wid, b in self.state.workers.items()
            },
        }


async def serve(
    settings: Settings,
    stop: anyio.Event,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    instance = f"{socket.gethostname()}-{os.getpid()}"
    async with connected(settings.nats_url, "gfaas-scheduler") as nc:
        registry = await Registry.open(nc.jetstream())
        scheduler = Scheduler(nc, registry, make_policy(settings.policy), settings)
        async with anyio.create_task_group() as tg:
            await tg.start(registry.watch)
            # Heartbeats first, so a restarted scheduler learns the workers before
            # it is asked to place anything.
            await nc.subscribe(subjects.HEARTBEAT_ALL, cb=scheduler.on_heartbeat)
            await nc.subscribe(subjects.DONE, cb=scheduler.on_done)
            await anyio.sleep(min(settings.heartbeat_s * 1.5, 1.0))
            schedule_sub = await nc.subscribe(
                subjects.SCHEDULE, queue=subjects.Q_SCHEDULER, cb=scheduler.on_schedule
            )
            await serve_status(nc, "scheduler", instance, scheduler.details)
            task_status.started()

            async def ticker() -> None:
                while True:
                    await anyio.sleep(TICK_S)
                    await scheduler.tick()

            tg.start_soon(ticker)
            await stop.wait()
            await schedule_sub.drain()
            tg.cancel_scope.cancel()

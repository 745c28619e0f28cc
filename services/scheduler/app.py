"""The scheduler: assigns validated invocations to workers.

It reads only headers (the body is forwarded untouched), asks the configured pure
policy for a worker, and forwards the message with the caller's reply subject so
the worker answers the caller directly. It queues work when every worker is full,
and answers for invocations whose worker died.

Decisions are shared.scheduling's, the code the simulator runs: `decide` for a
new invocation (an admitting policy such as `slo` may refuse it at once) and
`plan` over the queue (out-of-order dispatch for `locality`). This module only
gathers the views (state.py) and acts on the answers.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import time

import anyio
import msgspec
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.trace import SpanKind

from services.scheduler.leader import Leadership
from services.scheduler.state import ClusterState, Invocation, Lent
from shared import jetstream, subjects, tracing
from shared.bus import BusHealth, connected, decode_event, reply_error, serve_status, watch_bus
from shared.config import Settings
from shared.logs import get_logger
from shared.modelstore import ModelStore
from shared.registry import Registry
from shared.scheduling import Policy, Rejected, decide, make_policy, plan
from shared.schema import (
    H_AFFINITY,
    H_INGRESS,
    H_INVOCATION,
    Done,
    ErrorCode,
    FunctionSpec,
    Grant,
    InvocationMeta,
    SchedulerBeat,
    WorkerHeartbeat,
    WorkerLost,
    encode,
    now_millis,
)

log = get_logger("scheduler")


TICK_S = 0.1
# Queued requests shown to one `plan` call (the simulator's default too).
PLAN_WINDOW = 256


class Scheduler:
    def __init__(
        self,
        nc: NATS,
        registry: Registry[FunctionSpec],
        policy: Policy,
        settings: Settings,
        models: ModelStore | None = None,
    ) -> None:
        self.nc = nc
        self.registry = registry
        self.policy = policy
        self.models = models
        self.grant_ttl_s = settings.grant_ttl_s
        self.revoked = 0
        self.state = ClusterState(
            worker_timeout_s=settings.worker_timeout_s, pending_limit=settings.pending_limit
        )
        self.assigned = 0
        self.leadership: Leadership | None = None
        # Is the bus up? A worker silent while we heard nobody is not lost.
        self.health = BusHealth(settings.heartbeat_s, on_back=self.state.bus_back)
        # Models whose size was asked of the object store (once each).
        self._sized: set[str] = set()

    # -- events -------------------------------------------------------------------------

    async def on_schedule(self, msg: Msg) -> None:
        try:
            meta = InvocationMeta.from_headers(msg.headers)
            bad = meta.routing_problem()
        except ValueError as exc:
            bad = str(exc)
        if bad:
            iid = (msg.headers or {}).get(H_INVOCATION, "")
            await reply_error(self.nc, msg.reply, iid, ErrorCode.BAD_REQUEST, bad)
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
            if spec.model and spec.model not in self.state.model_bytes:
                await self._learn_size(spec.model)
            headers = tracing.inject(meta.to_headers())
            now = time.monotonic()
            inv = Invocation(
                meta=meta,
                reply=msg.reply,
                body=msg.data,
                headers=headers,
                view=self.state.request_view(spec, meta, now, now_millis()),
            )
            near = (msg.headers or {}).get(H_AFFINITY)
            ingress = (msg.headers or {}).get(H_INGRESS, "")
            if near:
                inv.view = dataclasses.replace(inv.view, near=near)
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
            decision = decide(self.policy, inv.view, self.state.views(), now)
            if isinstance(decision, Rejected):
                tracing.mark_error(span, ErrorCode.OVERLOADED, decision.reason)
                await self._reject(inv, decision.reason)
            elif decision is not None:
                span.set_attribute("gfaas.worker", decision)
                await self._dispatch(decision, inv, now)
                if ingress and self.grant_ttl_s > 0:
                    await self._lend(ingress, inv, spec, decision, now)
            elif self.state.enqueue(inv):
                # Work waits: lent slots are wanted back.
                await self._revoke(self.state.revoke())
            else:
                await reply_error(
                    self.nc,
                    msg.reply,
                    meta.invocation_id,
                    ErrorCode.OVERLOADED,
                    f"all workers are busy and {self.state.pending_limit} requests are queued",
                )

    async def hand_over(self) -> None:
        """No longer active: what waits here is answered `unavailable` (the caller, or
        the async path, tries again with whoever is active now)."""
        for inv in self.state.drop_pending():
            await reply_error(
                self.nc,
                inv.reply,
                inv.meta.invocation_id,
                ErrorCode.UNAVAILABLE,
                "the scheduler holding this invocation stopped before placing it",
            )

    async def on_heartbeat(self, msg: Msg) -> None:
        hb = decode_event(msg, WorkerHeartbeat)
        if hb is None:
            return
        if self.state.observe(hb, time.monotonic()):
            log.info("worker.joined", worker=hb.worker_id, device=hb.device)
            await self._drain_pending()
        if hb.capacity == 0:  # draining: it takes nothing more, direct sends included
            await self._revoke(self.state.revoke(hb.worker_id))

    async def on_alive(self, msg: Msg) -> None:
        self.state.ingress_seen[subjects.last_token(msg.subject)] = time.monotonic()

    async def on_grant_return(self, msg: Msg) -> None:
        grant = decode_event(msg, Grant)
        if grant is None:
            return
        if self.state.give_back(grant.worker_id, grant.grant_id) and self.state.pending:
            await self._drain_pending()

    async def on_done(self, msg: Msg) -> None:
        done = decode_event(msg, Done)
        if done is None:
            return
        if subjects.is_scheduled_done(msg.subject):
            self.state.done(done, time.monotonic())
        else:
            self.state.done_direct(done)
        if self.state.pending:
            await self._drain_pending()

    async def tick(self) -> None:
        now = time.monotonic()
        self.state.lapsed(now)  # slots freed here are used by the drain below
        reaped = self.state.reap(now) if self.health.healthy(now) else []
        for worker_id, lost in reaped:
            log.warning("worker.lost", worker=worker_id, inflight=len(lost))
            # Ingress answers for what it sent there directly.
            reason = f"worker {worker_id} stopped answering"
            await self.nc.publish(
                subjects.WORKER_LOST, encode(WorkerLost(worker_id=worker_id, reason=reason))
            )
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

    async def _dispatch(self, worker_id: str, inv: Invocation, now: float) -> None:
        self.state.assign(worker_id, inv, now)
        self.assigned += 1
        await self._send(worker_id, inv)

    async def _lend(
        self, ingress: str, inv: Invocation, spec: FunctionSpec, worker_id: str, now: float
    ) -> None:
        grant = self.state.lend(ingress, inv, spec, worker_id, self.grant_ttl_s, now)
        if grant is not None:
            try:
                subject = subjects.grants(ingress)
            except ValueError:  # not a token: that ingress cannot be answered
                self.state.give_back(worker_id, grant.grant_id)
                return
            await self.nc.publish(subject, encode(grant))

    async def _revoke(self, revoked: list[Lent]) -> None:
        self.revoked += len(revoked)
        for lent in revoked:
            revoke = msgspec.structs.replace(lent.grant, slots=0)
            await self.nc.publish(subjects.grants(lent.ingress), encode(revoke))

    async def _send(self, worker_id: str, inv: Invocation) -> None:
        await self.nc.publish(
            subjects.worker_run(worker_id), inv.body, reply=inv.reply, headers=inv.headers
        )

    async def _reject(self, inv: Invocation, reason: str) -> None:
        """Answer for an invocation the policy refused (its SLO cannot be met)."""
        self.state.reject(inv)
        meta = inv.meta
        late = bool(meta.deadline_ms) and meta.deadline_ms <= now_millis()
        code = ErrorCode.DEADLINE_EXCEEDED if late else ErrorCode.OVERLOADED
        view = inv.view
        await reply_error(
            self.nc,
            inv.reply,
            meta.invocation_id,
            code,
            f"{view.function!r} cannot meet its SLO of {view.slo_ms:g} ms: {reason}",
        )

    async def _learn_size(self, model: str) -> None:
        """A model's size from the object store, before any worker has loaded it."""
        if self.models is None or model in self._sized:
            return
        self._sized.add(model)
        try:
            size = await self.models.size(model)
        except Exception as exc:  # the size is a hint; placement works without it
            log.warning("model.size_unknown", model=model, error=repr(exc))
            return
        if size:
            self.state.model_bytes.setdefault(model, size)

    async def _drain_pending(self) -> None:
        now = time.monotonic()
        queue = self.state.queue(PLAN_WINDOW, with_rrc=hasattr(self.policy, "order"))
        result = plan(self.policy, queue, self.state.views(), now)
        # Books first, with no await in between, so the plan's views stay true.
        sends = []
        for invocation_id, worker_id in result.assignments:
            inv = self.state.take(invocation_id)
            self.state.assign(worker_id, inv, now)
            self.assigned += 1
            sends.append((worker_id, inv))
        refused = [(self.state.take(r.invocation_id), r.reason) for r in result.rejected]
        for worker_id, inv in sends:
            await self._send(worker_id, inv)
        for inv, reason in refused:
            await self._reject(inv, reason)

    def details(self) -> dict[str, object]:
        leadership = self.leadership
        return {
            "active": leadership is not None and leadership.active,
            "terms": leadership.terms if leadership is not None else 0,
            "policy": self.policy.name,
            "assigned": self.assigned,
            "rejected": self.state.rejected,
            "pending": len(self.state.pending),
            "grants_revoked": self.revoked,
            "grants": [
                {
                    "function": lent.grant.function,
                    "worker": lent.grant.worker_id,
                    "ingress": lent.ingress,
                    "slots": lent.grant.slots,
                    "revoked": lent.revoked,
                }
                for lent in self.state.lent()
            ],
            "model_bytes": dict(self.state.model_bytes),
            "exec_ms": {f: round(s * 1000.0, 3) for f, s in self.state.exec_s.items()},
            "workers": {
                wid: {
                    "device": b.view.device,
                    "capacity": b.view.capacity,
                    "outstanding": b.view.outstanding,
                    "resident": sorted(b.view.resident),
                    "memory_free": b.view.memory_free,
                    "link_bandwidth": round(b.view.profile.link_bandwidth),
                    "swap_overhead_ms": round(b.view.profile.swap_overhead_s * 1000.0, 3),
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
    scheduler_id = f"{instance}-{secrets.token_hex(3)}"
    async with connected(settings.nats_url, "gfaas-scheduler") as nc:
        js = nc.jetstream()
        registry = await Registry.open(js, replicas=settings.js_replicas)
        models = await ModelStore.open(js, replicas=settings.js_replicas)
        leadership = Leadership(
            await jetstream.leader_kv(
                js, ttl_s=settings.scheduler_timeout_s, replicas=settings.js_replicas
            ),
            scheduler_id,
            settings.scheduler_timeout_s,
        )
        scheduler = Scheduler(nc, registry, make_policy(settings.policy), settings, models)
        scheduler.leadership = leadership
        async with anyio.create_task_group() as tg:
            await tg.start(registry.watch)
            # Heartbeats first, so a restarted scheduler learns the workers before
            # it is asked to place anything.
            await nc.subscribe(subjects.HEARTBEAT_ALL, cb=scheduler.on_heartbeat)
            await nc.subscribe(subjects.DONE_ALL, cb=scheduler.on_done)
            await nc.subscribe(subjects.GRANT_RETURN, cb=scheduler.on_grant_return)
            await nc.subscribe(subjects.ALIVE_ALL, cb=scheduler.on_alive)
            await anyio.sleep(min(settings.heartbeat_s * 1.5, 1.0))
            await serve_status(nc, "scheduler", scheduler_id, scheduler.details)
            active = Active(nc, scheduler)
            await active.follow(await leadership.keep())
            task_status.started()

            async def lead() -> None:
                # Renew (or try to take) the lease and say where we stand, often
                # enough that ingress and the standbys notice a death within the timeout.
                period = min(settings.heartbeat_s, settings.scheduler_timeout_s / 3.0)
                while True:
                    try:
                        await active.follow(await leadership.keep())
                        beat = SchedulerBeat(scheduler_id=scheduler_id, active=leadership.active)
                        await nc.publish(subjects.SCHEDULER_ALIVE, encode(beat))
                    except Exception as exc:  # the bus is flaky: the next round may not be
                        log.warning("scheduler.lead_failed", error=repr(exc))
                    await anyio.sleep(period)

            async def ticker() -> None:
                while True:
                    await anyio.sleep(TICK_S)
                    if leadership.active:
                        await scheduler.tick()

            tg.start_soon(watch_bus, nc, scheduler.health, scheduler_id)
            tg.start_soon(lead)
            tg.start_soon(ticker)
            await stop.wait()
            await active.follow(False)
            await leadership.resign()
            beat = SchedulerBeat(scheduler_id=scheduler_id, active=False)
            await nc.publish(subjects.SCHEDULER_ALIVE, encode(beat))
            tg.cancel_scope.cancel()


class Active:
    """The schedule subscription, held only while this scheduler holds the lease."""

    def __init__(self, nc: NATS, scheduler: Scheduler) -> None:
        self.nc = nc
        self.scheduler = scheduler
        self.sub: Subscription | None = None

    async def follow(self, active: bool) -> None:
        if active and self.sub is None:
            self.sub = await self.nc.subscribe(
                subjects.SCHEDULE, queue=subjects.Q_SCHEDULER, cb=self.scheduler.on_schedule
            )
            log.info("scheduler.active")
        elif not active and self.sub is not None:
            sub, self.sub = self.sub, None
            await sub.drain()
            await self.scheduler.hand_over()
            log.info("scheduler.standby")

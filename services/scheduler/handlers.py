"""The scheduler's handlers: plain async methods over decoded messages.

A new invocation is placed by `decide` (an admitting policy such as `slo` may
refuse it at once); the queue by `plan` (out-of-order dispatch for `locality`):
shared.scheduling's decisions, the code the simulator runs. These methods gather
the views (state.py), act on the answers, and reach the bus only through `Bus`
(app.py passes the NATS one; tests pass a fake).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Mapping

import anyio
import msgspec
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode

from services.scheduler.instances import Instances, Observed
from services.scheduler.leader import Leadership
from services.scheduler.state import ClusterState, Invocation, Lent, WorkerBook
from shared import subjects, tracing
from shared.bus import Bus, BusHealth
from shared.config import Settings
from shared.logs import get_logger
from shared.metrics import SchedulerMetrics, noop
from shared.modelstore import ModelStore
from shared.registry import Registry
from shared.scheduling import Decision, Policy, Rejected, decide, plan
from shared.schema import (
    H_AFFINITY,
    AgentBeat,
    Done,
    ErrorCode,
    FunctionSpec,
    Grant,
    InvocationMeta,
    Refused,
    RefusedReply,
    SchedulerBeat,
    WorkerHeartbeat,
    WorkerLost,
    encode,
    now_millis,
)

log = get_logger("scheduler")

# Queued requests shown to one `plan` call (the simulator's default too).
PLAN_WINDOW = 256
# Functions whose latest scale from zero `details` shows, step by step.
COLD_KEPT = 32
# Instances an invocation may lose while they start (each dying before it was ready)
# before its caller hears `worker_lost`: a function whose starts keep crashing does
# not keep its callers waiting until their deadlines.
MAX_LOST_STARTS = 2


class Scheduler:
    # Decision-time histogram, queue-depth gauge; app.py sets the served one.
    metrics: SchedulerMetrics = SchedulerMetrics(noop())

    def __init__(
        self,
        bus: Bus,
        registry: Registry[FunctionSpec],
        policy: Policy,
        settings: Settings,
        models: ModelStore | None = None,
    ) -> None:
        self.bus = bus
        self.registry = registry
        self.policy = policy
        self.models = models
        self.grant_ttl_s = settings.grant_ttl_s
        self.supervised = settings.supervised
        self.revoked = 0
        self.state = ClusterState(
            worker_timeout_s=settings.worker_timeout_s, pending_limit=settings.pending_limit
        )
        self.assigned = 0
        # Invocations workers at capacity handed back, placed again or queued here.
        self.replaced = 0
        self.leadership: Leadership | None = None
        # Is the bus up? A worker silent while we heard nobody is not lost.
        self.health = BusHealth(settings.heartbeat_s, on_back=self.state.bus_back)
        # Models whose size was asked of the object store (once each).
        self._sized: set[str] = set()
        # Function instances: agents' devices, and the autoscaler carried out.
        self.instances = Instances(
            bus,
            registry,
            settings.worker_timeout_s,
            model_bytes=self.state.model_bytes,
            surplus_idle_s=settings.surplus_idle_s if settings.surplus_idle_s >= 0.0 else None,
        )
        # Function -> its latest scale from zero: when each step of it happened here,
        # on the wall clock (bench/coldstart.py lines it up with the instance's).
        self.cold: dict[str, dict[str, float]] = {}
        # Invocation -> its open "scale from zero" span, ended when it is dispatched.
        self._cold_spans: dict[str, tuple[Span, float]] = {}  # and since when (monotonic)
        # Set by the next active scheduler's beat after this one stepped down.
        self._successor = anyio.Event()
        # The other schedulers running (not stopping): when each last beat.
        self._peers: dict[str, float] = {}
        # Invocations that waited here when it stepped down, sent on to its successor.
        self.handed_over = 0

    # -- events -------------------------------------------------------------------------

    async def schedule(
        self, meta: InvocationMeta, headers: Mapping[str, str], body: bytes, reply: str
    ) -> None:
        """A new invocation (its routing headers checked by the wiring)."""
        arrived = time.time()
        with tracing.handling_span(
            "scheduler assign",
            headers,
            kind=SpanKind.CONSUMER,
            invocation_id=meta.invocation_id,
            attributes={
                "gfaas.function": meta.function,
                **tracing.nats_attributes(subjects.SCHEDULE, tenant=meta.tenant),
            },
        ) as span:
            spec = await self.registry.lookup(meta.function)
            if spec is None:
                tracing.mark_error(span, ErrorCode.UNKNOWN_FUNCTION, meta.function)
                await self.bus.reply_error(
                    reply,
                    meta.invocation_id,
                    ErrorCode.UNKNOWN_FUNCTION,
                    f"function {meta.function!r} is not deployed",
                )
                return
            if spec.model and spec.model not in self.state.model_bytes:
                await self._learn_size(spec.model)
            now = time.monotonic()
            inv = Invocation(
                meta=meta,
                reply=reply,
                body=body,
                headers=tracing.inject(meta.to_headers()),
                view=self.state.request_view(
                    spec, meta, now, now_millis(), instanced=self.instances.instanced(spec)
                ),
            )
            near = headers.get(H_AFFINITY)
            ingress = meta.origin  # who a grant for this function may go to
            if near:
                inv.view = dataclasses.replace(inv.view, near=near)
            instanced = inv.view.instanced
            if instanced:
                self.instances.arrived(spec.name, now)
            if not self.state.workers and not (instanced and self.instances.any_agent()):
                tracing.mark_error(span, ErrorCode.NO_WORKER, "no workers")
                await self.bus.reply_error(
                    reply,
                    meta.invocation_id,
                    ErrorCode.NO_WORKER,
                    self._no_worker_reason(),
                )
                return
            if instanced and not self.instances.any_agent():
                await self.bus.reply_error(
                    reply,
                    meta.invocation_id,
                    ErrorCode.NO_WORKER,
                    f"{spec.name!r} runs as instances and no node agent is running",
                )
                return
            unmeetable = self.instances.unmeetable(spec)
            if unmeetable is not None:
                tracing.mark_error(span, ErrorCode.SLO_UNMEETABLE, unmeetable)
                await self.bus.reply_error(
                    reply, meta.invocation_id, ErrorCode.SLO_UNMEETABLE, unmeetable
                )
                return
            worker_id = await self._place(inv, now, span)
            if worker_id is None and instanced and not self.instances.instances_of(spec.name):
                # Scale from zero: start one now, not at the next tick.
                cold = self._cold_start(spec.name, arrived)
                # The span lasts until the invocation goes to the new instance (or
                # leaves the queue otherwise), not only while the start is commanded.
                waiting = tracing.tracer().start_span(
                    "scheduler scale from zero", attributes={"gfaas.function": spec.name}
                )
                with trace.use_span(waiting, end_on_exit=False):
                    await self._scale(now, only=spec.name)
                cold["commanded"] = time.time()
                if inv.view.invocation_id in self.state.pending:
                    self._cold_spans[inv.view.invocation_id] = (waiting, now)
                else:
                    waiting.end()
            if worker_id is not None and ingress and self.grant_ttl_s > 0:
                await self._lend(ingress, inv, spec, worker_id, now)

    def _no_worker_reason(self) -> str:
        """Why a call found no worker, and what the operator can do: under `gfaas up`
        the workers are its own (started with it, restarted when one exits), so
        telling the caller to start one sent them to start a second set."""
        if self.supervised:
            return (
                "no worker is available: gfaas up's workers are not heartbeating (still "
                "starting, or restarting after one exited: their log is in gfaas up's "
                "output); try again shortly"
            )
        return "no worker is available; start one with `gfaas serve gpu-worker`"

    async def refused(self, refused: Refused) -> RefusedReply:
        """A worker at capacity handed back an invocation placed there: it goes to a
        worker with room, or back into the queue (in its place by arrival)."""
        now = time.monotonic()
        key = self.state.held(refused.worker_id, refused.invocation_id, refused.reply)
        held = self.state.workers[refused.worker_id].running[key] if key is not None else None
        if held is not None and held.meta.deadline_ms and held.meta.deadline_ms <= now_millis():
            # Past its deadline there is nothing to place, only an answer to give, and
            # the worker gives it: taken here too, it would be placed or expired again
            # and its caller answered twice. It stays in the worker's books until the
            # worker's Done (sent with that answer) frees the slot.
            return RefusedReply(taken=False)
        inv = self.state.refused(
            refused.worker_id, refused.invocation_id, refused.inflight, refused.reply
        )
        if inv is None:  # not ours (a former leader's): the worker answers the caller
            return RefusedReply(taken=False)
        self.replaced += 1
        log.info(
            "invocation.refused",
            invocation_id=refused.invocation_id,
            worker=refused.worker_id,
            inflight=refused.inflight,
            capacity=refused.capacity,
        )
        await self._place(inv, now, requeue=True)
        return RefusedReply(taken=True)

    async def scheduler_beat(self, beat: SchedulerBeat) -> None:
        """A scheduler says it leads: it listens on the schedule subject (it beats
        only once it subscribed), so what this one hands over reaches it. Our own
        beat counts only while we lead again (one sent before we stepped down may
        still be on its way)."""
        leadership = self.leadership
        mine = leadership is not None and beat.scheduler_id == leadership.me
        if not mine:
            if beat.stopping:
                self._peers.pop(beat.scheduler_id, None)
            else:
                self._peers[beat.scheduler_id] = time.monotonic()
        if beat.active and (not mine or (leadership is not None and leadership.active)):
            self._successor.set()

    async def hand_over(self, wait_s: float) -> None:
        """No longer active (the lease went to another, or this one stops): what waits
        here goes to the next leader once it is heard, with its caller's reply subject
        and deadline, as if just sent. With no other scheduler running, or none
        leading within `wait_s`, or past its deadline, it is answered `unavailable`
        (the caller, or the async path, tries again with whoever is active then)."""
        pending = self.state.drop_pending()
        if not pending:
            return
        heard = self._successor = anyio.Event()
        now = time.monotonic()
        if any(now - at <= wait_s for at in self._peers.values()):
            with anyio.move_on_after(wait_s):
                await heard.wait()
        # else no other scheduler runs: nobody is coming, and the callers hear so now
        now_ms = now_millis()
        for inv in pending:
            if heard.is_set() and not (inv.meta.deadline_ms and inv.meta.deadline_ms <= now_ms):
                headers = dict(inv.headers)
                if inv.view.near:
                    headers[H_AFFINITY] = inv.view.near
                await self.bus.publish(
                    subjects.SCHEDULE, inv.body, reply=inv.reply, headers=headers
                )
                self.handed_over += 1
                continue
            await self.bus.reply_error(
                inv.reply,
                inv.meta.invocation_id,
                ErrorCode.UNAVAILABLE,
                "the scheduler holding this invocation stopped before placing it, "
                f"and no other took over within {wait_s:g} s",
            )
        self._end_cold_spans()
        log.info("scheduler.handed_over", invocations=len(pending), to_successor=heard.is_set())

    async def agent_beat(self, beat: AgentBeat) -> None:
        """A node agent's instances: those it no longer runs are lost (their callers
        hear `worker_lost` now, not after a heartbeat timeout; what one took while
        starting waits again); a start its function failed answers the invocations
        waiting for that function with its error, one whose process died does not."""
        now = time.monotonic()
        gone, failed = self.instances.observe(beat, now)
        for name in gone:
            book = self.state.workers.pop(name, None)
            if book is not None:
                await self._lost(name, book, "its process ended")
        for info in failed:
            error = info.error
            code = error.code if error is not None else ErrorCode.INTERNAL
            reason = error.reason if error is not None else "it exited"
            why = f"an instance of {info.function!r} could not start: {reason}"
            # What it took while starting and did not answer for (it was killed, say).
            book = self.state.workers.pop(info.instance_id, None)
            if code is ErrorCode.WORKER_LOST:
                # Its process died, not its function's load: what it took goes to
                # another start (the autoscaler's next), what waits waits for it.
                if book is not None:
                    await self._lost(info.instance_id, book, "exited before it was ready")
                continue
            taken = list(book.running.values()) if book is not None else []
            for inv in taken:
                await self.bus.reply_error(inv.reply, inv.meta.invocation_id, code, why)
            if any(v.function == info.function and v.capacity > 0 for v in self.state.views()):
                continue  # another instance of it serves: the waiting ones go there
            for inv in self.state.drop_function(info.function):
                await self.bus.reply_error(inv.reply, inv.meta.invocation_id, code, why)

    async def _scale(self, now: float, only: str | None = None) -> None:
        """One autoscaler round (every tick; for `only`, when a request finds its
        function with no instance)."""
        # Instances of a model are placed by its weights' size (shared on some
        # devices): learn it before the first start, not at the first request.
        for spec in self.registry.all():
            if spec.model and spec.model not in self.state.model_bytes:
                await self._learn_size(spec.model)
        views = {v.worker_id: v for v in self.state.views()}
        waiting = Counter(inv.view.function for inv in self.state.pending.values())
        resident = {
            agent_id: frozenset(i.model or i.function for i in book.beat.instances)
            for agent_id, book in self.instances.agents.items()
        }
        seen = Observed(
            waiting=dict(waiting),
            busy=lambda w: (v := views.get(w)) is not None and v.outstanding > 0,
            exec_ms=lambda f: self.state.exec_s.get(f, 0.0) * 1000.0,
            resident=resident,
        )
        await self.instances.scale(now, seen, only=only)
        for function, reason in self.instances.unplaced.items():
            if self.instances.instances_of(function):
                continue  # those it has serve what waits
            # No instance, and no room for one: waiting would only end at the deadline.
            for inv in self.state.drop_function(function):
                await self.bus.reply_error(
                    inv.reply,
                    inv.meta.invocation_id,
                    ErrorCode.OVERLOADED,
                    f"no device has room for an instance of {function!r}: {reason}",
                )

    async def _lost(self, worker_id: str, book: WorkerBook, why: str) -> None:
        lost = list(book.running.values())
        log.warning(
            "worker.lost", worker=worker_id, inflight=len(lost), why=why, starting=book.starting
        )
        # Ingress answers for what it sent there directly.
        reason = f"worker {worker_id} {why}"
        await self.bus.publish(
            subjects.WORKER_LOST, encode(WorkerLost(worker_id=worker_id, reason=reason))
        )
        for inv in lost:
            if book.starting and inv.lost_starts < MAX_LOST_STARTS:
                # Not run: an instance runs what it took while starting only once
                # its ready beat has gone, and these books never heard one. Not the
                # caller's fault, so it waits again, for another instance.
                inv.lost_starts += 1
                self.state.requeue(inv)
                continue
            doing = "while starting for" if book.starting else "while running"
            await self.bus.reply_error(
                inv.reply,
                inv.meta.invocation_id,
                ErrorCode.WORKER_LOST,
                f"worker {worker_id} {why} {doing} this invocation",
            )

    async def heartbeat(self, hb: WorkerHeartbeat) -> None:
        old = self.state.restarted(hb)
        if old is not None:
            # Another process under its id: the last one is lost as if reaped, and
            # this one joins with books of its own.
            await self._lost(hb.worker_id, old, "restarted")
        if self.state.observe(hb, time.monotonic()):
            self._cold_step(hb.function, "joined")
            log.info("worker.joined", worker=hb.worker_id, device=hb.device)
            await self._drain_pending()
        if hb.capacity == 0:  # draining: it takes nothing more, direct sends included
            await self._revoke(self.state.revoke(hb.worker_id))

    def alive(self, ingress: str) -> None:
        self.state.ingress_seen[ingress] = time.monotonic()

    async def grant_returned(self, grant: Grant) -> None:
        if self.state.give_back(grant.worker_id, grant.grant_id) and self.state.pending:
            await self._drain_pending()

    async def done(self, done: Done, *, scheduled: bool) -> None:
        """A worker's Done: for an invocation placed here (`scheduled`), or one an
        ingress sent directly under a grant."""
        self.instances.touch(done.worker_id, time.monotonic())
        if not scheduled:
            # Sent by an ingress under a grant: an arrival this scheduler never saw.
            self.instances.arrived(done.function, time.monotonic())
        if scheduled:
            self.state.done(done, time.monotonic())
        else:
            self.state.done_direct(done)
        if self.state.pending:
            await self._drain_pending()

    async def tick(self) -> None:
        now = time.monotonic()
        healthy = self.health.healthy(now)
        self.state.lapsed(now, heard=healthy)  # slots freed here are used by the drain below
        self.state.forget_idle(now, heard=healthy)
        reaped = self.state.reap(now) if healthy else []
        for worker_id, book in reaped:
            await self._lost(worker_id, book, "stopped answering")
        if healthy:
            for name in self.instances.expire(now):
                lost = self.state.workers.pop(name, None)
                if lost is not None:
                    await self._lost(name, lost, "went with its agent")
        if self.instances.any_agent():
            await self._scale(now)
        for inv in self.state.expire_pending(now_millis()):
            await self.bus.reply_error(
                inv.reply,
                inv.meta.invocation_id,
                ErrorCode.DEADLINE_EXCEEDED,
                "deadline passed while waiting for a free worker",
            )
        await self._answer_removed()
        if self.state.pending:
            await self._drain_pending()
        self._end_cold_spans()

    # -- helpers ------------------------------------------------------------------------

    async def _answer_removed(self) -> None:
        """What waits for a function since removed is answered now (its instances are
        stopped as orphans), not left to its callers' deadlines."""
        if not self.state.pending or not self.registry.synced:
            return  # before the whole registry is read every function looks removed
        specs = self.registry.specs
        gone = {inv.view.function for inv in self.state.pending.values()} - specs.keys()
        for function in gone:
            for inv in self.state.drop_function(function):
                await self.bus.reply_error(
                    inv.reply,
                    inv.meta.invocation_id,
                    ErrorCode.UNKNOWN_FUNCTION,
                    f"function {function!r} was removed while this invocation waited",
                )

    async def _place(
        self, inv: Invocation, now: float, span: Span | None = None, *, requeue: bool = False
    ) -> str | None:
        """Act on the policy's decision for one invocation: the worker it was sent to,
        or None (refused, queued, or `overloaded` with the queue full). `requeue`: it
        was refused by a worker, and waits again past the queue's limit."""
        started = time.perf_counter()  # metrics: how long the policy took
        decision: Decision = decide(self.policy, inv.view, self.state.views(), now)
        self.metrics.decided("decide", time.perf_counter() - started)
        if isinstance(decision, Rejected):
            if span is not None:
                tracing.mark_error(span, ErrorCode.OVERLOADED, decision.reason)
            await self._reject(inv, decision.reason)
            return None
        if decision is not None:
            if span is not None:
                span.set_attribute("gfaas.worker", decision)
            await self._dispatch(decision, inv, now)
            return decision
        if requeue:
            self.state.requeue(inv)
        elif not self.state.enqueue(inv):
            await self.bus.reply_error(
                inv.reply,
                inv.meta.invocation_id,
                ErrorCode.OVERLOADED,
                f"all workers are busy and {self.state.pending_limit} requests are queued",
            )
            return None
        # Work waits: lent slots are wanted back.
        await self._revoke(self.state.revoke())
        return None

    async def _dispatch(self, worker_id: str, inv: Invocation, now: float) -> None:
        self.instances.touch(worker_id, now)
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
            await self.bus.publish(subject, encode(grant))

    async def _revoke(self, revoked: list[Lent]) -> None:
        self.revoked += len(revoked)
        for lent in revoked:
            revoke = msgspec.structs.replace(lent.grant, slots=0)
            await self.bus.publish(subjects.grants(lent.ingress), encode(revoke))

    async def _send(self, worker_id: str, inv: Invocation) -> None:
        if inv.view.instanced:
            self._cold_step(inv.view.function, "dispatched")
            cold = self._cold_spans.pop(inv.view.invocation_id, None)
            if cold is not None:
                waiting, since = cold
                waiting.set_attribute("gfaas.worker", worker_id)
                waiting.end()
                self.metrics.scaled_from_zero(inv.view.function, time.monotonic() - since)
        await self.bus.publish(
            subjects.worker_run(worker_id), inv.body, reply=inv.reply, headers=inv.headers
        )

    async def _reject(self, inv: Invocation, reason: str) -> None:
        """Answer for an invocation the policy refused (its SLO cannot be met)."""
        self.state.reject(inv)
        meta = inv.meta
        late = bool(meta.deadline_ms) and meta.deadline_ms <= now_millis()
        code = ErrorCode.DEADLINE_EXCEEDED if late else ErrorCode.OVERLOADED
        view = inv.view
        await self.bus.reply_error(
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
        started = time.perf_counter()  # metrics: how long the policy took
        result = plan(self.policy, queue, self.state.views(), now)
        self.metrics.decided("plan", time.perf_counter() - started)
        # Books first, with no await in between, so the plan's views stay true.
        sends = []
        for invocation_id, worker_id in result.assignments:
            inv = self.state.take(invocation_id)
            self.instances.touch(worker_id, now)
            self.state.assign(worker_id, inv, now)
            self.assigned += 1
            sends.append((worker_id, inv))
        refused = [(self.state.take(r.invocation_id), r.reason) for r in result.rejected]
        for worker_id, inv in sends:
            await self._send(worker_id, inv)
        for inv, reason in refused:
            await self._reject(inv, reason)

    def _end_cold_spans(self) -> None:
        """Scale-from-zero spans of invocations that left the queue without being sent
        (refused, expired, their worker lost): ended, with why not."""
        for invocation_id, (waiting, _) in list(self._cold_spans.items()):
            if invocation_id not in self.state.pending:
                del self._cold_spans[invocation_id]
                waiting.set_status(StatusCode.ERROR, "answered before an instance took it")
                waiting.end()

    def _cold_start(self, function: str, arrived: float) -> dict[str, float]:
        """A new record of `function`'s scale from zero, from its request's arrival."""
        self.cold.pop(function, None)
        while len(self.cold) >= COLD_KEPT:
            del self.cold[next(iter(self.cold))]
        cold = self.cold[function] = {"arrived": arrived, "scale": time.time()}
        return cold

    def _cold_step(self, function: str, step: str) -> None:
        """The first time `step` of `function`'s latest scale from zero happened."""
        cold = self.cold.get(function)
        if function and cold is not None:
            cold.setdefault(step, time.time())

    def details(self) -> dict[str, object]:
        leadership = self.leadership
        return {
            "active": leadership is not None and leadership.active,
            "terms": leadership.terms if leadership is not None else 0,
            "lapses": leadership.lapses if leadership is not None else 0,
            "policy": self.policy.name,
            "instances": {
                **self.instances.details(),
                "live": self.instances.live(
                    lambda w: len(b.running) if (b := self.state.workers.get(w)) else 0
                ),
            },
            "cold_starts": {f: dict(steps) for f, steps in self.cold.items()},
            "assigned": self.assigned,
            "replaced": self.replaced,
            "handed_over": self.handed_over,
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
                    "memory_total": b.view.memory_total,
                    "link_bandwidth": round(b.view.profile.link_bandwidth),
                    "swap_overhead_ms": round(b.view.profile.swap_overhead_s * 1000.0, 3),
                }
                for wid, b in self.state.workers.items()
            },
        }

"""Ingress: the front door. NATS sync and async invocations, results, and HTTP (OIP).

Sync: `gfaas.v1.invoke.<fn>` requests are admitted (validated, stamped with id,
tenant and deadline) and forwarded to the scheduler with the caller's reply subject,
so the worker answers the caller directly; with no scheduler to hear them, callers
are answered `unavailable` (liveness.py). Async: `gfaas.v1.invoke_async.<fn>`
messages land in a JetStream work-queue stream; async_path.py consumes them, runs
them through the same path and keeps exactly one result per invocation.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import anyio
import msgspec
import nats.errors
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry.trace import Span, SpanKind

from services.ingress.admission import Spec, admit
from services.ingress.async_path import AsyncInvocations
from services.ingress.direct import DirectRoutes
from services.ingress.liveness import Forwarded, SchedulerWatch
from services.ingress.oip import InferRequest
from services.ingress.shm_regions import ShmRegions
from services.ingress.workflow import WorkflowRunner
from shared import jetstream, subjects, tracing
from shared.bus import (
    BusHealth,
    connected,
    decode_event,
    reply_error,
    send_reply,
    serve_status,
    watch_bus,
)
from shared.config import Settings, effective_max_payload
from shared.dataplane.backend import prune_mappings
from shared.dataplane.client import NO_POOL, BrokerClient, read_bytes
from shared.errors import GfaasError
from shared.logs import get_logger
from shared.registry import Registry
from shared.results import ResultStore
from shared.schema import (
    DEFAULT_TENANT,
    H_AFFINITY,
    H_INGRESS,
    H_INVOCATION,
    H_TENANT,
    Done,
    ErrorCode,
    FunctionSpec,
    Grant,
    Handle,
    InvocationMeta,
    InvokeReply,
    InvokeRequest,
    OutputMode,
    SchedulerBeat,
    Tensor,
    WorkerLost,
    WorkflowSpec,
    decode,
    encode,
    error_reply,
    new_invocation_id,
    now_millis,
)
from shared.workflow import WorkflowError, WorkflowPlan, plan_workflow

log = get_logger("ingress")

NO_SCHEDULER = "no scheduler is running (or none has been heard from lately)"


def lost_by(scheduler: str) -> str:
    return (
        f"scheduler {scheduler or '(none)'} stopped answering while it held this "
        "invocation; it may not have run"
    )


# How often ingress drops its mappings of slabs the broker gave back.
PRUNE_S = 1.0
# How often direct sends are checked for lapsed grants and passed deadlines, and the
# longest a direct send without a deadline is waited for.
DIRECT_TICK_S = 0.1
DIRECT_LIMIT_S = 300.0


class Ingress:
    def __init__(
        self,
        nc: NATS,
        registry: Registry[FunctionSpec],
        results: ResultStore,
        settings: Settings,
        workflows: Registry[WorkflowSpec],
    ):
        self.nc = nc
        self.registry = registry
        self.workflows = workflows
        self.settings = settings
        self.max_payload = effective_max_payload(settings, nc.max_payload)
        # Our own alive beats, heard back: is the bus up (shared.bus.BusHealth)?
        self.health = BusHealth(settings.heartbeat_s, on_back=self._bus_back)
        self.asyncs = AsyncInvocations(
            nc, results, self.call, settings, max_payload=self.max_payload, health=self.health
        )
        # Is an active scheduler there, and what was forwarded to it.
        self.watch = SchedulerWatch(
            timeout_s=settings.scheduler_timeout_s, started_at=time.monotonic()
        )
        self.unavailable = 0
        self.accepted = 0
        self.rejected = 0
        self.broker = BrokerClient(nc, settings.node)
        # Our name as a lease holder, grant holder and live instance.
        self.holder = f"ingress-{new_invocation_id()[:12]}"
        self.runner = WorkflowRunner(
            self._schedule, self.broker, lambda: self.registry.specs, self.holder
        )
        # HTTP clients' registered shared memory.
        self.regions = ShmRegions()
        # Worker slots the scheduler lent us: invocations sent straight to workers.
        self.direct = DirectRoutes()
        self._plans: dict[str, tuple[WorkflowSpec, WorkflowPlan]] = {}
        # Sync workflow runs outlive the subscription callback that admitted them.
        self.tasks: TaskGroup | None = None

    def lookup(self, name: str) -> Spec | None:
        return self.registry.get(name) or self.workflows.get(name)

    def plan(self, spec: WorkflowSpec) -> WorkflowPlan:
        cached = self._plans.get(spec.name)
        if cached is None or cached[0] != spec:
            try:
                plan = plan_workflow(spec)
            except WorkflowError as exc:
                raise GfaasError(ErrorCode.BAD_REQUEST, str(exc)) from None
            cached = self._plans[spec.name] = (spec, plan)
        return cached[1]

    def _admit(
        self,
        function: str,
        body: bytes,
        headers: Mapping[str, str] | None,
        span: Span,
        claim: int = 0,
    ) -> tuple[InvocationMeta, InvokeRequest, Spec]:
        """Admission with the books kept and the span marked; raises GfaasError.
        The origin and an async attempt's claim are ours to set, never the caller's."""
        try:
            meta, request, spec = admit(
                function,
                body,
                headers,
                self.lookup,
                max_payload=self.max_payload,
                now_ms=now_millis(),
            )
        except GfaasError as exc:
            self.rejected += 1
            tracing.mark_error(span, exc.code, exc.reason)
            raise
        self.accepted += 1
        span.set_attribute("gfaas.invocation_id", meta.invocation_id)
        meta = msgspec.structs.replace(meta, origin=self.holder, claim=claim)
        return meta, request, spec

    # -- sync NATS path ---------------------------------------------------------------

    async def on_invoke(self, msg: Msg) -> None:
        function = subjects.last_token(msg.subject)
        with tracing.handling_span(
            "ingress invoke",
            msg.headers,
            kind=SpanKind.SERVER,
            attributes={"gfaas.function": function},
        ) as span:
            try:
                meta, request, spec = self._admit(function, msg.data, msg.headers, span)
            except GfaasError as exc:
                invocation_id = (msg.headers or {}).get(H_INVOCATION, "")
                await reply_error(self.nc, msg.reply, invocation_id, exc.code, exc.reason)
                return
            if isinstance(spec, WorkflowSpec):
                assert self.tasks is not None
                self.tasks.start_soon(self._reply_workflow, spec, meta, request, msg.reply)
                return
            if not msg.reply:
                log.info(
                    "invoke.no_reply_subject",
                    function=function,
                    hint="publish to invoke_async for fire-and-forget",
                )
                return
            worker = self.direct.take(
                function,
                meta.invocation_id,
                time.monotonic(),
                self._deadline(meta),
                reply=msg.reply,
            )
            now = time.monotonic()
            if worker is None:
                if not self.watch.available(now):
                    self.unavailable += 1
                    tracing.mark_error(span, ErrorCode.UNAVAILABLE, NO_SCHEDULER)
                    await reply_error(
                        self.nc, msg.reply, meta.invocation_id, ErrorCode.UNAVAILABLE, NO_SCHEDULER
                    )
                    return
                self.watch.sent(
                    meta.invocation_id,
                    Forwarded(
                        scheduler=self.watch.leader(now) or "",
                        deadline=self._deadline(meta),
                        reply=msg.reply,
                    ),
                )
            headers = meta.to_headers()
            headers[H_INGRESS] = self.holder
            if worker is not None:
                span.set_attribute("gfaas.worker", worker)
            await self.nc.publish(
                subjects.worker_run(worker) if worker is not None else subjects.SCHEDULE,
                msg.data,
                reply=msg.reply,
                headers=tracing.inject(headers),
            )

    # -- direct sends under the scheduler's grants --------------------------------------

    @staticmethod
    def _deadline(meta: InvocationMeta) -> float:
        """The invocation's deadline on the monotonic clock the routes keep."""
        return time.monotonic() + min(meta.remaining_s(), DIRECT_LIMIT_S)

    async def on_grant(self, msg: Msg) -> None:
        grant = decode_event(msg, Grant)
        if grant is None:
            return
        await self._give_back(self.direct.on_grant(grant, time.monotonic()))

    async def on_done(self, msg: Msg) -> None:
        done = decode_event(msg, Done)
        if done is None:
            return
        await self._give_back(self.direct.finish(done.invocation_id))

    async def on_worker_lost(self, msg: Msg) -> None:
        lost = decode_event(msg, WorkerLost)
        if lost is None:
            return
        for iid, sent in self.direct.lost(lost.worker_id):
            await self._give_up(
                iid,
                sent.on_lost,
                sent.reply,
                ErrorCode.WORKER_LOST,
                f"{lost.reason} while running this invocation",
            )

    async def _give_up(
        self,
        invocation_id: str,
        on_lost: Callable[[], None] | None,
        reply: str,
        code: ErrorCode,
        reason: str,
    ) -> None:
        """What we sent will not be answered: end our own wait for it (`on_lost`),
        or answer its caller."""
        if on_lost is not None:
            on_lost()
        elif reply:
            await reply_error(self.nc, reply, invocation_id, code, reason)

    def _bus_back(self, at: float) -> None:
        self.watch.bus_back(at)

    async def on_scheduler_beat(self, msg: Msg) -> None:
        beat = decode_event(msg, SchedulerBeat)
        if beat is None:
            return
        if self.watch.beat(beat, time.monotonic()) and self.direct.routes:
            # A new active scheduler knows nothing of what the last one lent: those
            # grants are void (their slots are in the workers' heartbeats anyway).
            dropped = self.direct.surrender()
            log.info(
                "grants.dropped_for_new_scheduler", scheduler=beat.scheduler_id, grants=len(dropped)
            )

    async def on_scheduled_done(self, msg: Msg) -> None:
        done = decode_event(msg, Done)
        if done is not None:
            self.watch.done(done.invocation_id)

    async def tick_direct(self) -> None:
        while True:
            await anyio.sleep(DIRECT_TICK_S)
            now = time.monotonic()
            await self._give_back(self.direct.tick(now))
            if self.health.healthy(now):  # a silence we all shared is nobody's death
                for iid, sent in self.watch.tick(now):
                    await self._answer_lost(iid, sent)

    async def _answer_lost(self, invocation_id: str, sent: Forwarded) -> None:
        """The scheduler this went to fell silent: it may have held it, so say so
        now rather than leave the caller to its timeout."""
        self.unavailable += 1
        await self._give_up(
            invocation_id, sent.on_lost, sent.reply, ErrorCode.UNAVAILABLE, lost_by(sent.scheduler)
        )

    async def beat(self) -> None:
        """Say we are alive: the broker and the scheduler free what we hold once we stop."""
        while True:
            await self.nc.publish(subjects.alive(self.holder), b"")
            await anyio.sleep(self.settings.heartbeat_s)

    async def return_grants(self) -> None:
        """At shutdown: nothing more is sent directly, so every grant goes back."""
        await self._give_back(self.direct.surrender())

    async def _give_back(self, grants: list[Grant]) -> None:
        for grant in grants:
            await self.nc.publish(subjects.GRANT_RETURN, encode(grant))

    # -- request-reply through the scheduler (HTTP and async paths) -------------------

    async def call(
        self, function: str, body: bytes, headers: Mapping[str, str] | None, *, claim: int = 0
    ) -> InvokeReply:
        with tracing.handling_span(
            "ingress call",
            headers,
            kind=SpanKind.SERVER,
            attributes={"gfaas.function": function},
        ) as span:
            try:
                meta, request, spec = self._admit(function, body, headers, span, claim)
            except GfaasError as exc:
                return error_reply("", exc.code, exc.reason)
            if isinstance(spec, WorkflowSpec):
                reply = await self._workflow(spec, meta, request)
            else:
                reply = await self._request(meta, body)
            if reply.error:
                tracing.mark_error(span, reply.error.code, reply.error.reason)
            return reply

    # -- workflows --------------------------------------------------------------------

    async def _workflow(
        self, spec: WorkflowSpec, meta: InvocationMeta, request: InvokeRequest
    ) -> InvokeReply:
        with tracing.tracer().start_as_current_span(
            "ingress workflow", attributes={"gfaas.workflow": spec.name}
        ) as span:
            try:
                plan = self.plan(spec)
            except GfaasError as exc:
                return error_reply(meta.invocation_id, exc.code, exc.reason)
            reply = await self.runner.run(plan, meta, request)
            if reply.error:
                tracing.mark_error(span, reply.error.code, reply.error.reason)
            return reply

    async def _reply_workflow(
        self, spec: WorkflowSpec, meta: InvocationMeta, request: InvokeRequest, reply_to: str
    ) -> None:
        reply = await self._workflow(spec, meta, request)
        if reply_to:
            await send_reply(self.nc, reply_to, reply, max_payload=self.max_payload)

    async def _schedule(self, meta: InvocationMeta, body: bytes, near: str) -> InvokeReply:
        """One workflow stage through the scheduler, preferring the worker `near`."""
        return await self._request(meta, body, {H_AFFINITY: near} if near else None)

    async def _request(
        self, meta: InvocationMeta, body: bytes, extra: Mapping[str, str] | None = None
    ) -> InvokeReply:
        timeout = max(meta.remaining_s(), 0.001)
        headers = meta.to_headers()
        headers[H_INGRESS] = self.holder
        if extra:
            headers.update(extra)
        now = time.monotonic()
        with anyio.CancelScope() as lost:
            worker = self.direct.take(
                meta.function,
                meta.invocation_id,
                now,
                self._deadline(meta),
                near=headers.get(H_AFFINITY, ""),
                on_lost=lost.cancel,
            )
            if worker is None:
                if not self.watch.available(now):
                    self.unavailable += 1
                    return error_reply(meta.invocation_id, ErrorCode.UNAVAILABLE, NO_SCHEDULER)
                scheduler = self.watch.leader(now) or ""
                self.watch.sent(
                    meta.invocation_id,
                    Forwarded(
                        scheduler=scheduler, deadline=self._deadline(meta), on_lost=lost.cancel
                    ),
                )
            subject = subjects.worker_run(worker) if worker is not None else subjects.SCHEDULE
            try:
                msg = await self.nc.request(
                    subject, body, timeout=timeout, headers=tracing.inject(headers)
                )
            except nats.errors.NoRespondersError:
                if worker is not None:
                    # It never reached the worker (gone or draining): the scheduler
                    # places it instead.
                    await self._give_back(self.direct.finish(meta.invocation_id))
                    await self._give_back(self.direct.retire(worker))
                    return await self._request(meta, body, extra)
                return error_reply(meta.invocation_id, ErrorCode.UNAVAILABLE, NO_SCHEDULER)
            except nats.errors.TimeoutError:
                return error_reply(
                    meta.invocation_id,
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"no reply within {timeout:.3f}s",
                )
            finally:
                if worker is None:
                    self.watch.done(meta.invocation_id)
        if lost.cancelled_caught:
            if worker is None:
                return error_reply(meta.invocation_id, ErrorCode.UNAVAILABLE, lost_by(scheduler))
            return error_reply(
                meta.invocation_id,
                ErrorCode.WORKER_LOST,
                f"worker {worker} stopped answering while running this invocation",
            )
        try:
            return decode(msg.data, InvokeReply)
        except msgspec.MsgspecError as exc:
            return error_reply(meta.invocation_id, ErrorCode.INTERNAL, f"bad reply: {exc}")

    # -- async path (async_path.py) -----------------------------------------------------

    async def on_result(self, msg: Msg) -> None:
        reply = await self.asyncs.result(subjects.last_token(msg.subject))
        await msg.respond(encode(reply))

    # -- HTTP backend (services.ingress.http.InferenceBackend) ------------------------

    def ready(self) -> bool:
        return self.nc.is_connected

    def specs(self) -> Sequence[FunctionSpec]:
        return self.registry.all()

    def spec(self, name: str) -> FunctionSpec | None:
        return self.registry.get(name)

    async def infer(
        self, name: str, request: InvokeRequest, headers: Mapping[str, str]
    ) -> InvokeReply:
        return await self.call(name, encode(request), headers)

    async def infer_shm(
        self, name: str, parsed: InferRequest, headers: Mapping[str, str]
    ) -> InvokeReply:
        """An OIP request naming shared-memory regions, system or CUDA: region bytes
        move into pooled buffers on the region's own device and back (one copy each
        way, device to device for CUDA), never over the bus."""
        tenant = headers.get(H_TENANT) or DEFAULT_TENANT
        refs = parsed.shm_inputs
        staged: list[Handle] = []
        try:
            inputs = list(parsed.invoke.inputs)
            # One lease per device: host memory for system regions, the GPU for CUDA ones.
            by_device: dict[str, list[str]] = {}
            for t in inputs:
                if t.name in refs:
                    by_device.setdefault(self.regions.device(refs[t.name]), []).append(t.name)
            by_name: dict[str, Handle] = {}
            for device, names in by_device.items():
                try:
                    leased = await self.broker.lease(
                        [refs[n].byte_size for n in names],
                        owner=self.holder,
                        device=device,
                        tenant=tenant,
                    )
                except GfaasError as exc:
                    if NO_POOL not in exc.reason:
                        raise
                    raise GfaasError(
                        ErrorCode.BAD_REQUEST,
                        f"inputs in CUDA shared memory on {device} are staged in the node's "
                        f"pool there, and it has none: {exc.reason}",
                    ) from None
                staged += leased
                by_name.update(zip(names, leased, strict=True))
            for n, h in by_name.items():
                self.regions.copy_in(refs[n], h)
            inputs = [
                msgspec.structs.replace(t, handle=by_name[t.name]) if t.name in by_name else t
                for t in inputs
            ]
            request = msgspec.structs.replace(
                parsed.invoke, inputs=inputs, outputs_by=OutputMode.HANDLE, holder=self.holder
            )
            reply = await self.infer(name, request, headers)
            return await self._outputs_from_pool(reply, parsed, tenant)
        finally:
            if staged:
                with anyio.CancelScope(shield=True):
                    await self.broker.release(staged, self.holder, tenant)

    async def _outputs_from_pool(
        self, reply: InvokeReply, parsed: InferRequest, tenant: str
    ) -> InvokeReply:
        """Outputs asked for in shared memory (either kind) are written there; the rest
        become values."""
        handles = [t.handle for t in reply.outputs if t.handle is not None]
        wanted = {o.name: o.shm for o in parsed.outputs or () if o.shm is not None}
        try:
            outputs: list[Tensor] = []
            for t in reply.outputs:
                if t.handle is None:
                    outputs.append(t)
                    continue
                ref = wanted.get(t.name)
                if ref is not None:
                    self.regions.copy_out(t.handle, ref)
                    outputs.append(msgspec.structs.replace(t, handle=None))
                else:
                    pooled = read_bytes(t.handle)
                    outputs.append(msgspec.structs.replace(t, handle=None, data=pooled.tobytes()))
            return msgspec.structs.replace(reply, outputs=outputs)
        finally:
            if handles:
                with anyio.CancelScope(shield=True):
                    await self.broker.release(handles, self.holder, tenant)

    def details(self) -> dict[str, object]:
        return {
            "accepted": self.accepted,
            "rejected": self.rejected,
            "functions": [s.name for s in self.registry.all()],
            "workflows": [s.name for s in self.workflows.all()],
            "workflow_runs": self.runner.runs,
            "workflow_stages": self.runner.stages,
            "direct": {
                "sent": self.direct.direct,
                "renewals": self.direct.renewals,
                "in_flight": len(self.direct.sent),
                "grants": {
                    r.grant.function: {"worker": r.grant.worker_id, "slots": r.grant.slots}
                    for r in self.direct.routes.values()
                    if r.usable
                },
            },
            "async": {
                "completed": self.asyncs.completed,
                "retried": self.asyncs.retried,
                "dead_lettered": self.asyncs.dead,
                "answered_from_record": self.asyncs.answered_from_record,
            },
            "scheduler": self.watch.leader(time.monotonic()),
            "unavailable": self.unavailable,
            "forwarded": len(self.watch.forwarded),
            "max_payload": self.max_payload,
        }


async def _prune_mappings_every(period_s: float) -> None:
    # Workflow outputs and shared-memory staging map pool slabs in this process.
    while True:
        await anyio.sleep(period_s)
        prune_mappings()


async def _serve_http(ingress: Ingress, settings: Settings, stop: anyio.Event) -> None:
    import uvicorn

    from services.ingress.http import create_app

    config = uvicorn.Config(
        create_app(ingress, max_payload=ingress.max_payload),
        host=settings.http_host,
        port=settings.http_port,
        log_level="warning",
        lifespan="off",
    )

    class Server(uvicorn.Server):
        # The service owns SIGINT/SIGTERM (shared.service); uvicorn would otherwise
        # capture them and re-raise them after exit, which reads as a second signal.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    server = Server(config)
    # Replicas of ingress on one host share the port: the kernel spreads connections.
    sock = socket.socket(
        socket.AF_INET6 if ":" in settings.http_host else socket.AF_INET, socket.SOCK_STREAM
    )
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    with sock:
        sock.bind((settings.http_host, settings.http_port))
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(server.serve, sockets=[sock]))
            await stop.wait()
            server.should_exit = True


async def serve(
    settings: Settings,
    stop: anyio.Event,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    instance = f"{socket.gethostname()}-{os.getpid()}"
    async with connected(settings.nats_url, "gfaas-ingress") as nc:
        js = nc.jetstream()
        replicas = settings.js_replicas
        await jetstream.ensure_invocations_stream(js, replicas=replicas)
        registry = await Registry.open(js, replicas=replicas)
        workflows = await Registry.open_workflows(js, replicas=replicas)
        await jetstream.ensure_dead_letter_stream(js, replicas=replicas)
        results = ResultStore(
            await jetstream.results_kv(js, replicas=replicas),
            max_payload=effective_max_payload(settings, nc.max_payload),
        )
        ingress = Ingress(nc, registry, results, settings, workflows)
        async with anyio.create_task_group() as service_tg:
            await service_tg.start(registry.watch)
            await service_tg.start(workflows.watch)
            async with anyio.create_task_group() as intake:
                ingress.tasks = intake
                invoke_sub = await nc.subscribe(
                    subjects.INVOKE_ALL, queue=subjects.Q_INGRESS, cb=ingress.on_invoke
                )
                result_sub = await nc.subscribe(
                    subjects.RESULT_ALL, queue=subjects.Q_INGRESS, cb=ingress.on_result
                )
                await nc.subscribe(subjects.grants(ingress.holder), cb=ingress.on_grant)
                await nc.subscribe(subjects.done(ingress.holder), cb=ingress.on_done)
                await nc.subscribe(subjects.WORKER_LOST, cb=ingress.on_worker_lost)
                await nc.subscribe(subjects.SCHEDULER_ALIVE, cb=ingress.on_scheduler_beat)
                await nc.subscribe(
                    subjects.done_scheduled(ingress.holder), cb=ingress.on_scheduled_done
                )
                service_tg.start_soon(ingress.tick_direct)
                service_tg.start_soon(ingress.beat)
                service_tg.start_soon(watch_bus, nc, ingress.health, ingress.holder)
                await serve_status(nc, "ingress", instance, ingress.details)
                # Both end by themselves once `stop` is set, after their in-flight work.
                intake.start_soon(ingress.asyncs.consume, stop)
                if settings.http_enabled:
                    intake.start_soon(_serve_http, ingress, settings, stop)
                service_tg.start_soon(_prune_mappings_every, PRUNE_S)
                task_status.started()
                await stop.wait()
                await invoke_sub.drain()
                await result_sub.drain()
            await ingress.return_grants()
            ingress.regions.close()
            service_tg.cancel_scope.cancel()

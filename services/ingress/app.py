"""Ingress: the front door. NATS sync and async invocations, results, and HTTP (OIP).

Sync: `gfaas.v1.invoke.<fn>` requests are admitted (validated, stamped with id,
tenant and deadline) and forwarded to the scheduler with the caller's reply subject,
so the worker answers the caller directly. Async: `gfaas.v1.invoke_async.<fn>`
messages land in a JetStream work-queue stream; ingress consumes them, runs them
through the same path, stores the reply in the results KV, then acknowledges.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence

import anyio
import msgspec
import nats.errors
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue
from opentelemetry.trace import Span, SpanKind

from services.ingress.admission import Spec, admit
from services.ingress.direct import DirectRoutes
from services.ingress.oip import InferRequest
from services.ingress.shm_regions import ShmRegions
from services.ingress.workflow import WorkflowRunner
from shared import jetstream, subjects, tracing
from shared.bus import connected, decode_event, reply_error, send_reply, serve_status
from shared.config import Settings, effective_max_payload
from shared.dataplane.backend import prune_mappings
from shared.dataplane.client import NO_POOL, BrokerClient, read_bytes
from shared.errors import GfaasError
from shared.logs import get_logger
from shared.registry import Registry
from shared.schema import (
    DEFAULT_TENANT,
    H_AFFINITY,
    H_CALLBACK,
    H_INGRESS,
    H_INVOCATION,
    H_MSG_ID,
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
        results: KeyValue,
        settings: Settings,
        workflows: Registry[WorkflowSpec],
    ):
        self.nc = nc
        self.registry = registry
        self.workflows = workflows
        self.results = results
        self.settings = settings
        self.max_payload = effective_max_payload(settings, nc.max_payload)
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
        self, function: str, body: bytes, headers: Mapping[str, str] | None, span: Span
    ) -> tuple[InvocationMeta, InvokeRequest, Spec]:
        """Admission with the books kept and the span marked; raises GfaasError."""
        try:
            admitted = admit(
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
        span.set_attribute("gfaas.invocation_id", admitted[0].invocation_id)
        return admitted

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
            if sent.on_lost is not None:
                sent.on_lost()
            elif sent.reply:
                await reply_error(
                    self.nc,
                    sent.reply,
                    iid,
                    ErrorCode.WORKER_LOST,
                    f"{lost.reason} while running this invocation",
                )

    async def tick_direct(self) -> None:
        while True:
            await anyio.sleep(DIRECT_TICK_S)
            await self._give_back(self.direct.tick(time.monotonic()))

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
        self, function: str, body: bytes, headers: Mapping[str, str] | None
    ) -> InvokeReply:
        with tracing.handling_span(
            "ingress call",
            headers,
            kind=SpanKind.SERVER,
            attributes={"gfaas.function": function},
        ) as span:
            try:
                meta, request, spec = self._admit(function, body, headers, span)
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
        with anyio.CancelScope() as lost:
            worker = self.direct.take(
                meta.function,
                meta.invocation_id,
                time.monotonic(),
                self._deadline(meta),
                near=headers.get(H_AFFINITY, ""),
                on_lost=lost.cancel,
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
                return error_reply(
                    meta.invocation_id, ErrorCode.NO_WORKER, "no scheduler is running"
                )
            except nats.errors.TimeoutError:
                return error_reply(
                    meta.invocation_id,
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"no reply within {timeout:.3f}s",
                )
        if lost.cancelled_caught:
            return error_reply(
                meta.invocation_id,
                ErrorCode.WORKER_LOST,
                f"worker {worker} stopped answering while running this invocation",
            )
        try:
            return decode(msg.data, InvokeReply)
        except msgspec.MsgspecError as exc:
            return error_reply(meta.invocation_id, ErrorCode.INTERNAL, f"bad reply: {exc}")

    # -- async path -------------------------------------------------------------------

    async def run_async(self, msg: Msg) -> None:
        """One message from the invocations stream, processed at least once."""
        function = subjects.last_token(msg.subject)
        headers = dict(msg.headers or {})
        try:
            request = decode(msg.data, InvokeRequest)
            callback = headers.get(H_CALLBACK) or request.callback
        except msgspec.MsgspecError:
            callback = headers.get(H_CALLBACK, "")
        if not headers.get(H_INVOCATION) and not headers.get(H_MSG_ID):
            # Without an id the caller could not fetch the result: derive a stable one
            # from the stream position so redeliveries map to the same key.
            headers[H_INVOCATION] = f"s{msg.metadata.sequence.stream}"
        invocation_id = headers.get(H_INVOCATION) or headers[H_MSG_ID]
        stored = await self.stored_result(invocation_id)
        if stored is None or (stored.error and stored.error.code == ErrorCode.PENDING):
            await self._store(
                error_reply(invocation_id, ErrorCode.PENDING, "accepted, not finished yet")
            )
            reply = await self.call(function, msg.data, headers)
            if not reply.invocation_id:
                reply = InvokeReply(
                    invocation_id=invocation_id,
                    outputs=reply.outputs,
                    error=reply.error,
                    worker=reply.worker,
                    exec_ms=reply.exec_ms,
                )
            await self._store(reply)
        else:
            reply = stored  # a redelivery of work already done: don't run it twice
        if callback:
            try:
                await send_reply(self.nc, callback, reply, max_payload=self.max_payload)
            except Exception as exc:  # the result is stored; a bad callback must not block ack
                log.warning("async.callback_failed", callback=callback, error=repr(exc))
        await msg.ack()

    async def _store(self, reply: InvokeReply) -> None:
        body = encode(reply)
        if len(body) > self.max_payload:
            body = encode(
                error_reply(
                    reply.invocation_id,
                    ErrorCode.PAYLOAD_TOO_LARGE,
                    f"result of {len(body)} bytes is too large to store",
                )
            )
        await self.results.put(reply.invocation_id, body)

    async def stored_result(self, invocation_id: str) -> InvokeReply | None:
        try:
            entry = await self.results.get(invocation_id)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        return decode(entry.value, InvokeReply) if entry.value else None

    async def on_result(self, msg: Msg) -> None:
        invocation_id = subjects.last_token(msg.subject)
        reply = await self.stored_result(invocation_id)
        if reply is None:
            reply = error_reply(
                invocation_id, ErrorCode.NOT_FOUND, f"no result for invocation {invocation_id}"
            )
        await msg.respond(encode(reply))

    async def consume_async(self, stop: anyio.Event) -> None:
        js = self.nc.jetstream()
        sub = await js.pull_subscribe(
            subjects.INVOKE_ASYNC_ALL,
            durable=jetstream.ASYNC_CONSUMER,
            stream=jetstream.INVOCATIONS_STREAM,
        )
        slots = anyio.Semaphore(self.settings.async_concurrency)
        try:
            await self._consume(sub, slots, stop)
        finally:
            # A pull subscription never marks its queue done, so drain() would wait on it.
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()

    async def _consume(
        self,
        sub: JetStreamContext.PullSubscription,
        slots: anyio.Semaphore,
        stop: anyio.Event,
    ) -> None:
        async with anyio.create_task_group() as runs:

            async def run(msg: Msg) -> None:
                try:
                    await self.run_async(msg)
                except Exception:
                    log.exception("async.failed", subject=msg.subject)
                finally:
                    slots.release()

            async def fetch_loop() -> None:
                while True:
                    try:
                        batch = await sub.fetch(batch=self.settings.async_concurrency, timeout=1)
                    except TimeoutError:
                        # nats-py raises its own subclass or, from deeper in, asyncio's
                        # plain one (TimeoutError itself on 3.11): both mean "no work".
                        continue
                    for msg in batch:
                        await slots.acquire()
                        runs.start_soon(run, msg)

            async with anyio.create_task_group() as intake:
                intake.start_soon(fetch_loop)
                await stop.wait()
                # Messages fetched but not started are redelivered after ack_wait.
                intake.cancel_scope.cancel()

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
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
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
        await jetstream.ensure_invocations_stream(js)
        registry = await Registry.open(js)
        workflows = await Registry.open_workflows(js)
        ingress = Ingress(nc, registry, await jetstream.results_kv(js), settings, workflows)
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
                service_tg.start_soon(ingress.tick_direct)
                service_tg.start_soon(ingress.beat)
                await serve_status(nc, "ingress", instance, ingress.details)
                # Both end by themselves once `stop` is set, after their in-flight work.
                intake.start_soon(ingress.consume_async, stop)
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

"""Ingress's handlers: admission, then a function's invocation to the dispatcher or a
workflow's to the runner. Plain async methods over decoded values; the wiring
(app.py) subscribes them and nothing here imports nats.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import anyio
import msgspec
from anyio.abc import TaskGroup
from opentelemetry.trace import Span, SpanKind

from services.ingress.admission import DEFAULT_MAX_TIMEOUT_MS, Spec, admit
from services.ingress.by_invocation import ByInvocation
from services.ingress.dispatch import Dispatcher, deadline_of
from services.ingress.oip import InferRequest
from services.ingress.shm_regions import ShmRegions
from services.ingress.staging import ShmStaging
from services.ingress.workflow import LATE_REPLY_S, WorkflowRunner
from shared import subjects, tracing
from shared.dataplane.client import BrokerClient, Brokers
from shared.errors import GfaasError
from shared.ids import output_holder
from shared.logs import failure_record, get_logger, report_failure
from shared.metrics import OK, UNNAMED, IngressMetrics, noop
from shared.names import is_valid_name
from shared.registry import Registry
from shared.results import deadline_problem
from shared.schema import (
    DEFAULT_TENANT,
    H_AFFINITY,
    H_INVOCATION,
    H_TENANT,
    ErrorCode,
    FunctionSpec,
    InvocationMeta,
    InvokeReply,
    InvokeRequest,
    WorkflowSpec,
    encode,
    error_reply,
    now_millis,
)
from shared.workflow import WorkflowError, WorkflowPlan, as_model, plan_workflow

log = get_logger("ingress")

# Publishes an InvokeReply to a caller's reply subject (checked for size).
SendReply = Callable[[str, InvokeReply], Awaitable[object]]


# How long past its deadline an invocation sent on with the caller's reply subject
# waits for its worker's done note before it counts as `unknown` (its caller was
# answered by someone else: the scheduler refused it, say).
DONE_GRACE_S = 5.0
UNKNOWN = "unknown"


@dataclass(kw_only=True)
class OpenCall:
    """An invocation sent on with its caller's reply subject, until its done note."""

    invocation_id: str
    reply: str
    arrived: float
    give_up_at: float
    function: str
    tenant: str
    # Ingress's root span of it (no caller's trace context), ended with it.
    span: Span | None = None


class OpenCalls(ByInvocation[OpenCall]):
    """The calls whose worker answers their callers, each under a key of its own (as
    the dispatcher's books: direct.py, liveness.py)."""

    def expire(self, now: float) -> list[OpenCall]:
        """The calls given up on by `now` (their give-up time passed), removed."""
        gone = [key for key, c in self.items() if c.give_up_at <= now]
        return [c for c in (self.pop(key) for key in gone) if c is not None]


class Ingress:
    # End-to-end counts and durations (shared.metrics); app.py sets the served one.
    metrics: IngressMetrics = IngressMetrics(noop())

    def __init__(
        self,
        dispatcher: Dispatcher,
        registry: Registry[FunctionSpec],
        workflows: Registry[WorkflowSpec],
        broker: BrokerClient,
        regions: ShmRegions,
        *,
        holder: str,
        max_payload: int,
        max_timeout_ms: float = DEFAULT_MAX_TIMEOUT_MS,
        workflow_concurrency: int,
        send_reply: SendReply,
        connected: Callable[[], bool],
    ) -> None:
        self.dispatcher = dispatcher
        self.registry = registry
        self.workflows = workflows
        self.broker = broker
        # HTTP clients' registered shared memory, staged through the pool.
        self.regions = regions
        # Every node's broker: a function run on another node leaves its outputs there.
        self.brokers = Brokers(broker, read_chunk=max_payload)
        self.staging = ShmStaging(
            broker, regions, holder, self.infer, lambda: self.tasks, brokers=self.brokers
        )
        self.holder = holder
        self.max_payload = max_payload
        self.max_timeout_ms = max_timeout_ms
        self._send_reply = send_reply
        self._connected = connected
        self.accepted = 0
        self.rejected = 0
        self.runner = WorkflowRunner(
            self._schedule,
            broker,
            lambda: self.registry.specs,
            holder,
            lambda: self.tasks,
            max_payload=max_payload,
            brokers=self.brokers,
        )
        self._plans: dict[str, tuple[WorkflowSpec, WorkflowPlan]] = {}
        # Sync workflow runs outlive the subscription callback that admitted them;
        # at most as many at once as async invocations.
        self.tasks: TaskGroup | None = None
        self.workflow_concurrency = max(workflow_concurrency, 1)
        self.workflow_slots = anyio.Semaphore(self.workflow_concurrency)
        # Metrics and traces: invocations sent on whose worker answers the caller
        # itself, until its done note (or `expire_open`).
        self.open = OpenCalls()

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
        id_tag: str = "",
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
                id_tag=id_tag,
                max_timeout_ms=self.max_timeout_ms,
            )
            # An async attempt's record must outlive it (shared.results).
            problem = deadline_problem(meta.remaining_s()) if claim else ""
            if problem:
                raise GfaasError(ErrorCode.BAD_REQUEST, problem)
        except GfaasError as exc:
            self.rejected += 1
            tracing.mark_error(span, exc.code, exc.reason)
            raise
        self.accepted += 1
        span.set_attribute("gfaas.invocation_id", meta.invocation_id)
        meta = msgspec.structs.replace(meta, origin=self.holder, claim=claim)
        return meta, request, spec

    # -- gfaas.v1.invoke.<function>: the worker answers the caller ----------------------------

    async def invoke(
        self,
        function: str,
        body: bytes,
        headers: Mapping[str, str] | None,
        reply: str,
        *,
        id_tag: str = "",
    ) -> None:
        arrived = time.monotonic()
        # Without the caller's trace context this span is the trace's root: it stays
        # open until the worker's done note (just before the worker's reply).
        root = not tracing.has_parent(headers)
        held = False
        with tracing.handling_span(
            "ingress invoke",
            headers,
            kind=SpanKind.SERVER,
            attributes={
                "gfaas.function": function,
                **tracing.nats_attributes(
                    subjects.invoke(function), tenant=(headers or {}).get(H_TENANT, "")
                ),
            },
            end_on_exit=False,
        ) as span:
            try:
                meta, request, spec = self._admit(function, body, headers, span, id_tag=id_tag)
                span.set_attribute("gfaas.tenant", meta.tenant)
                if not reply:
                    # Nobody to answer: a function's call and a workflow's run alike are
                    # not made (a run would take a slot and its stages' workers for
                    # nothing).
                    log.info(
                        "invoke.no_reply_subject",
                        function=function,
                        hint="publish to invoke_async for fire-and-forget",
                    )
                    return
                if isinstance(spec, WorkflowSpec):
                    assert self.tasks is not None
                    self.tasks.start_soon(self._reply_workflow, spec, meta, request, reply, arrived)
                    return
                # Metrics (and the root span): its outcome comes with the worker's
                # done note (`heard_done`). Recorded before the send, so that a done
                # note cannot come before its record.
                call = OpenCall(
                    invocation_id=meta.invocation_id,
                    reply=reply,
                    arrived=arrived,
                    give_up_at=deadline_of(meta) + DONE_GRACE_S,
                    function=function,
                    tenant=meta.tenant,
                    span=span if root and span.is_recording() else None,
                )
                key = self.open.add(call)
                held = call.span is not None  # the record ends it from now on
                try:
                    worker = await self.dispatcher.send(meta, body, reply)
                except BaseException:
                    if self.open.get(key) is call:
                        self.open.pop(key)  # not sent: no done note will come
                        held = False
                    raise
                if worker is not None:
                    span.set_attribute("gfaas.worker", worker)
            except GfaasError as exc:
                tracing.mark_error(span, exc.code, exc.reason)
                invocation_id = (headers or {}).get(H_INVOCATION, "")
                await self.dispatcher.bus.reply_error(reply, invocation_id, exc.code, exc.reason)
                await self._refused(function, headers, invocation_id, exc, arrived)
                return
            finally:
                if not held:
                    span.end()

    # -- request-reply (HTTP, async, workflow stages) ---------------------------------------

    async def call(
        self, function: str, body: bytes, headers: Mapping[str, str] | None, *, claim: int = 0
    ) -> InvokeReply:
        arrived = time.monotonic()
        with tracing.handling_span(
            "ingress call",
            headers,
            kind=SpanKind.SERVER,
            attributes={
                "gfaas.function": function,
                "gfaas.tenant": (headers or {}).get(H_TENANT) or DEFAULT_TENANT,
            },
        ) as span:
            try:
                meta, request, spec = self._admit(function, body, headers, span, claim)
            except GfaasError as exc:
                invocation_id = (headers or {}).get(H_INVOCATION, "")
                if not claim:  # an async attempt's outcome: `settled`, once final
                    await self._refused(function, headers, invocation_id, exc, arrived)
                return error_reply("", exc.code, exc.reason)
            if isinstance(spec, WorkflowSpec):
                reply = await self._workflow(spec, meta, request)
            else:
                reply = await self.dispatcher.call(meta, body)
            if reply.error:
                tracing.mark_error(span, reply.error.code, reply.error.reason)
            # An async attempt is not counted here: it may be tried again, and its
            # final outcome (which may be a give-up no attempt returned) is the async
            # path's to say, by `settled`.
            if not claim:
                await self._finished(meta, reply, arrived)
            return reply

    # -- metrics and the failure log ----------------------------------------------------------

    async def _refused(
        self,
        function: str,
        headers: Mapping[str, str] | None,
        invocation_id: str,
        exc: GfaasError,
        arrived: float,
    ) -> None:
        """An invocation answered with an error before any worker had it."""
        tenant = (headers or {}).get(H_TENANT) or DEFAULT_TENANT
        # Its labels: admission may have refused it for its names, so a function not
        # deployed or a tenant that is no valid name is UNNAMED, or every name a
        # caller sends would be another series on every scrape, for good.
        known = self.lookup(function) is not None
        self.metrics.finished(
            function if known else UNNAMED,
            tenant if is_valid_name(tenant) else UNNAMED,
            str(exc.code),
            time.monotonic() - arrived,
        )
        await self._report(function, invocation_id, tenant, exc.code, exc.reason)

    async def _finished(self, meta: InvocationMeta, reply: InvokeReply, arrived: float) -> None:
        error = reply.error
        outcome = OK if error is None else str(error.code)
        seconds = time.monotonic() - arrived
        # slo_ms: SLO attainment (gfaas_invocations_on_time_total).
        slo_ms = self._slo_ms(meta.function)
        self.metrics.finished(meta.function, meta.tenant, outcome, seconds, slo_ms=slo_ms)
        # A worker's reply is logged by that worker; what it never ran, here.
        if error is not None and not reply.worker:
            await self._report(
                meta.function, meta.invocation_id, meta.tenant, error.code, error.reason
            )

    async def settled(
        self,
        function: str,
        headers: Mapping[str, str] | None,
        reply: InvokeReply,
        seconds: float | None,
    ) -> None:
        """An async invocation's final outcome (services/ingress/async_path.py calls
        this once for each): counted with a sync call's labels, and a failure no
        worker logged (a give-up, a malformed message) logged here."""
        tenant = (headers or {}).get(H_TENANT) or DEFAULT_TENANT
        # Its labels as for a refused sync call: a name no deployed function (or no
        # valid tenant) has would be another series for good.
        known = self.lookup(function) is not None
        error = reply.error
        self.metrics.finished(
            function if known else UNNAMED,
            tenant if is_valid_name(tenant) else UNNAMED,
            OK if error is None else str(error.code),
            seconds,
            slo_ms=self._slo_ms(function) if known else None,
        )
        if error is not None and not reply.worker:
            invocation_id = reply.invocation_id or (headers or {}).get(H_INVOCATION, "")
            await self._report(function, invocation_id, tenant, error.code, error.reason)

    async def _report(
        self, function: str, invocation_id: str, tenant: str, code: ErrorCode, reason: str
    ) -> None:
        record = failure_record(
            function=function,
            invocation_id=invocation_id,
            tenant=tenant,
            code=code,
            reason=reason,
            service="ingress",
            instance=self.holder,
        )
        await report_failure(log, self.dispatcher.bus.publish, record)

    def heard_done(self, invocation_id: str, outcome: str, reply: str = "") -> None:
        """A worker's done note for an invocation it answers the caller for itself:
        the one sent with the note's reply subject (Done.reply), never another
        caller's under the same id, nor an invocation of ingress's own (its reply
        subject is an inbox of ours, not recorded here)."""
        call = self.open.done(invocation_id, reply)
        if call is None:
            return
        if call.span is not None:
            if outcome != OK:
                tracing.mark_error(call.span, outcome, "the worker's outcome")
            call.span.end()
        seconds = time.monotonic() - call.arrived
        # slo_ms: SLO attainment (gfaas_invocations_on_time_total).
        slo_ms = self._slo_ms(call.function)
        self.metrics.finished(call.function, call.tenant, outcome, seconds, slo_ms=slo_ms)

    def _slo_ms(self, function: str) -> float | None:
        """The function's (or workflow's) SLO, for the on-time count (metrics)."""
        spec = self.lookup(function)
        return None if spec is None else spec.slo_ms

    def expire_open(self, now: float) -> None:
        """Invocations whose done note never came (the scheduler answered them, or
        their worker died): counted `unknown`, without a duration."""
        for call in self.open.expire(now):
            self.metrics.finished(call.function, call.tenant, UNKNOWN, None)
            if call.span is not None:
                call.span.set_attribute("gfaas.outcome", UNKNOWN)
                call.span.end()

    # -- workflows ------------------------------------------------------------------------

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
        self,
        spec: WorkflowSpec,
        meta: InvocationMeta,
        request: InvokeRequest,
        reply_to: str,
        arrived: float,
    ) -> None:
        slot = False
        # A slot, waited for until the deadline at most: past it the caller has given
        # up, and a run that starts then only sends its first stage to be refused.
        with anyio.move_on_after(max(meta.remaining_s(), 0.0)):
            await self.workflow_slots.acquire()
            slot = True
        if slot:
            try:
                reply = await self._workflow(spec, meta, request)
            finally:
                self.workflow_slots.release()
        else:
            reply = error_reply(
                meta.invocation_id,
                ErrorCode.DEADLINE_EXCEEDED,
                "the deadline passed while the run waited for one of the ingress's "
                f"{self.workflow_concurrency} workflow slots",
            )
        await self._finished(meta, reply, arrived)
        try:
            await self._send_reply(reply_to, reply)
        except Exception as exc:
            # The bus is down or full (this runs in the ingress's own task group, where
            # anything raised would end the ingress): the caller hears nothing and
            # times out, and the outputs it would have held by handle go now.
            log.warning(
                "workflow.reply_not_sent", invocation_id=meta.invocation_id, error=repr(exc)
            )
            handles = [t.handle for t in reply.outputs if t.handle is not None]
            if handles:
                holder = output_holder(request.holder, meta.invocation_id)
                with anyio.CancelScope(shield=True):
                    try:
                        await self.runner.release(handles, holder, meta.tenant, wait=False)
                    except Exception as again:  # their TTL frees them then
                        log.warning("workflow.outputs_not_released", error=repr(again))

    async def _schedule(self, meta: InvocationMeta, body: bytes, near: str) -> InvokeReply:
        """One workflow stage, preferring the worker `near` (its inputs' producer)."""
        # Waited for past the deadline: only that reply says what a stage that
        # finished late handed the run (the run itself gives up at the deadline).
        extra = {H_AFFINITY: near} if near else None
        return await self.dispatcher.call(meta, body, extra, grace_s=LATE_REPLY_S)

    # -- HTTP backend (services.ingress.http.InferenceBackend) ------------------------------

    def ready(self) -> bool:
        return self._connected()

    def specs(self) -> Sequence[FunctionSpec]:
        """Functions and workflows: both are models to an OIP client."""
        functions = self.registry.specs
        return [*self.registry.all(), *(as_model(w, functions) for w in self.workflows.all())]

    def spec(self, name: str) -> FunctionSpec | None:
        workflow = self.workflows.get(name)
        if workflow is not None and self.registry.get(name) is None:
            return as_model(workflow, self.registry.specs)
        return self.registry.get(name)

    def not_ready(self, name: str) -> str | None:
        """A function is ready while ingress serves (deployed is all it takes: workers
        start on demand); a workflow, only while every stage's function is deployed
        too (one removed with `gfaas rm --force` fails its runs)."""
        if not self.ready():
            return "ingress is not serving"
        workflow = self.workflows.get(name)
        if workflow is None or self.registry.get(name) is not None:
            return None
        missing = sorted(
            {s.function for s in workflow.stages if self.registry.get(s.function) is None}
        )
        if missing:
            return f"its stage function(s) {missing} are not deployed"
        return None

    def output_names(self, name: str) -> Collection[str] | None:
        workflow = self.workflows.get(name)
        if workflow is not None and self.registry.get(name) is None:
            return tuple(workflow.outputs)
        spec = self.registry.get(name)
        return tuple(o.name for o in spec.outputs) if spec is not None and spec.outputs else None

    async def infer(
        self, name: str, request: InvokeRequest, headers: Mapping[str, str]
    ) -> InvokeReply:
        return await self.call(name, encode(request), headers)

    async def infer_shm(
        self, name: str, parsed: InferRequest, headers: Mapping[str, str]
    ) -> InvokeReply:
        return await self.staging.infer(name, parsed, headers)

    def details(self) -> dict[str, object]:
        return {
            "accepted": self.accepted,
            "rejected": self.rejected,
            "functions": [s.name for s in self.registry.all()],
            "workflows": [s.name for s in self.workflows.all()],
            "workflow_runs": self.runner.runs,
            "workflow_stages": self.runner.stages,
            **self.dispatcher.details(),
            "max_payload": self.max_payload,
        }

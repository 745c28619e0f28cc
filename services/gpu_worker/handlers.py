"""Taking and running invocations: admission at capacity, one run's lifecycle, done notes.

Plain async methods over a decoded `Job`; they reach the bus through the small
`Bus` protocol (app.py passes the NATS one, tests may pass a fake).

A run: claim an async attempt, execute (execute.py), store a claimed attempt's
result, tell whoever sent it `done`, then answer the caller. A worker at capacity
turns the invocation away: one the scheduler placed goes back to it (`Refused`),
which places it again or queues it; one an ingress sent directly under a grant is
answered `overloaded` (that ingress's `done` first, so its slot is free again).
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import anyio
from opentelemetry.trace import SpanKind

from services.gpu_worker.claims import Claims
from services.gpu_worker.execute import Executor, HandlerFailed, Overran
from services.gpu_worker.state import Books
from shared import subjects, tracing
from shared.bus import Bus as BaseBus
from shared.errors import GfaasError, described
from shared.logs import failure_record, get_logger, report_failure
from shared.metrics import OK, WorkerMetrics, noop
from shared.schema import (
    H_DIRECT,
    H_OUTCOME,
    Done,
    ErrorCode,
    InvocationMeta,
    InvokeReply,
    Refused,
    RefusedReply,
    decode,
    encode,
)

log = get_logger("gpu_worker")

# How long a worker at capacity waits for the scheduler to take an invocation back
# before answering the caller `overloaded` itself.
HAND_BACK_WAIT_S = 0.5


class Bus(BaseBus, Protocol):
    """The shared bus, and replies checked against the payload limit."""

    async def send_reply(self, subject: str, reply: InvokeReply) -> None:
        """The reply, or `payload_too_large` in its place when it exceeds the limit."""
        ...


@dataclass(frozen=True)
class Job:
    """One invocation as it reached this worker: routing headers decoded, body raw."""

    meta: InvocationMeta
    body: bytes
    reply: str
    headers: Mapping[str, str]

    @property
    def via(self) -> str:
        """The ingress that sent it directly under a grant ("": the scheduler did)."""
        return self.headers.get(H_DIRECT, "")

    def done_subject(self) -> str:
        """Whoever sent it hears `done`: that ingress, or the scheduler (and the ingress
        it came through); the scheduler hears both."""
        via = self.via
        try:
            return subjects.done(via) if via else subjects.done_scheduled(self.meta.origin)
        except ValueError:  # not a token: the scheduler alone hears of it
            return subjects.done_scheduled("")


class Runs:
    # Outcomes, phases, cold starts (shared.metrics); app.py sets the served one.
    metrics: WorkerMetrics = WorkerMetrics(noop())

    def __init__(
        self, bus: Bus, books: Books, claims: Claims, executor: Executor, worker_id: str
    ) -> None:
        self.bus = bus
        self.books = books
        self.claims = claims
        self.executor = executor
        self.worker_id = worker_id

    def use_metrics(self, metrics: WorkerMetrics) -> None:
        self.metrics = self.executor.metrics = metrics

    async def admit(self, job: Job) -> bool:
        """True: `job` counts as running, and the caller starts `run` for it. At
        capacity it is turned away (answered for here) and False is returned."""
        if self.books.full:
            await self._refuse(job)
            return False
        self.books.start()
        return True

    async def run(self, job: Job) -> None:
        meta = job.meta
        # outcome: "" until the run has one (the done note then says none).
        ok, done, exec_ms, outcome = False, False, 0.0, ""
        claimed = 0
        try:
            with tracing.handling_span(
                "worker run",
                job.headers,
                kind=SpanKind.CONSUMER,
                invocation_id=meta.invocation_id,
                attributes={
                    "gfaas.function": meta.function,
                    "gfaas.worker": self.worker_id,
                    **tracing.nats_attributes(
                        subjects.worker_run(self.worker_id), tenant=meta.tenant
                    ),
                },
            ) as span:
                failure: GfaasError | None = None
                try:
                    claimed = await self.claims.claim(meta)
                    self.books.first("run_started")
                    reply, exec_ms = await self.executor.execute(meta, job.body)
                    self.books.first("run_executed")
                except GfaasError as exc:
                    tracing.mark_error(span, exc.code, exc.reason)
                    reply = InvokeReply(
                        invocation_id=meta.invocation_id, error=exc.info(), worker=self.worker_id
                    )
                    failure = exc
                    if isinstance(exc, Overran):
                        # Too late for its caller, but it ran: the Done says how long.
                        exec_ms = exc.exec_ms
                if claimed:
                    await self.claims.store(meta, claimed, reply)
                ok = reply.error is None
                # Metrics and the failure log: this run's outcome is decided here.
                outcome = OK if reply.error is None else str(reply.error.code)
                self.metrics.finished(meta.function, meta.tenant, outcome)
                if failure is not None and failure.code is not ErrorCode.SUPERSEDED:
                    await self._log_failure(meta, failure)
            # The span ends before the caller is answered: the caller's (the trace's
            # root) ends once the reply is in, so it covers this one.
            # Done first: whoever sent this then knows the slot is free before
            # the caller, answered, can send its next invocation.
            done = True
            await self.done(job, ok=ok, exec_ms=exec_ms, outcome=outcome)
            if job.reply:
                await self.bus.send_reply(job.reply, reply)
            self.books.first("run_answered")
        except Exception as exc:  # a bug must cost one request, not the worker
            log.exception("run.crashed", invocation_id=meta.invocation_id)
            if not outcome:
                # Counted (here and, by the done note's outcome, at ingress) as the
                # `internal` its caller is told: uncounted here, it was "error" there.
                outcome = str(ErrorCode.INTERNAL)
                self.metrics.finished(meta.function, meta.tenant, outcome)
            await self.claims.give_back(meta, claimed, exc)
            await self.bus.reply_error(
                job.reply, meta.invocation_id, ErrorCode.INTERNAL, described(exc)
            )
        finally:
            self.books.finish(ok)
            if not done:
                with anyio.CancelScope(shield=True):
                    await self.done(job, ok=ok, exec_ms=exec_ms, outcome=outcome)

    async def _log_failure(self, meta: InvocationMeta, failure: GfaasError) -> None:
        """Once per failed run, with the handler's traceback when it raised (or the
        cause of a failed load)."""
        if isinstance(failure, HandlerFailed):
            text = failure.traceback
        elif failure.__cause__ is not None:
            text = "".join(traceback.format_exception(failure.__cause__))
        else:
            text = ""
        record = failure_record(
            function=meta.function,
            invocation_id=meta.invocation_id,
            tenant=meta.tenant,
            code=failure.code,
            reason=failure.reason,
            traceback=text,
            service="gpu-worker",
            instance=self.worker_id,
        )
        await report_failure(log, self.bus.publish, record)

    async def done(self, job: Job, *, ok: bool, exec_ms: float, outcome: str = "") -> None:
        """Tell whoever sent the invocation (the scheduler, or an ingress under a
        grant) that its slot is free; the scheduler hears both. `outcome` (a header:
        "ok" or the caller's error code) is for ingress's metrics."""
        note = Done(
            worker_id=self.worker_id,
            invocation_id=job.meta.invocation_id,
            function=job.meta.function,
            ok=ok,
            exec_ms=round(exec_ms, 3),
            reply=job.reply,
        )
        headers = {H_OUTCOME: outcome} if outcome else None
        await self.bus.publish(job.done_subject(), encode(note), headers=headers)

    async def _refuse(self, job: Job) -> None:
        books = self.books
        books.refused += 1
        if not job.via and await self._hand_back(job):
            return
        # Done before the answer, as after a run: the ingress that sent it frees the
        # slot before its caller, answered, can send again.
        await self.done(job, ok=False, exec_ms=0.0, outcome=ErrorCode.OVERLOADED)
        await self.bus.reply_error(
            job.reply,
            job.meta.invocation_id,
            ErrorCode.OVERLOADED,
            f"worker {self.worker_id} is at capacity ({books.inflight} of {books.limit} running)",
        )

    async def _hand_back(self, job: Job) -> bool:
        """Give an invocation the scheduler placed here back to it: True when it
        answers for it now (it still held it, and places it again or queues it)."""
        refused = Refused(
            worker_id=self.worker_id,
            invocation_id=job.meta.invocation_id,
            inflight=self.books.inflight,
            capacity=self.books.limit,
            reply=job.reply,
        )
        # The whole wait, not cut short by the invocation's deadline: an answer that
        # comes after the worker stopped waiting would mean the scheduler took it and
        # the caller hears from both. The scheduler says at once that it does not take
        # one past its deadline.
        try:
            answer = await self.bus.request(
                subjects.REFUSED, encode(refused), timeout=HAND_BACK_WAIT_S
            )
            taken = decode(answer, RefusedReply).taken
        except Exception as exc:  # no active scheduler, or it did not answer in time
            log.info("refused.not_taken", invocation_id=job.meta.invocation_id, error=repr(exc))
            return False
        if not taken:
            log.info("refused.not_held", invocation_id=job.meta.invocation_id)
        return taken

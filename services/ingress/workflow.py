"""Running a workflow: its stages through the scheduler, intermediates by handle.

Each stage is an ordinary invocation (same scheduler, same workers). A stage whose
outputs feed other stages returns them by handle, held by this run; the consumers
get the handles as inputs and read the bytes in place (same node, same pool). Stages
start as soon as the stages they read from are done, so independent branches run
concurrently (fan-out) and a stage reading several branches waits for all (fan-in).
When the run ends, however it ends, every intermediate it holds is released, and
so is what a stage still running then hands it later (its call goes on listening).

An intermediate whose readers all still wait for other stages is parked: the broker
may then spill it to host memory if its device fills, furthest next reader first.
Once a reader waits on only one more stage, its parked inputs are marked due, so
the broker brings them back ahead of it; the reader's inputs are unparked (and
their possibly new places taken) just before it is sent.

A stage may run on a worker of another node: its outputs are then in that node's
pool, and every broker op on them (release, park, unpark, retain, a read of their
bytes) goes to that node's broker, which alone knows them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

import anyio
import msgspec
from anyio.abc import TaskGroup

from shared.config import PAYLOAD_HEADROOM
from shared.dataplane.backend import BackendError
from shared.dataplane.client import BrokerClient, Brokers, by_pool, move_into
from shared.errors import GfaasError, described
from shared.ids import Holder, new_run_id, output_holder
from shared.logs import get_logger
from shared.schema import (
    ErrorCode,
    FunctionSpec,
    Handle,
    InvocationMeta,
    InvokeReply,
    InvokeRequest,
    OutputMode,
    Tensor,
    encode,
)
from shared.tensors import nbytes_of, validate_inputs
from shared.workflow import INPUT, WorkflowError, WorkflowPlan, check_functions

log = get_logger("ingress.workflow")

# Workflow inputs above this size move into the pool before the first stage.
POOL_INPUTS_ABOVE = 256 * 1024
# Intermediates a spec fixes to at most this many bytes go by value (bench.dp_handoff:
# below about 64 KiB by value is as fast as a handle, without the lease).
SMALL_OUTPUTS = 64 * 1024
# How long past the run's deadline a stage's reply is still listened for: a worker
# that finishes late hands its outputs to the run's holder all the same, and only
# that reply says which, so that they can be released (services.gpu_worker.staging
# hands none over past the deadline; this covers the clocks' skew and the trip).
LATE_REPLY_S = 5.0

# Sends one stage to the scheduler: (meta, body, preferred worker) -> reply.
Schedule = Callable[[InvocationMeta, bytes, str], Awaitable[InvokeReply]]


class WorkflowRunner:
    def __init__(
        self,
        schedule: Schedule,
        broker: BrokerClient,
        functions: Callable[[], Mapping[str, FunctionSpec]],
        holder: str = "",
        tasks: Callable[[], TaskGroup | None] = lambda: None,
        *,
        max_payload: int = 0,
        brokers: Brokers | None = None,
    ) -> None:
        # Runs hold their leases under this name (the ingress's): should the ingress
        # die, the broker drops them with its other references.
        self.holder = holder
        # Where stage calls run, beside their runs (the ingress's long-lived group):
        # a run that ends does not wait for them. Without one, each run waits.
        self.tasks = tasks
        self.schedule = schedule
        self.broker = broker
        # The largest body a stage's request may have (the bus's limit, less room for
        # headers), and the most bytes one read of another node's lease asks for.
        self.max_payload = max_payload or broker.nc.max_payload - PAYLOAD_HEADROOM
        # Every node's broker, for stage outputs in other nodes' pools.
        self.brokers = brokers or Brokers(broker, read_chunk=self.max_payload)
        self.functions = functions
        self.runs = 0
        self.stages = 0

    def broker_of(self, pool: str) -> BrokerClient:
        """The broker of the node whose pool holds a handle (`Handle.pool`)."""
        return self.brokers.of(pool)

    async def release(
        self, handles: Sequence[Handle], holder: str, tenant: str, *, wait: bool = True
    ) -> None:
        """Drop `holder`'s references on `handles`, each at its own node's broker, in
        as many requests as the broker's limit per request takes (a run may hold more:
        many stages, many outputs)."""
        await self.brokers.release(handles, holder, tenant, wait=wait)

    async def run(
        self, plan: WorkflowPlan, meta: InvocationMeta, request: InvokeRequest
    ) -> InvokeReply:
        self.runs += 1
        try:
            check_functions(plan, self.functions())
        except WorkflowError as exc:
            return _error(meta, ErrorCode.UNKNOWN_FUNCTION, str(exc))
        run = _Run(self, plan, meta, request)
        try:
            try:
                return await run.execute()
            finally:
                with anyio.CancelScope(shield=True):
                    await run.release()
        except Exception as exc:
            # Answered, whatever it was: a sync run is a task in the ingress's own
            # group, where anything raised would end the ingress, every caller's runs
            # with it (and this caller would hear nothing until its timeout).
            known = _gfaas_error(exc)
            if known is not None:
                return _error(meta, known.code, known.reason)
            log.exception(
                "workflow.run_failed",
                invocation_id=meta.invocation_id,
                run=run.run_id,
                workflow=plan.spec.name,
            )
            return _error(meta, ErrorCode.INTERNAL, f"the workflow run failed: {described(exc)}")


class _Run:
    def __init__(
        self,
        runner: WorkflowRunner,
        plan: WorkflowPlan,
        meta: InvocationMeta,
        request: InvokeRequest,
    ) -> None:
        self.runner = runner
        self.plan = plan
        self.meta = meta
        self.request = request
        # The run's own id (the caller's may be another run's too): its stages' ids
        # and the holder of its leases come from it; replies keep the caller's.
        self.run_id = new_run_id(meta.invocation_id)
        self.holder = str(Holder(owner=runner.holder).workflow_run(self.run_id))
        self.inputs = {t.name: t for t in request.inputs}
        self.outputs: dict[str, dict[str, Tensor]] = {}
        self.workers: dict[str, str] = {}
        self.done = {stage: anyio.Event() for stage in plan.order}
        self.held: list[Handle] = []
        self.failure: GfaasError | None = None
        # Stage outputs parked (by lease id) -> where the run keeps them.
        self.parked: dict[str, tuple[str, str]] = {}
        self.unparking = anyio.Lock()
        # Set when the run released what it holds: stage replies after that release
        # their outputs themselves.
        self.ended = False

    async def execute(self) -> InvokeReply:
        await self._pool_large_inputs()
        # Without the runner's group, the calls still out when the stages end (a
        # sibling failed) are waited for here; the reply is made outside either group.
        async with anyio.create_task_group() as calls:
            self.calls = self.runner.tasks() or calls
            async with anyio.create_task_group() as tg:
                for index, stage in enumerate(self.plan.order):
                    tg.start_soon(self._stage, index, stage, tg.cancel_scope)
        return await self._reply()

    async def _reply(self) -> InvokeReply:
        if self.failure is not None:
            raise self.failure
        outputs: list[Tensor] = []
        try:
            for name, src in self.plan.outputs.items():
                outputs.append(await self._final(name, src.stage, src.name))
            if self.meta.remaining_s() <= 0:
                # As a worker answers a handler that returned past its deadline: its
                # caller has stopped waiting, and would never release the outputs it
                # was given by handle.
                raise GfaasError(
                    ErrorCode.DEADLINE_EXCEEDED,
                    "the workflow's stages finished past its deadline: its outputs came too late",
                )
        except BaseException:
            # An error reply carries no outputs: the caller's references on those
            # given so far go again (the run's own are released when it ends).
            given = [t.handle for t in outputs if t.handle is not None]
            if given:
                holder = output_holder(self.request.holder, self.meta.invocation_id)
                with anyio.CancelScope(shield=True):
                    await self.runner.release(given, holder, self.meta.tenant)
            raise
        return InvokeReply(
            invocation_id=self.meta.invocation_id,
            outputs=outputs,
            worker=",".join(self.workers[s] for s in self.plan.order),
        )

    async def _stage(self, index: int, stage: str, scope: anyio.CancelScope) -> None:
        deps = sorted(self.plan.deps[stage])
        for n, dep in enumerate(deps):
            await self.done[dep].wait()
            if n == len(deps) - 2:
                await self._due(stage)
        function = self.plan.function_of(stage)
        try:
            await self._unpark_inputs(stage)
            spec = self.runner.functions().get(function)
            if spec is None:
                raise GfaasError(ErrorCode.UNKNOWN_FUNCTION, "is no longer deployed")
            args = [
                msgspec.structs.replace(self._value(src.stage, src.name), name=arg)
                for arg, src in self.plan.sources[stage].items()
            ]
            validate_inputs(spec, args)
            body = self._request(stage, spec, args)
            if len(body) > self.runner.max_payload:
                # By value, its inputs are over the bus's limit together (a wide fan-in
                # of small outputs, workflow inputs beside them): they go by handle.
                body = self._request(stage, spec, await self._pooled_args(args))
        except GfaasError as exc:
            self._fail(scope, stage, function, exc.code, exc.reason)
            return
        stage_meta = InvocationMeta(
            invocation_id=f"{self.run_id}-s{index}",
            function=function,
            tenant=self.meta.tenant,
            deadline_ms=self.meta.deadline_ms,
        )
        # Prefer the worker that produced this stage's inputs: they are in its pool.
        near = next((self.workers[d] for d in sorted(self.plan.deps[stage])), "")
        wait_s = self.meta.remaining_s()
        if wait_s <= 0:
            # Not sent: its worker would only refuse it, and the run answers now.
            self._fail(
                scope,
                stage,
                function,
                ErrorCode.DEADLINE_EXCEEDED,
                "the workflow's deadline passed before this stage could start",
            )
            return
        reply = await self._call(stage_meta, body, near, wait_s)
        if reply is None:
            self._fail(
                scope,
                stage,
                function,
                ErrorCode.DEADLINE_EXCEEDED,
                f"no reply within {wait_s:.3f}s",
            )
            return
        if reply.error is not None:
            self._fail(scope, stage, function, reply.error.code, reply.error.reason)
            return
        self.outputs[stage] = {t.name: t for t in reply.outputs}
        self.workers[stage] = reply.worker
        await self._park_unread(stage)
        self.done[stage].set()

    def _request(self, stage: str, spec: FunctionSpec, args: list[Tensor]) -> bytes:
        request = InvokeRequest(
            inputs=args, outputs_by=self._outputs_by(stage, spec), holder=self.holder
        )
        return encode(request)

    async def _pooled_args(self, args: list[Tensor]) -> list[Tensor]:
        """`args` with their by-value tensors moved into buffers this run holds."""
        values = [t for t in args if t.handle is None and t.data]
        if not values:
            return args
        handles = await self.runner.broker.lease(
            [len(t.data) for t in values], owner=self.holder, tenant=self.meta.tenant
        )
        self.held.extend(handles)
        try:
            moved = {id(t): move_into(h, t) for t, h in zip(values, handles, strict=True)}
        except BackendError as exc:  # this ingress cannot map the pool: by value after all
            log.warning("workflow.inputs_by_value", reason=str(exc))
            return args
        return [moved.get(id(t), t) for t in args]

    async def _call(
        self, meta: InvocationMeta, body: bytes, near: str, wait_s: float
    ) -> InvokeReply | None:
        """The stage's reply, or None when none came within `wait_s` (the deadline).

        The call runs beside the run, not in it: should the run end first (a sibling
        failed, its caller left, its deadline passed), the worker still hands the
        stage's outputs to this run's holder when it finishes; the call, still
        listening, then releases them."""
        got: list[InvokeReply] = []
        arrived = anyio.Event()

        async def call() -> None:
            try:
                if self.ended or self.failure is not None:
                    return  # the run ended before this stage went out: it never goes
                reply = await self._schedule(meta, body, near)
                self.runner.stages += 1
                handles = [t.handle for t in reply.outputs if t.handle is not None]
                if not self.ended:
                    self.held.extend(handles)  # released with the rest when it ends
                    got.append(reply)
                elif handles:
                    await self._release_late(meta, handles)
            finally:
                arrived.set()

        self.calls.start_soon(call)
        with anyio.move_on_after(wait_s):
            await arrived.wait()
        return got[0] if got else None

    async def _schedule(self, meta: InvocationMeta, body: bytes, near: str) -> InvokeReply:
        try:
            return await self.runner.schedule(meta, body, near)
        except Exception as exc:  # raised in the ingress's task group, it would end it
            log.error(
                "workflow.stage_call_failed", invocation_id=meta.invocation_id, error=repr(exc)
            )
            return _error(meta, ErrorCode.INTERNAL, f"the stage's call failed: {described(exc)}")

    async def _release_late(self, meta: InvocationMeta, handles: list[Handle]) -> None:
        log.info("workflow.late_outputs_released", invocation_id=meta.invocation_id)
        try:
            await self._release(handles, meta.tenant)
        except Exception as exc:  # the leases' TTL frees them then
            log.warning("workflow.late_release_failed", error=repr(exc))

    async def _release(self, handles: list[Handle], tenant: str) -> None:
        await self.runner.release(handles, self.holder, tenant, wait=False)

    async def _park(self, handles: list[Handle], next_use_s: float = -1.0) -> None:
        for pool, group in by_pool(handles).items():
            await self.runner.broker_of(pool).park(
                group, self.holder, self.meta.tenant, next_use_s=next_use_s, wait=False
            )

    # -- parking intermediates whose readers wait ----------------------------------------

    def _ready(self, stage: str) -> bool:
        return all(self.done[d].is_set() or d in self.outputs for d in self.plan.deps[stage])

    async def _park_unread(self, stage: str) -> None:
        """Park this stage's by-handle outputs that no reader can take up yet."""
        waiting: list[Handle] = []
        for name, tensor in self.outputs[stage].items():
            readers = [
                reader
                for reader, srcs in self.plan.sources.items()
                if any(src.stage == stage and src.name == name for src in srcs.values())
            ]
            if tensor.handle is not None and readers and not any(map(self._ready, readers)):
                waiting.append(tensor.handle)
                self.parked[tensor.handle.lease_id] = (stage, name)
        if waiting:
            await self._park(waiting)

    def _parked_inputs(self, stage: str) -> list[tuple[str, str]]:
        places = {(src.stage, src.name) for src in self.plan.sources[stage].values()}
        return [place for place in self.parked.values() if place in places]

    async def _due(self, stage: str) -> None:
        """`stage` now waits on one more stage only: its parked inputs are due soon."""
        due = [self.outputs[s][n].handle for s, n in self._parked_inputs(stage)]
        handles = [h for h in due if h is not None]
        if handles:
            await self._park(handles, next_use_s=0.0)

    async def _unpark_inputs(self, stage: str) -> None:
        async with self.unparking:  # two readers of one parked output: one unparks it
            places = self._parked_inputs(stage)
            if not places:
                return
            by_node: dict[str, list[tuple[str, str]]] = {}
            for s, n in places:
                handle = self.outputs[s][n].handle
                assert handle is not None  # only handles are parked
                by_node.setdefault(handle.pool, []).append((s, n))
            for pool, here in by_node.items():
                handles = [self.outputs[s][n].handle for s, n in here]
                current = await self.runner.broker_of(pool).unpark(
                    [h for h in handles if h is not None], self.holder, self.meta.tenant
                )
                for (s, n), handle in zip(here, current, strict=True):
                    self.outputs[s][n] = msgspec.structs.replace(self.outputs[s][n], handle=handle)
                    del self.parked[handle.lease_id]

    async def _pool_large_inputs(self) -> None:
        """Large workflow inputs go into the pool once, here: each stage that reads
        them then gets a handle instead of the bytes through scheduler and worker."""
        large = [t for t in self.inputs.values() if len(t.data) > POOL_INPUTS_ABOVE]
        if not large:
            return
        handles = await self.runner.broker.lease(
            [len(t.data) for t in large], owner=self.holder, tenant=self.meta.tenant
        )
        self.held.extend(handles)
        try:
            pooled = [move_into(h, t) for t, h in zip(large, handles, strict=True)]
        except BackendError as exc:  # this ingress cannot map the pool: stay by value
            log.warning("workflow.inputs_by_value", reason=str(exc))
            return
        self.inputs.update((t.name, t) for t in pooled)

    def _outputs_by(self, stage: str, spec: FunctionSpec) -> OutputMode:
        """Outputs other stages read go by handle, unless the spec fixes them to a few
        KiB: then carrying the bytes costs less than leasing a buffer."""
        if not self.plan.feeds_stages(stage):
            return self.request.outputs_by
        fixed = bool(spec.outputs) and all(d >= 0 for t in spec.outputs for d in t.shape)
        if fixed and sum(nbytes_of(t.dtype, t.shape) for t in spec.outputs) <= SMALL_OUTPUTS:
            return OutputMode.VALUE
        return OutputMode.HANDLE

    def _value(self, stage: str, name: str) -> Tensor:
        if stage == INPUT:
            return self.inputs[name]
        found = self.outputs[stage].get(name)
        if found is None:
            raise GfaasError(
                ErrorCode.HANDLER_ERROR,
                f"stage {stage} returned no output {name!r} "
                f"(it returned {sorted(self.outputs[stage])})",
            )
        return found

    def _fail(
        self, scope: anyio.CancelScope, stage: str, function: str, code: ErrorCode, reason: str
    ) -> None:
        if self.failure is None:
            self.failure = GfaasError(code, f"stage {stage} ({function}): {reason}")
        scope.cancel()

    async def _final(self, name: str, stage: str, output: str) -> Tensor:
        tensor = msgspec.structs.replace(self._value(stage, output), name=name)
        holder = output_holder(self.request.holder, self.meta.invocation_id)
        if tensor.handle is None:
            if self.request.outputs_by is OutputMode.HANDLE:
                # It also fed another stage, by value (a few fixed KiB), or is a
                # workflow input: asked for by handle (shared-memory staging writes
                # its regions from the pool), it goes there.
                return await self._pooled(tensor, holder)
            return tensor
        pool = tensor.handle.pool
        if self.request.outputs_by is OutputMode.VALUE:
            # The output also fed another stage, so it went by handle: copy it out
            # (from another node's pool, through its broker: it cannot be mapped here).
            data = await self.runner.brokers.read(tensor.handle, self.meta.tenant)
            return msgspec.structs.replace(tensor, handle=None, data=data)
        # The caller keeps it: its own reference, before this run drops its one.
        await self.runner.broker_of(pool).retain([tensor.handle], holder, self.meta.tenant)
        return tensor

    async def _pooled(self, tensor: Tensor, holder: str) -> Tensor:
        """A by-value output in a buffer leased for the caller (`holder`)."""
        (handle,) = await self.runner.broker.lease(
            [len(tensor.data)], owner=holder, tenant=self.meta.tenant
        )
        try:
            return move_into(handle, tensor)
        except BackendError as exc:
            # This ingress cannot map the pool: by value after all (a caller that
            # needs it in the pool says so clearly: ShmStaging).
            log.warning("workflow.output_by_value", output=tensor.name, reason=str(exc))
            with anyio.CancelScope(shield=True):
                await self.runner.broker.release([handle], holder, self.meta.tenant)
            return tensor
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.runner.broker.release([handle], holder, self.meta.tenant)
            raise

    async def release(self) -> None:
        self.ended = True
        if not self.held:
            return
        # Published, not awaited: the reply need not wait for it, and the broker takes
        # its requests in order. Should it be lost, the leases' TTL frees them.
        held, self.held = self.held, []
        await self._release(held, self.meta.tenant)


def _gfaas_error(exc: BaseException) -> GfaasError | None:
    """`exc` if it is a GfaasError, or the one a task group wrapped (a stage's)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, GfaasError) else None


def _error(meta: InvocationMeta, code: ErrorCode, reason: str) -> InvokeReply:
    return InvokeReply(
        invocation_id=meta.invocation_id,
        error=GfaasError(code, reason).info(),
    )

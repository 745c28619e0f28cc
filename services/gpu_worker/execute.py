"""Running one invocation: its function's handler, warm from the cache, on its inputs.

From the raw body to the reply: the deadline and the spec are checked, the body
decoded, the handler taken from the cache (loaded on a miss), the inputs staged
(staging.py), the handler run (on a thread, or inline once it is known to be
quick), and its result turned into the reply's outputs. Every failure is a
GfaasError with the code the caller gets.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import msgspec
import torch

from services.gpu_worker.models import HandlerCache, Loaded
from services.gpu_worker.staging import Staged, Staging
from services.gpu_worker.tokens import TokenGate
from shared.dataplane.backend import tensor_from_handle
from shared.errors import GfaasError, described
from shared.function import InvalidInput, output_buffers
from shared.metrics import WorkerMetrics, noop
from shared.registry import Registry
from shared.schema import (
    ErrorCode,
    FunctionSpec,
    InvocationMeta,
    InvokeReply,
    InvokeRequest,
    decode,
)
from shared.tensors import shape_of


class HandlerFailed(GfaasError):
    """The handler raised: `handler_error` for the caller, and the handler's traceback
    for the failure log (shared.logs.report_failure)."""

    def __init__(self, reason: str, raised: BaseException) -> None:
        super().__init__(ErrorCode.HANDLER_ERROR, reason)
        self.traceback = "".join(traceback.format_exception(raised))


class Overran(GfaasError):
    """The handler ran to its end but past the invocation's deadline: `deadline_exceeded`
    for the caller, and the handler's real running time (`exec_ms`) for the scheduler,
    which learns how long the function takes from it as from an ok run."""

    def __init__(self, reason: str, exec_ms: float) -> None:
        super().__init__(ErrorCode.DEADLINE_EXCEEDED, reason)
        self.exec_ms = exec_ms


class HandlerExit(Exception):
    """A handler raised a BaseException that is not cancellation (SystemExit, ...)."""

    def __init__(self, raised: BaseException) -> None:
        super().__init__(raised)
        self.raised = raised


def run_handler(
    entry: Loaded, inputs: dict[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]
) -> tuple[Any, float]:
    """The handler's result and its own running time in ms, timed where it runs: a
    wait for the thread pool is not the handler's, and counting it would keep a
    quick handler off the event loop for good once the loop got busy."""
    raw, exec_ms, _ = run_metered(entry, inputs, buffers)
    return raw, exec_ms


def run_metered(
    entry: Loaded, inputs: dict[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]
) -> tuple[Any, float, float]:
    """`run_handler`, and the device time the run used in seconds, as a token
    arbiter charges it: CUDA events on a GPU, the thread's CPU time on a CPU (torch
    intra-op threads beyond the calling one are not counted: instances run with
    their cores' worth, and the wall time is charged when that is larger than one)."""
    # The buffers are set here, in the thread that runs the handler.
    cuda = entry.ctx.device.startswith("cuda")
    events = None
    if cuda:
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        events[0].record()
    started, cpu_started = time.perf_counter(), time.thread_time()
    try:
        with torch.inference_mode(), output_buffers(buffers):
            raw = entry.handler(inputs)
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as exc:
        # SystemExit, KeyboardInterrupt, ... from a handler would end the worker (on
        # the loop, or re-raised there from the thread) after its `done` went out,
        # leaving the caller unanswered: it is the handler's failure, nothing more.
        raise HandlerExit(exc) from exc
    wall = time.perf_counter() - started
    used = time.thread_time() - cpu_started
    if events is not None:
        events[1].record()
        events[1].synchronize()
        used = events[0].elapsed_time(events[1]) / 1000.0
    elif torch.get_num_threads() > 1:
        used = max(used, wall)
    return raw, wall * 1000.0, used


class Executor:
    # Phases, cold starts and cache look-ups (shared.metrics); app.py sets the served one.
    metrics: WorkerMetrics = WorkerMetrics(noop())

    def __init__(
        self,
        registry: Registry[FunctionSpec],
        handlers: HandlerCache,
        staging: Staging,
        *,
        worker_id: str,
        function: str = "",
        gate: TokenGate | None = None,
        ready: Callable[[float], Awaitable[None]] | None = None,
        mark: Callable[[str], None] = lambda step: None,
    ) -> None:
        self.registry = registry
        self.handlers = handlers
        self.staging = staging
        self.worker_id = worker_id
        # An instance serves `function` alone, each run gated by its agent's tokens.
        self.function = function
        self.gate = gate
        # An instance's start (instance_start.InstanceStart.ready): a run received
        # while it loads waits there, with its inputs staged, until it has loaded.
        self.ready = ready
        # The first run's steps, for the instance's start-up timeline (Books.first).
        self.mark = mark
        # Metrics: the entry each function last ran with; another one was just loaded.
        self._ran_with: dict[str, Loaded] = {}

    async def execute(self, meta: InvocationMeta, body: bytes) -> tuple[InvokeReply, float]:
        """The reply to one invocation and its handler's running time in ms."""
        if meta.remaining_s() <= 0:
            raise GfaasError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed before execution")
        if self.function and meta.function != self.function:
            # Misrouted (a stale view of which worker is which): another instance can.
            raise GfaasError(
                ErrorCode.UNAVAILABLE,
                f"{self.worker_id} is an instance of {self.function!r}, not {meta.function!r}",
            )
        spec = await self.registry.lookup(meta.function)
        if spec is None:
            raise GfaasError(
                ErrorCode.UNKNOWN_FUNCTION, f"function {meta.function!r} is not deployed"
            )
        spec = self.handlers.servable(spec)  # the loaded version, across a code change
        try:
            request = decode(body, InvokeRequest)
        except msgspec.MsgspecError as exc:
            raise GfaasError(ErrorCode.BAD_REQUEST, f"malformed request: {exc}") from None
        started = time.perf_counter()  # metrics: the input and load (cold) phases
        # Inputs first: in an instance still starting they are staged while its
        # handler and model load (SAGE's parallel setup), and the run then waits.
        async with self.staging.staged(meta, request, spec) as staged:
            staged_at = time.perf_counter()
            self.mark("run_staged")
            self.metrics.phase(spec.name, "input", staged_at - started)
            if self.ready is not None:
                await self.ready(meta.remaining_s())
            async with self.handlers.use(spec, wait_s=meta.remaining_s()) as entry:
                self._looked_up(spec.name, entry, time.perf_counter() - staged_at)
                return await self._call(spec, meta, entry, staged)

    def _looked_up(self, function: str, entry: Loaded, waited_s: float) -> None:
        """Metrics: a hit in the device tier, or a cold start that waited `waited_s`
        for its load (also when another run's load of it was under way)."""
        hit = self._ran_with.get(function) is entry
        self.metrics.looked_up(function, hit=hit, weights_from=entry.weights_from)
        if not hit:
            self._ran_with[function] = entry
            self.metrics.phase(function, "load", waited_s)

    async def _call(
        self, spec: FunctionSpec, meta: InvocationMeta, entry: Loaded, staged: Staged
    ) -> tuple[InvokeReply, float]:
        dtypes = {t.name: t.dtype for t in spec.outputs}
        buffers = {
            name: tensor_from_handle(h, dtypes[name], shape_of(spec, name))
            for name, h in staged.prepared.items()
        }
        inputs = staged.inputs
        called = time.perf_counter()  # metrics: queue (limiter, tokens) and execute
        try:
            if self.gate is not None:
                # An instance: the batch runs only while it holds device time.
                async with self.gate.turn(meta.remaining_s()) as held:
                    with anyio.fail_after(max(meta.remaining_s(), 0.001)):
                        raw, exec_ms, held.used_s = await anyio.to_thread.run_sync(
                            run_metered, entry, inputs, buffers, limiter=entry.limiter
                        )
            elif entry.runs_inline:
                raw, exec_ms = run_handler(entry, inputs, buffers)
            else:
                with anyio.fail_after(max(meta.remaining_s(), 0.001)):
                    raw, exec_ms = await anyio.to_thread.run_sync(
                        run_handler, entry, inputs, buffers, limiter=entry.limiter
                    )
        except TimeoutError:
            raise GfaasError(
                ErrorCode.DEADLINE_EXCEEDED, f"{spec.name} ran past its deadline"
            ) from None
        except GfaasError:
            raise
        except InvalidInput as exc:
            raise GfaasError(ErrorCode.INVALID_INPUT, f"{spec.name}: {exc}") from None
        except Exception as exc:
            raised = exc.raised if isinstance(exc, HandlerExit) else exc
            raise HandlerFailed(f"{spec.name} raised {described(raised)}", raised) from None
        entry.observe(exec_ms)
        self.metrics.phase(spec.name, "execute", exec_ms / 1000.0)
        self.metrics.phase(spec.name, "queue", time.perf_counter() - called - exec_ms / 1000.0)
        if meta.remaining_s() <= 0:
            # A handler's thread cannot be cancelled: `fail_after` only fires while
            # the run waits for a thread, and one that overran its deadline returns
            # late, as if in time. Its caller has stopped waiting: the answer is the
            # deadline, and the late result is dropped (not stored, not counted ok);
            # its running time is still how long the function takes.
            raise Overran(
                f"{spec.name} ran past its deadline ({exec_ms:.0f} ms): its result came too late",
                exec_ms,
            )
        if not isinstance(raw, dict):
            raise GfaasError(
                ErrorCode.HANDLER_ERROR,
                f"{spec.name} returned {type(raw).__name__}, expected a mapping of tensors",
            )
        staging_started = time.perf_counter()  # metrics: the output phase
        outputs = await self.staging.outputs(meta, staged.request, spec, raw, staged.prepared)
        self.metrics.phase(spec.name, "output", time.perf_counter() - staging_started)
        return (
            InvokeReply(
                invocation_id=meta.invocation_id,
                outputs=outputs,
                worker=self.worker_id,
                exec_ms=round(exec_ms, 3),
            ),
            exec_ms,
        )

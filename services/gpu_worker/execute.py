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
from collections.abc import Mapping
from typing import Any

import anyio
import msgspec
import torch

from services.gpu_worker.models import HandlerCache, Loaded
from services.gpu_worker.staging import Staged, Staging
from shared.dataplane.backend import tensor_from_handle
from shared.errors import GfaasError
from shared.function import InvalidInput, output_buffers
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
    # The buffers are set here, in the thread that runs the handler.
    started = time.perf_counter()
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
    return raw, (time.perf_counter() - started) * 1000.0


class Executor:
    def __init__(
        self,
        registry: Registry[FunctionSpec],
        handlers: HandlerCache,
        staging: Staging,
        *,
        worker_id: str,
    ) -> None:
        self.registry = registry
        self.handlers = handlers
        self.staging = staging
        self.worker_id = worker_id

    async def execute(self, meta: InvocationMeta, body: bytes) -> tuple[InvokeReply, float]:
        """The reply to one invocation and its handler's running time in ms."""
        if meta.remaining_s() <= 0:
            raise GfaasError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed before execution")
        spec = await self.registry.lookup(meta.function)
        if spec is None:
            raise GfaasError(
                ErrorCode.UNKNOWN_FUNCTION, f"function {meta.function!r} is not deployed"
            )
        try:
            request = decode(body, InvokeRequest)
        except msgspec.MsgspecError as exc:
            raise GfaasError(ErrorCode.BAD_REQUEST, f"malformed request: {exc}") from None
        async with (
            self.handlers.use(spec, wait_s=meta.remaining_s()) as entry,
            self.staging.staged(meta, request, spec) as staged,
        ):
            return await self._call(spec, meta, entry, staged)

    async def _call(
        self, spec: FunctionSpec, meta: InvocationMeta, entry: Loaded, staged: Staged
    ) -> tuple[InvokeReply, float]:
        dtypes = {t.name: t.dtype for t in spec.outputs}
        buffers = {
            name: tensor_from_handle(h, dtypes[name], shape_of(spec, name))
            for name, h in staged.prepared.items()
        }
        inputs = staged.inputs
        try:
            if entry.runs_inline:
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
            raise GfaasError(
                ErrorCode.HANDLER_ERROR,
                f"{spec.name} raised {type(raised).__name__}: {raised}",
            ) from None
        entry.observe(exec_ms)
        if not isinstance(raw, dict):
            raise GfaasError(
                ErrorCode.HANDLER_ERROR,
                f"{spec.name} returned {type(raw).__name__}, expected a mapping of tensors",
            )
        outputs = await self.staging.outputs(meta, staged.request, raw, staged.prepared)
        return (
            InvokeReply(
                invocation_id=meta.invocation_id,
                outputs=outputs,
                worker=self.worker_id,
                exec_ms=round(exec_ms, 3),
            ),
            exec_ms,
        )

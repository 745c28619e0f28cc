"""An instance's start (SAGE's parallel setup): its spec read, then its handler and
model loaded while it already takes the invocations that wait for its function's
first instance, their inputs staged during the load instead of after it.

`prepare` reads the spec and sets the instance's concurrency and memory cap, quickly
and before the instance subscribes; `load` runs beside everything else; a run waits
in `ready` (after staging its inputs) for the load to finish. A start that fails
answers those runs with why, and only then tells the agent (`report_failure`).
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import msgspec
from nats.aio.client import Client as NATS

from services.gpu_worker import state
from services.gpu_worker.models import HandlerCache
from shared import subjects
from shared.config import Settings
from shared.errors import GfaasError, described
from shared.logs import get_logger
from shared.registry import Registry
from shared.schema import ErrorCode, ErrorInfo, FunctionSpec, InstanceFailed, encode

log = get_logger("gpu_worker")


class InstanceStart:
    def __init__(
        self,
        settings: Settings,
        registry: Registry[FunctionSpec],
        handlers: HandlerCache,
        books: state.Books,
        *,
        device_context: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.function = settings.instance_function
        self.registry = registry
        self.handlers = handlers
        self.books = books
        # On a GPU: the device context created and this instance's memory capped.
        self.device_context = device_context
        self.spec: FunctionSpec | None = None
        self.error: ErrorInfo | None = None
        self.loaded = anyio.Event()
        # Set once the beat that says it is ready has left (after `loaded`): a run
        # that waited for the start executes only then, so an instance that dies
        # before the scheduler heard it ready has run nothing it took, and the
        # scheduler may send those invocations elsewhere.
        self.serving = anyio.Event()

    @property
    def failed(self) -> bool:
        return self.error is not None

    async def prepare(self) -> bool:
        """The spec read and the instance's concurrency set from it; False (the
        reason in `error`) when there is none to serve."""
        try:
            spec = await self.registry.lookup(self.function)
            if spec is None:
                raise GfaasError(
                    ErrorCode.UNKNOWN_FUNCTION, f"function {self.function!r} is not deployed"
                )
            if self.settings.instance_spec:
                self.handlers.started_for = msgspec.json.decode(
                    self.settings.instance_spec, type=FunctionSpec
                )
        except Exception as exc:
            self._fail(exc)
            return False
        # A redeploy since the start command that changed the code bundle: the
        # version started for (the scheduler replaces this instance once the new
        # version's is ready).
        self.spec = self.handlers.servable(spec)
        if self.spec is not spec:
            log.info("instance.serves_started_version", function=self.function)
        self.books.limit = self.books.capacity = max(1, self.spec.concurrency)
        return True

    async def load(self) -> None:
        """The handler and model loaded (the runs waiting in `ready` go on after)."""
        assert self.spec is not None, "prepare first"
        spec = self.spec
        try:
            if self.device_context is not None:
                # In a thread: the runs that wait for this start are received and
                # their inputs staged meanwhile. Before the load, so that the cap
                # holds for every allocation the build makes.
                await anyio.to_thread.run_sync(self.device_context)
            async with self.handlers.use(spec, wait_s=spec.timeout_ms / 1000.0) as entry:
                self.books.setup_at.update(entry.setup_at)
        except Exception as exc:
            self._fail(exc)
        finally:
            self.loaded.set()

    async def ready(self, wait_s: float) -> None:
        """Until the handler is loaded and the instance has said so (at most
        `wait_s`, a run's deadline); the start's error, for a run that waited for a
        start that failed."""
        with anyio.move_on_after(max(wait_s, 0.0)):
            await self.loaded.wait()
            if self.error is None:
                await self.serving.wait()
        if self.error is not None:
            raise GfaasError(
                self.error.code,
                f"an instance of {self.function!r} could not start: {self.error.reason}",
            )
        if not self.serving.is_set():
            raise GfaasError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"the deadline passed while an instance of {self.function!r} started",
            )

    def _fail(self, exc: Exception) -> None:
        error = exc.info() if isinstance(exc, GfaasError) else None
        self.error = error or ErrorInfo(
            code=ErrorCode.HANDLER_ERROR, reason=f"{self.function}: {described(exc)}"
        )
        log.error(
            "instance.start_failed",
            function=self.function,
            code=self.error.code,
            reason=self.error.reason,
        )

    async def report_failure(self, nc: NATS) -> None:
        """Tell the agent (its beat then says FAILED, with the reason, to the scheduler)."""
        assert self.error is not None
        note = InstanceFailed(instance_id=self.books.worker_id, error=self.error)
        await nc.publish(subjects.agent(self.settings.instance_agent, "failed"), encode(note))
        await nc.flush()

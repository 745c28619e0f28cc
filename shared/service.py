"""Running one service as a process: logging, tracing, signals, structured shutdown.

A service is `serve(settings, stop, *, task_status)`: it reports ready through
task_status once subscribed, runs until `stop` is set, then stops intake, lets
in-flight work finish within its grace period and drains its connection. The
first SIGTERM/SIGINT sets `stop`; a second one cancels outright. A service that
cannot start raises `ServiceStartFailed` instead of reporting ready: its process
then exits START_FAILED_EXIT with the reason logged, not a traceback.
"""

from __future__ import annotations

import gc
import inspect
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

from shared.config import Settings
from shared.logs import configure_logging, get_logger
from shared.tracing import configure_tracing, shutdown_tracing

# The exit status of a service process that could not start (`ServiceStartFailed`).
START_FAILED_EXIT = 3


class ServiceStartFailed(Exception):
    """Raised by a service's `serve` in place of reporting ready: it cannot start,
    and has told whoever waits on it why (an instance: its agent and the calls that
    waited for it). Its process exits START_FAILED_EXIT, the reason logged."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ServeFn(Protocol):
    def __call__(
        self,
        settings: Settings,
        stop: anyio.Event,
        *,
        task_status: TaskStatus[None] = ...,
    ) -> Awaitable[None]: ...


async def _watch_signals(stop: anyio.Event, scope: anyio.CancelScope) -> None:
    log = get_logger("service")
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if stop.is_set():
                log.warning("service.forced_stop", signal=signal.Signals(signum).name)
                scope.cancel()
                return
            log.info("service.stopping", signal=signal.Signals(signum).name)
            stop.set()


async def _serve_then_unwatch(
    serve: ServeFn,
    settings: Settings,
    stop: anyio.Event,
    watcher: anyio.CancelScope,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await serve(settings, stop, task_status=task_status)
    finally:
        watcher.cancel()


async def _run(name: str, serve: ServeFn, settings: Settings) -> int:
    """The service until it stops; its process's exit status."""
    stop = anyio.Event()
    log = get_logger(name)
    watcher = anyio.CancelScope()
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            with watcher:
                await _watch_signals(stop, tg.cancel_scope)

        tg.start_soon(watch)
        try:
            await tg.start(_serve_then_unwatch, serve, settings, stop, watcher)
        except ServiceStartFailed as exc:
            # Its own, not a bug: the reason, not a traceback (`serve` returned,
            # so the watcher is cancelled and the group ends).
            log.error("service.start_failed", service=name, reason=exc.reason)
            return START_FAILED_EXIT
        settle_heap()
        log.info("service.ready", service=name, nats_url=settings.nats_url)
    log.info("service.stopped", service=name)
    return 0


def settle_heap() -> None:
    """Keep what start-up built (imported modules, torch, loaded handlers) out of the
    garbage collector's sight. Otherwise each full collection walks it all: with torch
    imported that is a pause of over 100 ms every second or so under load, stalling
    every invocation in flight."""
    gc.collect()
    gc.freeze()


def backend_options() -> dict[str, bool]:
    # uvloop roughly halves the per-message cost of the asyncio loop: every
    # invocation crosses three services, so it shows in end-to-end latency.
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def run_service(name: str, serve: ServeFn, settings: Settings) -> int:
    """Run the service to its end; the process's exit status (0, or
    START_FAILED_EXIT when it could not start)."""
    configure_logging(settings.log_level, json=settings.log_json)
    configure_tracing(name)
    try:
        return anyio.run(_run, name, serve, settings, backend_options=backend_options())
    finally:
        shutdown_tracing()


# A chore that keeps failing the same way is logged once per this many seconds.
CHORE_LOG_EVERY_S = 30.0


async def every(period_s: float, fn: Callable[[], object]) -> None:
    """Call `fn` every `period_s` seconds until cancelled (a service's periodic chores:
    heartbeats, ticks, pruning); an `fn` that is a coroutine function is awaited.

    A round that raises is logged and the next one runs: one bad entry in what a
    chore walks (a spec the scheduler cannot plan, say) must not end the service,
    and a restarted one would only meet it again."""
    logged: dict[str, float] = {}
    while True:
        await anyio.sleep(period_s)
        try:
            result = fn()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            now = anyio.current_time()
            key = repr(exc)
            if now - logged.get(key, -CHORE_LOG_EVERY_S) >= CHORE_LOG_EVERY_S:
                logged[key] = now
                get_logger("service").exception(
                    "service.chore_failed", chore=getattr(fn, "__qualname__", repr(fn))
                )


def instance_name() -> str:
    """This process's name among a service's instances (status, logs): host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"

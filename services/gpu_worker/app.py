"""The GPU worker: one process per device, running function handlers.

It takes invocations on its own subject, keeps handlers (and their models) warm,
answers the caller directly on the message's reply subject, tells the scheduler
when each invocation is done, and heartbeats its device state.

This module is the wiring: connection, stores, subscriptions, task groups and
shutdown. Runs and admission live in handlers.py, executing one in execute.py,
its inputs and outputs on the data plane in staging.py, the books and heartbeats
in state.py, async claims in claims.py, deploys' handler checks in sandbox.py.
"""

from __future__ import annotations

import os
import re
import socket

import anyio
import torch
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.gpu_worker import state
from services.gpu_worker.claims import Claims
from services.gpu_worker.device import device_cache_bytes, pick_device
from services.gpu_worker.execute import Executor
from services.gpu_worker.handlers import Job, Runs
from services.gpu_worker.models import HandlerCache
from services.gpu_worker.sandbox import HandlerChecks
from services.gpu_worker.staging import Staging
from shared import jetstream, subjects
from shared.bus import NatsBus, connected, decode_event, routed, send_reply, serve_status
from shared.config import Settings, effective_max_payload
from shared.dataplane.backend import prune_mappings
from shared.dataplane.board import board_name
from shared.dataplane.client import BrokerClient
from shared.logs import get_logger
from shared.modelstore import ModelStore
from shared.modelswap import HostTier, tier_prefix
from shared.registry import Registry
from shared.results import ResultStore
from shared.schema import (
    ErrorCode,
    ErrorInfo,
    HandlerCheck,
    HandlerCheckReply,
    InvokeReply,
    encode,
)
from shared.service import every

log = get_logger("gpu_worker")

# On shutdown, how long the worker keeps taking direct sends after saying it stops.
REVOKE_WAIT_S = 0.2
# Grace period for in-flight invocations on shutdown.
DRAIN_GRACE_S = 20.0


def default_worker_id(device: str) -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:24]
    return f"{host}-{device.replace(':', '')}-{os.getpid()}"


class WorkerBus(NatsBus):
    """The bus as the worker's handlers use it: replies checked against the payload limit."""

    def __init__(self, nc: NATS, max_payload: int) -> None:
        super().__init__(nc)
        self.max_payload = max_payload

    async def send_reply(self, subject: str, reply: InvokeReply) -> None:
        await send_reply(self.nc, subject, reply, max_payload=self.max_payload)


async def serve(
    settings: Settings,
    stop: anyio.Event,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    device = pick_device(settings.device)
    torch.set_num_threads(max(1, settings.threads))
    worker_id = settings.worker_id or default_worker_id(device)
    async with connected(settings.nats_url, f"gfaas-worker-{worker_id}") as nc:
        js = nc.jetstream()
        max_payload = effective_max_payload(settings, nc.max_payload)
        registry = await Registry.open(js, replicas=settings.js_replicas)
        models = await ModelStore.open(js, replicas=settings.js_replicas)
        results = ResultStore(
            await jetstream.results_kv(js, replicas=settings.js_replicas),
            max_payload=max_payload,
        )
        books = state.Books(
            worker_id=worker_id,
            device=device,
            node=settings.node,
            limit=settings.capacity,
            capacity=settings.capacity,
        )
        handlers = HandlerCache(
            device=device,
            threads=settings.threads,
            capacity_bytes=device_cache_bytes(settings.device_cache_mb, device),
            fetch_weights=lambda name: models.fetch(name, settings.state_dir / "models"),
            group_bytes=settings.swap_group_kb * 1024,
            host_tier=HostTier(tier_prefix(settings.shm_namespace)),
        )
        staging = Staging(
            BrokerClient(
                nc, settings.node, board=board_name(settings.shm_namespace, settings.node)
            ),
            worker_id=worker_id,
            device=device,
            node=settings.node,
            max_payload=max_payload,
            remote=lambda node: BrokerClient(nc, node),
        )
        runs = Runs(
            WorkerBus(nc, max_payload),
            books,
            Claims(results, worker_id, books.claimed),
            Executor(registry, handlers, staging, worker_id=worker_id),
            worker_id,
        )

        checks = HandlerChecks()

        async def send_heartbeat() -> None:
            beat = state.heartbeat(books, handlers)
            await nc.publish(subjects.heartbeat(worker_id), encode(beat))

        async with anyio.create_task_group() as service_tg:
            await service_tg.start(registry.watch)
            async with anyio.create_task_group() as running:

                async def on_run(msg: Msg) -> None:
                    meta = await routed(nc, msg)
                    if meta is None:
                        return
                    job = Job(meta, msg.data, msg.reply, msg.headers or {})
                    if await runs.admit(job):
                        running.start_soon(runs.run, job)

                run_sub = await nc.subscribe(subjects.worker_run(worker_id), cb=on_run)

                async def answer_check(msg: Msg) -> None:
                    request = decode_event(msg, HandlerCheck)
                    reply = HandlerCheckReply(
                        error=ErrorInfo(code=ErrorCode.BAD_REQUEST, reason="malformed HandlerCheck")
                    )
                    try:
                        if request is not None:
                            reply = await checks.check(request)
                        await msg.respond(encode(reply))
                    except Exception:  # a check must cost that deploy its check, not the worker
                        log.exception("handler_check.crashed")

                async def on_check(msg: Msg) -> None:
                    # Each in its own task: a sandbox takes seconds, and checks of
                    # several deploys run side by side (up to the limiter's count).
                    service_tg.start_soon(answer_check, msg)

                check_sub = await nc.subscribe(
                    subjects.HANDLER_CHECK, queue=subjects.Q_WORKERS, cb=on_check
                )
                await serve_status(
                    nc, "gpu-worker", worker_id, lambda: state.details(books, handlers, staging)
                )
                await send_heartbeat()

                async def beat() -> None:
                    await send_heartbeat()
                    prune_mappings()

                service_tg.start_soon(every, settings.heartbeat_s, beat)
                log.info("worker.started", worker=worker_id, device=device)
                task_status.started()
                await stop.wait()
                # Stop intake: capacity 0 tells the scheduler to send nothing more.
                books.capacity = 0
                await send_heartbeat()
                # Ingress instances that hold grants here hear of the revocation
                # before the subscription goes: what they sent meanwhile still runs.
                await anyio.sleep(REVOKE_WAIT_S)
                await check_sub.unsubscribe()
                await run_sub.drain()
                with anyio.move_on_after(DRAIN_GRACE_S):
                    await books.idle.wait()
                running.cancel_scope.cancel()
            service_tg.cancel_scope.cancel()

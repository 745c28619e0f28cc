"""The GPU worker: one process per device, running function handlers.

It takes invocations on its own subject, keeps handlers (and their models) warm,
answers the caller directly on the message's reply subject, tells the scheduler
when each invocation is done, and heartbeats its device state.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from collections.abc import Mapping
from typing import Any

import anyio
import msgspec
import torch
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind

from services.gpu_worker.device import memory_info, pick_device
from services.gpu_worker.models import HandlerCache, Loaded
from shared import jetstream, subjects, tracing
from shared.bus import connected, reply_error, send_reply, serve_status
from shared.config import Settings, effective_max_payload
from shared.dataplane.backend import prune_mappings, tensor_from_handle
from shared.dataplane.board import board_name
from shared.dataplane.client import NO_POOL, BrokerClient, open_tensor, write_into
from shared.errors import GfaasError
from shared.function import output_buffers
from shared.logs import get_logger
from shared.modelstore import ModelStore
from shared.modelswap import HostTier, tier_prefix
from shared.registry import Registry
from shared.results import UNREACHABLE, ResultStore
from shared.schema import (
    H_INGRESS,
    H_INVOCATION,
    CopyRequest,
    Done,
    ErrorCode,
    FunctionSpec,
    Handle,
    InvocationMeta,
    InvokeReply,
    InvokeRequest,
    OutputMode,
    Tensor,
    WorkerHeartbeat,
    decode,
    encode,
    now_millis,
)
from shared.tensors import as_torch, dtype_of, from_mapping, nbytes_of, shape_of, to_torch

log = get_logger("gpu_worker")

# On shutdown, how long the worker keeps taking direct sends after saying it stops.
REVOKE_WAIT_S = 0.2
# Grace period for in-flight invocations on shutdown.
DRAIN_GRACE_S = 20.0
# Tries at storing a claimed async result while the store is out of reach (about 30 s).
STORE_ATTEMPTS = 20
# Room for the reply's envelope and names when judging whether outputs fit by value.
BY_VALUE_MARGIN = 4096


def default_worker_id(device: str) -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:24]
    return f"{host}-{device.replace(':', '')}-{os.getpid()}"


def device_cache_bytes(settings: Settings, device: str) -> int:
    """The device tier's size: configured, or most of the device's memory."""
    if settings.device_cache_mb:
        return settings.device_cache_mb * 1024 * 1024
    return int(memory_info(device).total * (0.8 if device.startswith("cuda") else 0.25))


def _run_handler(
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


class HandlerExit(Exception):
    """A handler raised a BaseException that is not cancellation (SystemExit, ...)."""

    def __init__(self, raised: BaseException) -> None:
        super().__init__(raised)
        self.raised = raised


class Worker:
    def __init__(
        self,
        nc: NATS,
        registry: Registry[FunctionSpec],
        models: ModelStore,
        settings: Settings,
        device: str,
        worker_id: str,
        results: ResultStore | None = None,
    ) -> None:
        self.nc = nc
        self.results = results
        # Claimed async invocations whose results are not stored yet (heartbeats).
        self.claimed: set[str] = set()
        self.registry = registry
        self.settings = settings
        self.device = device
        self.worker_id = worker_id
        self.max_payload = effective_max_payload(settings, nc.max_payload)
        self.capacity = settings.capacity
        self.inflight = 0
        self.completed = 0
        self.failed = 0
        self.handlers = HandlerCache(
            device=device,
            threads=settings.threads,
            capacity_bytes=device_cache_bytes(settings, device),
            fetch_weights=lambda name: models.fetch(name, settings.state_dir / "models"),
            group_bytes=settings.swap_group_kb * 1024,
            host_tier=HostTier(tier_prefix(settings.shm_namespace)),
        )
        # Brokers of other nodes, for inputs that live there (read in chunks).
        self._remote: dict[str, BrokerClient] = {}
        self.remote_reads = 0
        # Where by-handle outputs are leased: this device's pool (host memory for CPU).
        self.pool_device = device if device.startswith("cuda") else "cpu"
        self.broker = BrokerClient(
            nc, settings.node, board=board_name(settings.shm_namespace, settings.node)
        )
        self.idle = anyio.Event()
        self.idle.set()

    async def on_run(self, msg: Msg, tg: TaskGroup) -> None:
        try:
            meta = InvocationMeta.from_headers(msg.headers)
            bad = meta.routing_problem()
        except ValueError as exc:
            meta, bad = InvocationMeta(invocation_id="", function=""), str(exc)
        if bad:
            iid = (msg.headers or {}).get(H_INVOCATION, "")
            await reply_error(self.nc, msg.reply, iid, ErrorCode.BAD_REQUEST, bad)
            return
        if self.inflight >= self.settings.capacity:
            await reply_error(
                self.nc,
                msg.reply,
                meta.invocation_id,
                ErrorCode.OVERLOADED,
                f"worker {self.worker_id} is at capacity",
            )
            await self._done(meta, msg, ok=False, exec_ms=0.0)
            return
        if self.inflight == 0:
            self.idle = anyio.Event()
        self.inflight += 1
        tg.start_soon(self._run_one, msg)

    async def _run_one(self, msg: Msg) -> None:
        meta = InvocationMeta(invocation_id="", function="")
        ok, done, exec_ms = False, False, 0.0
        try:
            meta = InvocationMeta.from_headers(msg.headers)
            with tracing.handling_span(
                "worker run",
                msg.headers,
                kind=SpanKind.CONSUMER,
                invocation_id=meta.invocation_id,
                attributes={"gfaas.function": meta.function, "gfaas.worker": self.worker_id},
            ) as span:
                claimed = 0
                try:
                    claimed = await self._claim(meta)
                    reply, exec_ms = await self._execute(meta, msg.data)
                except GfaasError as exc:
                    tracing.mark_error(span, exc.code, exc.reason)
                    reply = InvokeReply(
                        invocation_id=meta.invocation_id, error=exc.info(), worker=self.worker_id
                    )
                if claimed:
                    await self._store(meta, claimed, reply)
                ok = reply.error is None
                # Done first: whoever sent this then knows the slot is free before
                # the caller, answered, can send its next invocation.
                done = True
                await self._done(meta, msg, ok=ok, exec_ms=exec_ms)
                if msg.reply:
                    await send_reply(self.nc, msg.reply, reply, max_payload=self.max_payload)
        except Exception as exc:  # a bug must cost one request, not the worker
            log.exception("run.crashed", invocation_id=meta.invocation_id)
            await reply_error(self.nc, msg.reply, meta.invocation_id, ErrorCode.INTERNAL, repr(exc))
        finally:
            self.inflight -= 1
            if ok:
                self.completed += 1
            else:
                self.failed += 1
            if self.inflight == 0:
                self.idle.set()
            if not done:
                with anyio.CancelScope(shield=True):
                    await self._done(meta, msg, ok=ok, exec_ms=exec_ms)

    async def _claim(self, meta: InvocationMeta) -> int:
        """An async attempt is claimed in the results store before it runs (0: a sync
        invocation, nothing to claim): a superseded attempt is refused, never run."""
        if not meta.claim or self.results is None:
            return 0
        # Listed before the claim is made, so any heartbeat after it says so.
        self.claimed.add(meta.invocation_id)
        try:
            return await self.results.claim(meta.invocation_id, meta.claim, self.worker_id)
        except BaseException:
            self.claimed.discard(meta.invocation_id)
            raise

    async def _store(self, meta: InvocationMeta, claimed: int, reply: InvokeReply) -> None:
        """The result of a claimed attempt, stored before anyone is told: should the
        ingress that sent it die, a redelivery finds it instead of running it again."""
        assert self.results is not None
        try:
            # Through a short outage of the store: until it is stored, a redelivery
            # would run it again. Listed as claimed meanwhile, so it is waited for.
            for attempt in range(STORE_ATTEMPTS):
                try:
                    stored = await self.results.swap(
                        meta.invocation_id, self.results.done(reply), claimed
                    )
                except UNREACHABLE as exc:
                    log.warning(
                        "result.store_failed",
                        invocation_id=meta.invocation_id,
                        attempt=attempt + 1,
                        error=repr(exc),
                    )
                    await anyio.sleep(min(0.1 * 2**attempt, 2.0))
                    continue
                if stored is None:  # an ingress stored it from our reply first
                    log.info("result.stored_elsewhere", invocation_id=meta.invocation_id)
                return
        finally:
            self.claimed.discard(meta.invocation_id)

    async def _execute(self, meta: InvocationMeta, body: bytes) -> tuple[InvokeReply, float]:
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
        async with self.handlers.use(spec, wait_s=meta.remaining_s()) as entry:
            return await self._run(spec, meta, request, entry)

    async def _run(
        self, spec: FunctionSpec, meta: InvocationMeta, request: InvokeRequest, entry: Loaded
    ) -> tuple[InvokeReply, float]:
        request = await self._fetch_remote(meta, request)
        by_handle = self._input_handles(request)
        # From here this worker holds a reference on each input (dropped below).
        prepared = await self._prepare_outputs(meta, request, spec, by_handle)
        moved: list[Handle] = []
        try:
            request, moved = await self._to_this_device(meta, request, spec)
            inputs = {
                t.name: (open_tensor(t).to(self.device) if t.handle else to_torch(t, self.device))
                for t in request.inputs
            }
            return await self._call(spec, meta, request, entry, inputs, prepared)
        finally:
            if moved:
                await self.broker.release(moved, self.worker_id, meta.tenant, wait=False)
            # Whatever the handler did not use (or a failure left) goes back; then this
            # worker's references on its inputs, the handler being done reading. Two
            # requests: an input whose TTL ran out must not keep the buffers leased.
            with anyio.CancelScope(shield=True):
                if prepared:
                    await self.broker.release(
                        list(prepared.values()), self.worker_id, meta.tenant, wait=False
                    )
                if by_handle:
                    await self.broker.release(by_handle, self.worker_id, meta.tenant, wait=False)

    async def _call(
        self,
        spec: FunctionSpec,
        meta: InvocationMeta,
        request: InvokeRequest,
        entry: Loaded,
        inputs: dict[str, torch.Tensor],
        prepared: dict[str, Handle],
    ) -> tuple[InvokeReply, float]:
        dtypes = {t.name: t.dtype for t in spec.outputs}
        buffers = {
            name: tensor_from_handle(h, dtypes[name], shape_of(spec, name))
            for name, h in prepared.items()
        }
        try:
            if entry.runs_inline:
                raw, exec_ms = _run_handler(entry, inputs, buffers)
            else:
                with anyio.fail_after(max(meta.remaining_s(), 0.001)):
                    raw, exec_ms = await anyio.to_thread.run_sync(
                        _run_handler, entry, inputs, buffers, limiter=entry.limiter
                    )
        except TimeoutError:
            raise GfaasError(
                ErrorCode.DEADLINE_EXCEEDED, f"{spec.name} ran past its deadline"
            ) from None
        except GfaasError:
            raise
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
        outputs = await self._outputs(meta, request, raw, prepared)
        return (
            InvokeReply(
                invocation_id=meta.invocation_id,
                outputs=outputs,
                worker=self.worker_id,
                exec_ms=round(exec_ms, 3),
            ),
            exec_ms,
        )

    async def _to_this_device(
        self, meta: InvocationMeta, request: InvokeRequest, spec: FunctionSpec
    ) -> tuple[InvokeRequest, list[Handle]]:
        """On a GPU, inputs in another device's pool (host memory from a CPU stage,
        another GPU) are copied here by the broker: chunked on that link's fair
        scheduler, with the rest of the SLO as budget. Returns the copies to release."""
        if not self.pool_device.startswith("cuda"):
            return request, []
        elsewhere = [
            t
            for t in request.inputs
            if t.handle is not None and t.handle.device != self.pool_device
        ]
        if not elsewhere:
            return request, []
        budget_ms = max(min(meta.remaining_s(), spec.slo_ms / 1000.0), 0.0) * 1000.0
        moved: dict[str, Handle] = {}
        try:
            for t in elsewhere:
                assert t.handle is not None
                moved[t.name] = await self.broker.copy(
                    CopyRequest(
                        source=t.handle,
                        device=self.pool_device,
                        owner=self.worker_id,
                        budget_ms=budget_ms,
                        flow=spec.name,
                    ),
                    meta.tenant,
                )
        except BaseException:
            if moved:
                with anyio.CancelScope(shield=True):
                    await self.broker.release(list(moved.values()), self.worker_id, meta.tenant)
            raise
        inputs = [
            msgspec.structs.replace(t, handle=moved[t.name]) if t.name in moved else t
            for t in request.inputs
        ]
        return msgspec.structs.replace(request, inputs=inputs), list(moved.values())

    def _input_handles(self, request: InvokeRequest) -> list[Handle]:
        return [t.handle for t in request.inputs if t.handle is not None]

    async def _fetch_remote(self, meta: InvocationMeta, request: InvokeRequest) -> InvokeRequest:
        """Inputs whose handles live on another node come by value, in chunks from that
        node's broker (it cannot be mapped from here): same API, slower path."""
        if all(t.handle is None or t.handle.pool == self.settings.node for t in request.inputs):
            return request
        inputs: list[Tensor] = []
        for t in request.inputs:
            h = t.handle
            if h is None or h.pool == self.settings.node:
                inputs.append(t)
                continue
            remote = self._remote.get(h.pool)
            if remote is None:
                remote = self._remote[h.pool] = BrokerClient(self.nc, h.pool)
            try:
                data = await remote.read(h, meta.tenant, chunk=self.max_payload)
            except GfaasError as exc:
                if exc.code is not ErrorCode.INTERNAL:
                    raise
                raise GfaasError(
                    ErrorCode.INVALID_INPUT,
                    f"input {t.name!r} lives on node {h.pool!r}: {exc.reason}",
                ) from None
            self.remote_reads += 1
            inputs.append(msgspec.structs.replace(t, handle=None, data=data))
        return msgspec.structs.replace(request, inputs=inputs)

    async def _lease(
        self, sizes: list[int], tenant: str, check: list[Handle], *, retain: str = ""
    ) -> list[Handle]:
        """Output buffers in the pool of this worker's device; in host memory when the
        node's broker pools no GPU memory (it runs without cupy, say)."""
        try:
            return await self.broker.lease(
                sizes,
                owner=self.worker_id,
                device=self.pool_device,
                tenant=tenant,
                check=check,
                retain=retain,
            )
        except GfaasError as exc:
            if self.pool_device == "cpu" or NO_POOL not in exc.reason:
                raise
            log.warning("pool.host_fallback", device=self.pool_device, reason=exc.reason)
            self.pool_device = "cpu"
            return await self._lease(sizes, tenant, check, retain=retain)

    async def _prepare_outputs(
        self,
        meta: InvocationMeta,
        request: InvokeRequest,
        spec: FunctionSpec,
        inputs: list[Handle],
    ) -> dict[str, Handle]:
        """Check the input handles, take this worker's reference on each, and lease
        the output buffers, in one broker trip.

        The broker is the authority: stale, forged or foreign input handles stop here.
        The references keep the inputs' bytes in place while the handler reads them,
        whoever else releases them meanwhile (a workflow run whose other stage failed,
        a caller that gave up); held under this worker's name, so the broker drops
        them should its heartbeats stop. Outputs are prepared (so the handler can write
        straight into them) only when they go by handle and the spec fixes every
        dimension."""
        fixed = bool(spec.outputs) and all(d >= 0 for t in spec.outputs for d in t.shape)
        if request.outputs_by is not OutputMode.HANDLE or not fixed:
            if inputs:
                await self.broker.check(inputs, meta.tenant, retain=self.worker_id)
            return {}
        sizes = [nbytes_of(t.dtype, t.shape) for t in spec.outputs]
        handles = await self._lease(sizes, meta.tenant, inputs, retain=self.worker_id)
        return {t.name: h for t, h in zip(spec.outputs, handles, strict=True)}

    async def _outputs(
        self,
        meta: InvocationMeta,
        request: InvokeRequest,
        raw: Mapping[str, Any],
        prepared: dict[str, Handle],
    ) -> list[Tensor]:
        mode = request.outputs_by
        if mode is OutputMode.VALUE:
            return from_mapping(raw)
        values = {name: as_torch(name, value) for name, value in raw.items()}
        if mode is OutputMode.AUTO:
            size = sum(v.numel() * v.element_size() for v in values.values())
            if size + BY_VALUE_MARGIN <= self.max_payload:
                return from_mapping(values)
        return await self._by_handle(meta, request, values, prepared)

    async def _by_handle(
        self,
        meta: InvocationMeta,
        request: InvokeRequest,
        values: Mapping[str, torch.Tensor],
        prepared: dict[str, Handle],
    ) -> list[Tensor]:
        """Outputs in pooled buffers; the caller gets the references, not the bytes.

        A prepared buffer of the right size is used (and not copied into again when
        the handler wrote there); the rest are leased now. Used buffers leave
        `prepared`, so the caller releases only what was not used."""
        chosen: dict[str, Handle] = {}
        for name, v in values.items():
            h = prepared.get(name)
            if h is not None and h.nbytes == v.numel() * v.element_size():
                chosen[name] = prepared.pop(name)
        missing = [name for name in values if name not in chosen]
        if missing:
            sizes = [values[n].numel() * values[n].element_size() for n in missing]
            fresh = await self._lease(sizes, meta.tenant, [])
            chosen.update(zip(missing, fresh, strict=True))
        handles = [chosen[name] for name in values]
        try:
            outputs = [
                write_into(chosen[name], name, v, dtype_of(name, v)) for name, v in values.items()
            ]
            holder = request.holder or f"inv-{meta.invocation_id}"
            # Not awaited: the broker applies it before anything the caller sends
            # after reading this reply (one ordered stream of broker requests).
            await self.broker.transfer(handles, self.worker_id, holder, meta.tenant, wait=False)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.broker.release(handles, self.worker_id, meta.tenant)
            raise
        return outputs

    async def _done(self, meta: InvocationMeta, msg: Msg, *, ok: bool, exec_ms: float) -> None:
        """Tell whoever sent the invocation (the scheduler, or an ingress under a
        grant) that its slot is free; the scheduler hears both."""
        if not meta.invocation_id:
            return
        via = (msg.headers or {}).get(H_INGRESS, "")
        try:
            subject = subjects.done(via) if via else subjects.done_scheduled(meta.origin)
        except ValueError:  # not a token: the scheduler alone hears of it
            subject = subjects.done_scheduled("")
        done = Done(
            worker_id=self.worker_id,
            invocation_id=meta.invocation_id,
            function=meta.function,
            ok=ok,
            exec_ms=round(exec_ms, 3),
        )
        await self.nc.publish(subject, encode(done))

    def heartbeat(self) -> WorkerHeartbeat:
        mem = memory_info(self.device)
        tier = self.handlers.report()
        return WorkerHeartbeat(
            worker_id=self.worker_id,
            device=self.device,
            pid=os.getpid(),
            memory_total=mem.total,
            memory_used=mem.used,
            memory_free=mem.free,
            models=self.handlers.resident(),
            inflight=self.inflight,
            capacity=self.capacity,
            sent_at=now_millis() / 1000.0,
            cache_capacity=tier.capacity,
            model_bytes=tier.sizes,
            model_load_s={k: round(v, 6) for k, v in tier.load_s.items()},
            model_score={k: round(v, 4) for k, v in tier.scores.items()},
            loading=tier.loading,
            claimed=sorted(self.claimed),
            node=self.settings.node,
        )

    async def send_heartbeat(self) -> None:
        await self.nc.publish(subjects.heartbeat(self.worker_id), encode(self.heartbeat()))

    def details(self) -> dict[str, object]:
        hb = self.heartbeat()
        return {
            "worker_id": self.worker_id,
            "device": self.device,
            "inflight": self.inflight,
            "completed": self.completed,
            "failed": self.failed,
            "models": hb.models,
            "model_loads": self.handlers.loads,
            "model_hits": self.handlers.hits,
            # Input handles verified on the lease board vs by asking the broker.
            "handle_checks": {
                "local": self.broker.local_checks,
                "remote": self.broker.remote_checks,
            },
            "remote_reads": self.remote_reads,
            "evictions": self.handlers.evictions,
            "room_waits": self.handlers.room_waits,
            "host_tier_loads": self.handlers.host_tier.loads,
            "device_cache": {
                "capacity": self.handlers.cache.capacity,
                "used": self.handlers.cache.used,
                "models": self.handlers.sizes(),
            },
            "memory_free": hb.memory_free,
        }


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
        registry = await Registry.open(js, replicas=settings.js_replicas)
        models = await ModelStore.open(js, replicas=settings.js_replicas)
        results = ResultStore(
            await jetstream.results_kv(js, replicas=settings.js_replicas),
            max_payload=effective_max_payload(settings, nc.max_payload),
        )
        worker = Worker(nc, registry, models, settings, device, worker_id, results)
        async with anyio.create_task_group() as service_tg:
            await service_tg.start(registry.watch)
            async with anyio.create_task_group() as runs:

                async def on_run(msg: Msg) -> None:
                    await worker.on_run(msg, runs)

                run_sub = await nc.subscribe(subjects.worker_run(worker_id), cb=on_run)
                await serve_status(nc, "gpu-worker", worker_id, worker.details)
                await worker.send_heartbeat()

                async def beat() -> None:
                    while True:
                        await anyio.sleep(settings.heartbeat_s)
                        await worker.send_heartbeat()
                        prune_mappings()

                service_tg.start_soon(beat)
                log.info("worker.started", worker=worker_id, device=device)
                task_status.started()
                await stop.wait()
                # Stop intake: capacity 0 tells the scheduler to send nothing more.
                worker.capacity = 0
                await worker.send_heartbeat()
                # Ingress instances that hold grants here hear of the revocation
                # before the subscription goes: what they sent meanwhile still runs.
                await anyio.sleep(REVOKE_WAIT_S)
                await run_sub.drain()
                with anyio.move_on_after(DRAIN_GRACE_S):
                    await worker.idle.wait()
                runs.cancel_scope.cancel()
            service_tg.cancel_scope.cancel()

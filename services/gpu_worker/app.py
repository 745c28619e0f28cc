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
from collections.abc import Awaitable, Callable
from typing import cast

import anyio
import torch
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from services.gpu_worker import device_weights, privileges, profiler, state
from services.gpu_worker.agent import Agent, AgentService, spatial_for
from services.gpu_worker.bundles import Bundles, Mounted
from services.gpu_worker.claims import Claims
from services.gpu_worker.device import device_cache_bytes, memory_info, pick_device
from services.gpu_worker.execute import Executor
from services.gpu_worker.handlers import Job, Runs
from services.gpu_worker.instance_start import InstanceStart
from services.gpu_worker.models import DeviceWeightsSource, HandlerCache
from services.gpu_worker.prefetch import Prefetcher, budget_bytes
from services.gpu_worker.sandbox import HandlerChecks
from services.gpu_worker.staging import Staging
from services.gpu_worker.tokens import TokenGate
from shared import jetstream, subjects
from shared.bus import NatsBus, connected, decode_event, reply_of, routed, send_reply, serve_status
from shared.config import Settings, effective_max_payload
from shared.dataplane.backend import prune_mappings
from shared.dataplane.board import board_name
from shared.dataplane.client import BrokerClient
from shared.errors import GfaasError, described
from shared.logs import get_logger
from shared.modelstore import ModelStore
from shared.modelswap import HostModel, HostTier, tier_prefix
from shared.registry import Registry
from shared.results import ResultStore
from shared.schema import (
    ErrorCode,
    ErrorInfo,
    FunctionSpec,
    HandlerCheck,
    HandlerCheckReply,
    InvokeReply,
    ProfileReply,
    ProfileRequest,
    decode,
    encode,
)
from shared.service import ServiceStartFailed, every, settle_heap
from shared.sharing.cpu import pin
from shared.spec import wants_instances

log = get_logger("gpu_worker")

# On shutdown, how long the worker keeps taking direct sends after saying it stops.
REVOKE_WAIT_S = 0.2
# Grace period for in-flight invocations on shutdown.
DRAIN_GRACE_S = 20.0
# How long a profile measured in an instance process may take, its load included.
PROFILE_TIMEOUT_S = 120.0


def agent_memory(settings: Settings, device: str) -> int:
    """What the instances on this device may hold in all: configured, or on a CPU the
    device tier's default size, on a GPU what the worker's own tier leaves of 90%."""
    if settings.agent_memory_mb:
        return settings.agent_memory_mb * 1024 * 1024
    if not device.startswith("cuda"):
        return device_cache_bytes(0, device)
    total = int(memory_info(device).total * 0.9)
    return max(total - device_cache_bytes(settings.device_cache_mb, device), 0)


async def profile_function(
    request: ProfileRequest,
    registry: Registry[FunctionSpec],
    measure: Callable[[FunctionSpec], Awaitable[ProfileReply]],
) -> ProfileReply:
    """The profile of a deployed function, as `measure` takes it (here, or in an
    instance process: profile_instance.py)."""
    spec = await registry.lookup(request.function)
    if spec is None:
        reason = f"function {request.function!r} is not deployed"
        return ProfileReply(error=ErrorInfo(code=ErrorCode.UNKNOWN_FUNCTION, reason=reason))
    try:
        reply = await measure(spec)
    except GfaasError as exc:
        return ProfileReply(error=exc.info())
    if reply.profile is not None:
        log.info("profile.measured", function=spec.name, rows=len(reply.profile.rows))
    return reply


def measured_here(
    handlers: HandlerCache, settings: Settings, *, device: str, agent_id: str, spatial: str
) -> Callable[[FunctionSpec], Awaitable[ProfileReply]]:
    """A profile measured in this process, on the handler its cache loads (one share
    only in a profile process given one: `instance_profile_share`)."""

    async def measure(spec: FunctionSpec) -> ProfileReply:
        profile = await profiler.profile(
            spec,
            handlers,
            device=device,
            agent=agent_id,
            spatial=spatial,
            window_s=settings.token_window_s,
            share=settings.instance_profile_share,
        )
        return ProfileReply(profile=profile)

    return measure


def handler_cache(
    settings: Settings,
    device: str,
    models: ModelStore,
    device_weights: DeviceWeightsSource | None = None,
) -> HandlerCache:
    """The handlers (and models) a worker or an instance keeps loaded on `device`
    (`device_weights`: where a CUDA instance gets its device's shared copy)."""
    return HandlerCache(
        device=device,
        threads=settings.threads,
        capacity_bytes=device_cache_bytes(settings.device_cache_mb, device),
        fetch_weights=privileges.weights_fetcher(models, settings),
        fill_host_tier=models.fill_host_tier,
        group_bytes=settings.swap_group_kb * 1024,
        # An instance running as the handler user may only read root's segments.
        host_tier=HostTier(
            tier_prefix(settings.shm_namespace), readonly=bool(settings.instance_dir)
        ),
        handler_packages=settings.handler_packages,
        # An instance serves one function in a process of its own: a handler that
        # writes into shared weights faults there and nowhere else.
        share_weights=settings.shared_weights and bool(settings.instance_function),
        # An instance of a function with a code bundle: the bundle the agent extracted
        # for it, first on this process's import path from here on.
        bundle=Mounted.of(settings),
        device_weights=device_weights,
    )


def cap_device_memory(device: str, budget: int) -> None:
    """The caching allocator may hold at most `budget` bytes of the device."""
    index = torch.device(device).index or 0
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(budget / total, 1.0), index)


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
    """The gpu-worker service (or one function's instance) until `stop`. An instance
    whose start failed raises ServiceStartFailed once it has answered the calls that
    waited for it and told its agent why, its connection closed and nothing of it
    running: its process exits with that reason logged (run_service), no traceback."""
    failed = await _serve(settings, stop, task_status=task_status)
    if failed is not None:
        raise ServiceStartFailed(f"{failed.code}: {failed.reason}")


async def _serve(
    settings: Settings,
    stop: anyio.Event,
    *,
    task_status: TaskStatus[None],
) -> ErrorInfo | None:
    """`serve`; an instance's start error when it could not start (task_status not
    reported)."""
    device = pick_device(settings.device)
    function = settings.instance_function  # an instance serves this one alone
    if settings.instance_cores:
        # Before the first torch operation: its thread pool keeps the affinity it
        # starts with.
        pin(frozenset(int(c) for c in settings.instance_cores.split(",")))
    else:
        torch.set_num_threads(max(1, settings.threads))
    worker_id = settings.worker_id or default_worker_id(device)
    # Before connecting: a handler user that cannot be used stops the worker at once
    # with the reason, rather than every instance failing after it (an instance has
    # switched to it already, privileges.become).
    handler_user = None if function else privileges.prepare(settings)
    setup = state.SetupClock()
    async with connected(settings.nats_url, f"gfaas-worker-{worker_id}", settings=settings) as nc:
        setup.mark("connect")
        js = nc.jetstream()
        max_payload = effective_max_payload(settings, nc.max_payload)
        # The three stores at once: each is a round trip or two to JetStream.
        opened: dict[str, object] = {}
        async with anyio.create_task_group() as tg:

            async def open_into(key: str, opener: Callable[[], Awaitable[object]]) -> None:
                opened[key] = await opener()

            r = settings.js_replicas
            tg.start_soon(open_into, "registry", lambda: Registry.open(js, replicas=r))
            tg.start_soon(open_into, "models", lambda: ModelStore.open(js, replicas=r))
            tg.start_soon(open_into, "results", lambda: jetstream.results_kv(js, replicas=r))
        registry = cast(Registry[FunctionSpec], opened["registry"])
        models = cast(ModelStore, opened["models"])
        results = ResultStore(cast(KeyValue, opened["results"]), max_payload=max_payload)
        setup.mark("stores")
        books = state.Books(
            worker_id=worker_id,
            device=device,
            node=settings.node,
            limit=settings.capacity,
            capacity=settings.capacity,
            function=function,
            agent=settings.instance_agent,
            setup_ms=setup.steps,
            setup_at=setup.at,
        )
        # A CUDA instance builds its model on the device's one copy of the weights,
        # which its agent holds and exports (services/gpu_worker/device_weights.py).
        shared_copy = None
        agent_id = settings.instance_agent
        if function and agent_id and settings.shared_weights and device.startswith("cuda"):
            shared_copy = device_weights.asker(nc, agent_id, worker_id)
        handlers = handler_cache(settings, device, models, shared_copy)
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
        # An instance's start: its spec, then its handler and model, loaded while it
        # already takes the invocations waiting for it (services/gpu_worker/instance_start.py).
        start = None
        if function:
            context = None
            if device.startswith("cuda"):
                budget = handlers.cache.capacity
                context = lambda: cap_device_memory(device, budget)  # noqa: E731
            start = InstanceStart(settings, registry, handlers, books, device_context=context)
        runs = Runs(
            WorkerBus(nc, max_payload),
            books,
            Claims(results, worker_id, books.claimed),
            Executor(
                registry,
                handlers,
                staging,
                worker_id=worker_id,
                function=function,
                gate=TokenGate(nc, settings.instance_agent, worker_id)
                if settings.instance_agent and settings.instance_gated
                else None,
                ready=start.ready if start is not None else None,
                mark=books.first,
            ),
            worker_id,
        )
        # Code bundles, fetched and extracted here for instances and deploy checks
        # (an instance reads the one the agent extracted for it).
        bundles = None if function else Bundles(js, settings)
        agent = None
        if settings.agent_enabled and not function:
            agent = Agent(
                nc,
                settings,
                agent_id=worker_id,
                device=device,
                memory_total=agent_memory(settings, device),
                spatial=await anyio.to_thread.run_sync(spatial_for, device, settings.state_dir),
                handler_user=handler_user,
                bundles=bundles,
            )

        # An isolated node (instances as the handler user) runs handler code only in
        # instances: this process, root, takes no runs (capacity 0 in its beats, and
        # no subscription), and every function runs as instances (AgentBeat.isolated).
        isolated = agent is not None and agent.isolated
        if isolated:
            books.limit = books.capacity = 0
        elif handler_user is not None:
            log.warning(
                "worker.handlers_as_root",
                reason="the agent is off (GFAAS_AGENT_ENABLED): functions run in this "
                "worker, as its user, not as the handler user",
            )
        # Deploy-time dry runs import handler code too: as the handler user, if any.
        checks = HandlerChecks(
            packages=settings.handler_packages, bundles=bundles, user=handler_user
        )

        async def send_heartbeat() -> None:
            beat = state.heartbeat(books, handlers)
            await nc.publish(subjects.heartbeat(worker_id), encode(beat))

        async with anyio.create_task_group() as service_tg:
            # An instance loads its handler and model (mostly in threads) while the
            # registry's watch and the metrics endpoint start, and while it takes
            # its first invocations: none of them waits for it.
            async def load() -> None:
                assert start is not None
                await start.load()
                setup.mark("handler")

            async def prepare() -> None:
                assert start is not None
                if await start.prepare():
                    service_tg.start_soon(load)

            # Metrics (shared.metrics): this worker's Prometheus endpoint, closed with
            # service_tg, and the instruments the run hooks record to.
            from shared import metrics

            async with anyio.create_task_group() as starting:
                if start is not None:
                    starting.start_soon(prepare)
                await service_tg.start(registry.watch)
                telemetry = await service_tg.start(
                    metrics.serve, settings, "gpu-worker", worker_id, lambda: nc.is_connected
                )
            if start is not None and start.spec is None:  # nothing to serve
                await start.report_failure(nc)
                service_tg.cancel_scope.cancel()
                return start.error
            runs.use_metrics(
                metrics.WorkerMetrics(
                    telemetry.meter,
                    loads=lambda: {"device": handlers.loads, "host": handlers.host_tier.loads},
                    # Device memory, utilisation and the device tier's bytes (state.py).
                    device_bytes=lambda: sum(handlers.sizes().values()),
                    device=device,
                    device_memory=lambda: state.memory_by_kind(device),
                    utilization=lambda: state.utilization(device),
                )
            )
            # Deployed models into the host tier ahead of their requests: the node's
            # worker does it, not its instances (each function's own).
            prefetcher = None
            if not function:
                prefetcher = Prefetcher(
                    registry, models, handlers, budget_bytes(settings.host_prefetch_mb)
                )
                service_tg.start_soon(prefetcher.run)
                if agent is not None:
                    pf = prefetcher
                    agent.host_models = lambda: pf.resident
            if agent is not None:

                async def host_copy(model: str) -> HostModel:
                    return (await handlers.host_model(model))[0]

                service = AgentService(
                    nc,
                    agent,
                    settings.heartbeat_s,
                    wanted=lambda: any(isolated or wants_instances(s) for s in registry.all()),
                    fill=handlers.host_model,
                    host=host_copy,
                )
                await service_tg.start(service.run)
            async with anyio.create_task_group() as running:

                async def on_run(msg: Msg) -> None:
                    meta = await routed(nc, msg)
                    if meta is None:
                        return
                    books.first("run_received")
                    job = Job(meta, msg.data, reply_of(msg), msg.headers or {})
                    if await runs.admit(job):
                        running.start_soon(runs.run, job)

                run_sub = (
                    None
                    if isolated
                    else await nc.subscribe(subjects.worker_run(worker_id), cb=on_run)
                )

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

                # Instances run their function, not other deploys' checks.
                check_sub = (
                    None
                    if function
                    else await nc.subscribe(
                        subjects.HANDLER_CHECK, queue=subjects.Q_WORKERS, cb=on_check
                    )
                )

                # One profile at a time: two measured together would share the cores.
                profiling = anyio.Lock()

                async def answer_profile(msg: Msg) -> None:
                    assert agent is not None
                    assert profiles is not None
                    here = measured_here(
                        handlers,
                        settings,
                        device=agent.device,
                        agent_id=agent.agent_id,
                        spatial=agent.spatial.mode,
                    )

                    async def measure(spec: FunctionSpec) -> ProfileReply:
                        # An isolated node runs no handler code as root, and a code
                        # bundle's modules live in processes of their own: those
                        # profiles are measured in an instance process.
                        if agent.profiles_per_share:
                            return await agent.profile_per_share(spec, PROFILE_TIMEOUT_S)
                        if agent.isolated or spec.code:
                            return await agent.profile_in_instance(spec, PROFILE_TIMEOUT_S)
                        return await here(spec)

                    try:
                        async with profiling:
                            reply = await profile_function(
                                decode(msg.data, ProfileRequest), registry, measure
                            )
                        if reply.profile is not None:
                            p = reply.profile
                            await profiles.put(p.function, encode(p))
                            await nc.publish(subjects.profiled(p.function), encode(p))
                        await msg.respond(encode(reply))
                    except Exception as exc:  # a profile must cost its request, not the agent
                        log.exception("profile.crashed")
                        error = ErrorInfo(code=ErrorCode.INTERNAL, reason=described(exc))
                        await msg.respond(encode(ProfileReply(error=error)))

                async def on_profile(msg: Msg) -> None:
                    service_tg.start_soon(answer_profile, msg)  # it takes seconds

                # Profiles are the agent's to measure (an instance has no store of them).
                profiles = None
                if agent is not None:
                    profiles = await jetstream.profiles_kv(js, replicas=settings.js_replicas)
                    await nc.subscribe(subjects.PROFILE, queue=subjects.Q_AGENTS, cb=on_profile)

                def details() -> dict[str, object]:
                    out = state.details(books, handlers, staging)
                    if prefetcher is not None:
                        out["prefetch"] = prefetcher.details()
                    if agent is not None:
                        out["agent"] = agent.details()
                    return out

                async def beat() -> None:
                    await send_heartbeat()
                    prune_mappings()

                beating = False
                if start is not None:
                    # Its beats say "starting" until it has loaded (a failed start
                    # never says otherwise: its agent would take it as ready).
                    books.starting = True
                    if not start.loaded.is_set():
                        # Subscribed while it loads: a starting beat brings the
                        # invocations that wait for this function, whose inputs are
                        # staged meanwhile.
                        await send_heartbeat()
                        setup.mark("subscribed")
                        service_tg.start_soon(every, settings.heartbeat_s, beat)
                        beating = True
                        await start.loaded.wait()
                    if start.failed:
                        # Take nothing more; the runs that waited for this start, and
                        # any sent before the scheduler heard, are answered with why;
                        # then the agent hears of it, and the instance exits.
                        books.capacity = 0
                        await send_heartbeat()
                        await anyio.sleep(REVOKE_WAIT_S)
                        with anyio.move_on_after(DRAIN_GRACE_S):
                            await books.idle.wait()
                        await start.report_failure(nc)
                        service_tg.cancel_scope.cancel()
                        return start.error
                    books.starting = False
                # The collection run_service does once started, done before the first
                # heartbeat: after it, it was a 100-150 ms stall of the first requests
                # (a spare froze most of the heap before its assignment: it is short).
                settle_heap()
                await serve_status(nc, "gpu-worker", worker_id, details)
                setup.mark("ready")  # loaded: its first beat that says so goes now
                await send_heartbeat()
                if start is not None:
                    # Flushed before a run it took while starting executes (see
                    # InstanceStart.serving).
                    await nc.flush()
                    start.serving.set()
                if not beating:
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
                if check_sub is not None:
                    await check_sub.unsubscribe()
                if run_sub is not None:
                    await run_sub.drain()
                with anyio.move_on_after(DRAIN_GRACE_S):
                    await books.idle.wait()
                running.cancel_scope.cancel()
            service_tg.cancel_scope.cancel()
    return None

"""Ingress: the front door. Wiring only: the connection, the subscriptions, the HTTP
server and the lifetimes; what each subject does lives beside it.

- `gfaas.v1.invoke.<fn>`: handlers.py admits it (validated, stamped with id, tenant
  and deadline) and dispatch.py forwards it, straight to a worker under a grant or
  to the scheduler while one is heard (else `unavailable` at once); the worker
  answers the caller directly.
- `gfaas.v1.invoke_async.<fn>`: a JetStream work queue consumed by async_path.py,
  which runs each invocation through the same path and keeps one result per id.
- `gfaas.v1.result.<id>`: async_path.py, from the results KV.
- `gfaas.v1.t.<tenant>.{invoke,invoke_async,result}.<x>`: the same for a tenant (its
  account's imports, shared/auth.py), the tenant taken from the subject; a tenant's
  async submit is checked and queued by tenant_async.py.
- grants, done notes, lost workers, scheduler beats: dispatch.py's books.
- HTTP (KServe v2 / Triton): http.py, with shared-memory regions staged by staging.py.
- gRPC (the same protocol, `inference.GRPCInferenceService`): grpc_front.py, over the
  same Ingress; both fronts keep one set of inference statistics.
- TLS for both fronts with a certificate (GFAAS_HTTP_TLS_CERT and _KEY): tls.py.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import time
from collections.abc import Awaitable, Callable, Iterator

import anyio
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.ingress import tenant_async
from services.ingress.async_path import AsyncInvocations
from services.ingress.dispatch import Dispatcher
from services.ingress.handlers import Ingress
from services.ingress.shm_regions import ShmRegions
from services.ingress.stats import InferenceStats
from services.ingress.tls import FrontTLS, front_tls
from shared import auth, jetstream, metrics, subjects
from shared.bus import (
    NatsBus,
    connected,
    decode_event,
    on_event,
    send_reply,
    serve_status,
    watch_bus,
)
from shared.config import Settings, effective_max_payload
from shared.dataplane.backend import prune_mappings
from shared.dataplane.client import BrokerClient
from shared.ids import Holder
from shared.registry import Registry
from shared.results import ResultStore
from shared.schema import (
    H_OUTCOME,
    H_TENANT,
    Done,
    Grant,
    InvokeReply,
    SchedulerBeat,
    WorkerLost,
    encode,
)
from shared.service import every, instance_name

# How often ingress drops its mappings of slabs the broker gave back.
PRUNE_S = 1.0
# How often lapsed grants and silent schedulers are looked for.
DIRECT_TICK_S = 0.1
# How long in-flight HTTP requests may run on once ingress is told to stop (as the
# gRPC front's GRACE_S). Without a bound, uvicorn waits for every open request, and a
# client that stalls midway through its body holds ingress's stop for good.
HTTP_GRACE_S = 10


async def _serve_http(
    ingress: Ingress,
    settings: Settings,
    stop: anyio.Event,
    stats: InferenceStats,
    tls: FrontTLS | None = None,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP until `stop` is set; reports the port bound (GFAAS_HTTP_PORT, or the
    one the kernel picked for 0) once the socket listens."""
    import uvicorn

    from services.ingress.http import create_app

    config = uvicorn.Config(
        create_app(
            ingress,
            max_payload=ingress.max_payload,
            stats=stats,
            tokens=api_keys(settings),
            body_idle_s=settings.http_body_idle_s,
        ),
        host=settings.http_host,
        port=settings.http_port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=HTTP_GRACE_S,
        # With a certificate: https only (a plain request fails its handshake).
        ssl_certfile=str(tls.cert_file) if tls is not None else None,
        ssl_keyfile=str(tls.key_file) if tls is not None else None,
    )

    class Server(uvicorn.Server):
        # The service owns SIGINT/SIGTERM (shared.service); uvicorn would otherwise
        # capture them and re-raise them after exit, which reads as a second signal.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    server = Server(config)
    # Replicas of ingress on one host share the port: the kernel spreads connections.
    sock = socket.socket(
        socket.AF_INET6 if ":" in settings.http_host else socket.AF_INET, socket.SOCK_STREAM
    )
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    with sock:
        sock.bind((settings.http_host, settings.http_port))
        sock.listen(config.backlog)  # connections wait for uvicorn, not refused
        task_status.started(int(sock.getsockname()[1]))
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(server.serve, sockets=[sock]))
            await stop.wait()
            server.should_exit = True


async def serve(
    settings: Settings,
    stop: anyio.Event,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    instance = instance_name()
    # A certificate or key that cannot be used stops ingress here, before it connects.
    tls = front_tls(settings)
    async with connected(settings.nats_url, "gfaas-ingress", settings=settings) as nc:
        js = nc.jetstream()
        replicas = settings.js_replicas
        await jetstream.ensure_invocations_stream(js, replicas=replicas)
        await jetstream.ensure_dead_letter_stream(js, replicas=replicas)
        await jetstream.ensure_logs_stream(js, replicas=replicas)
        registry = await Registry.open(js, replicas=replicas)
        workflows = await Registry.open_workflows(js, replicas=replicas)
        max_payload = effective_max_payload(settings, nc.max_payload)
        results = ResultStore(
            await jetstream.results_kv(js, replicas=replicas), max_payload=max_payload
        )
        # Our name as a lease holder, grant holder and live instance.
        holder = str(Holder.new_ingress())
        dispatcher = Dispatcher(NatsBus(nc), holder, settings)

        async def reply_to(subject: str, reply: InvokeReply) -> None:
            await send_reply(nc, subject, reply, max_payload=max_payload)

        ingress = Ingress(
            dispatcher,
            registry,
            workflows,
            BrokerClient(nc, settings.node),
            ShmRegions(
                namespace=settings.shm_namespace, tenant_max=settings.tenant_max_shm_regions
            ),
            holder=holder,
            max_payload=max_payload,
            max_timeout_ms=settings.max_deadline_s * 1000,
            workflow_concurrency=settings.async_concurrency,
            send_reply=reply_to,
            connected=lambda: nc.is_connected,
        )
        asyncs = AsyncInvocations(
            nc,
            results,
            ingress.call,
            settings,
            max_payload=max_payload,
            health=dispatcher.health,
            settled=ingress.settled,
        )

        async def on_invoke(msg: Msg) -> None:
            function = subjects.last_token(msg.subject)
            await ingress.invoke(function, msg.data, msg.headers, msg.reply)

        async def on_tenant_invoke(msg: Msg) -> None:
            # From a tenant's account: the server wrote the tenant into the subject
            # (shared.auth); whatever header the caller wrote is replaced. Its reply
            # subject is the import's (`_R_.`): forwarded in a header (shared.bus
            # NatsBus.publish), so the worker answers the tenant directly.
            tenant = auth.tenant_of_subject(msg.subject)
            if tenant is None:
                return
            headers = {**(msg.headers or {}), H_TENANT: tenant}
            # An id it gave goes under its tag, as its async ones do: the server does
            # not check the reply subject a tenant names, so it may have its reply sent
            # to another tenant's callbacks; under its own tag, that reply can never
            # pass for one of the other's invocations.
            await ingress.invoke(
                subjects.last_token(msg.subject),
                msg.data,
                headers,
                msg.reply,
                id_tag=auth.tenant_tag(tenant),
            )

        async def on_result(msg: Msg) -> None:
            reply = await asyncs.result(subjects.last_token(msg.subject))
            await msg.respond(encode(reply))

        # A tenant's async invocations and result lookups (tenant_async.py): the
        # tenant is the subject's, as for its invocations.
        async def on_tenant_invoke_async(msg: Msg) -> None:
            tenant = auth.tenant_of_subject(msg.subject, "invoke_async")
            if tenant is None:
                return
            function = subjects.last_token(msg.subject)
            reply = await tenant_async.submit(
                js, tenant, function, msg.data, msg.headers, max_payload=max_payload
            )
            await msg.respond(encode(reply))

        async def on_tenant_result(msg: Msg) -> None:
            tenant = auth.tenant_of_subject(msg.subject, "result")
            if tenant is None:
                return
            reply = await asyncs.result(subjects.last_token(msg.subject), tenant=tenant)
            await msg.respond(encode(reply))

        # The ports HTTP and gRPC are bound to (what `gfaas up` announces: the
        # kernel's choice for a port of 0), once they are.
        fronts: dict[str, int] = {}

        def details() -> dict[str, object]:
            return {**ingress.details(), "async": asyncs.details(), **fronts}

        async def tick() -> None:
            await dispatcher.tick()
            ingress.expire_open(time.monotonic())

        async with anyio.create_task_group() as service_tg:
            # Metrics: the Prometheus endpoint (its port in our status), closed with
            # service_tg; the end-to-end instruments the handlers record to.
            telemetry = await service_tg.start(
                metrics.serve, settings, "ingress", instance, lambda: nc.is_connected
            )
            ingress.metrics = metrics.IngressMetrics(telemetry.meter)
            await service_tg.start(registry.watch)
            await service_tg.start(workflows.watch)
            async with anyio.create_task_group() as intake:
                ingress.tasks = intake
                invoke_sub = await nc.subscribe(
                    subjects.INVOKE_ALL, queue=subjects.Q_INGRESS, cb=on_invoke
                )
                result_sub = await nc.subscribe(
                    subjects.RESULT_ALL, queue=subjects.Q_INGRESS, cb=on_result
                )
                tenant_subs = [
                    await nc.subscribe(subject, queue=subjects.Q_INGRESS, cb=cb)
                    for subject, cb in (
                        (auth.TENANT_INVOKE_ALL, on_tenant_invoke),
                        (auth.TENANT_INVOKE_ASYNC_ALL, on_tenant_invoke_async),
                        (auth.TENANT_RESULT_ALL, on_tenant_result),
                    )
                ]
                await subscribe_books(nc, dispatcher, holder, ingress.heard_done)
                service_tg.start_soon(every, DIRECT_TICK_S, tick)
                # Say we are alive: the broker and the scheduler free what we hold
                # once we stop.
                service_tg.start_soon(
                    every,
                    settings.heartbeat_s,
                    functools.partial(nc.publish, subjects.alive(holder), b""),
                )
                service_tg.start_soon(watch_bus, nc, dispatcher.health, holder)
                # Workflow outputs and shared-memory staging map pool slabs here.
                service_tg.start_soon(every, PRUNE_S, prune_mappings)
                # Each ends by itself once `stop` is set, after its in-flight work.
                intake.start_soon(asyncs.consume, stop)
                stats = InferenceStats()
                if settings.http_enabled:
                    fronts["http_port"] = await intake.start(
                        _serve_http, ingress, settings, stop, stats, tls
                    )
                if settings.grpc_enabled:
                    # Started, not started soon: a port that cannot be bound fails
                    # ingress's start instead of leaving it up without gRPC.
                    from services.ingress import grpc_front

                    fronts["grpc_port"] = await intake.start(
                        functools.partial(
                            grpc_front.serve,
                            ingress,
                            host=settings.http_host,
                            port=settings.grpc_port,
                            max_payload=max_payload,
                            stop=stop,
                            stats=stats,
                            tokens=api_keys(settings),
                            tls=tls,
                        )
                    )
                # Answered once the fronts listen: ready (gfaas up) means reachable.
                await serve_status(nc, "ingress", instance, details)
                task_status.started()
                await stop.wait()
                await invoke_sub.drain()
                await result_sub.drain()
                for sub in tenant_subs:
                    await sub.drain()
            await dispatcher.return_grants()
            ingress.regions.close()
            service_tg.cancel_scope.cancel()


def api_keys(settings: Settings) -> auth.TokenBook | None:
    """With authentication on, the API keys HTTP and gRPC callers must send (issued by
    `gfaas tenant add`, read again when they change)."""
    if not settings.nats_auth:
        return None
    return auth.TokenBook(auth.auth_dir(settings) / "tokens.json")


async def subscribe_books(
    nc: NATS,
    dispatcher: Dispatcher,
    holder: str,
    heard_done: Callable[[str, str, str], None] | None = None,
) -> None:
    """The events the dispatcher's books follow; `heard_done(invocation_id, outcome,
    reply)` hears each done note too (metrics: its outcome header, "ok" or an error
    code; `reply`: the invocation's reply subject, Done.reply)."""

    def on_done(
        handle: Callable[[Done, str], Awaitable[None]],
    ) -> Callable[[Msg], Awaitable[None]]:
        async def callback(msg: Msg) -> None:
            done = decode_event(msg, Done)
            if done is None:
                return
            outcome = (msg.headers or {}).get(H_OUTCOME, "")
            await handle(done, outcome)
            if heard_done is not None:
                heard_done(
                    done.invocation_id, outcome or ("ok" if done.ok else "error"), done.reply
                )

        return callback

    await nc.subscribe(subjects.grants(holder), cb=on_event(Grant, dispatcher.on_grant))
    await nc.subscribe(subjects.done(holder), cb=on_done(dispatcher.on_done))
    await nc.subscribe(subjects.done_scheduled(holder), cb=on_done(dispatcher.on_scheduled_done))
    await nc.subscribe(subjects.WORKER_LOST, cb=on_event(WorkerLost, dispatcher.on_worker_lost))
    await nc.subscribe(
        subjects.SCHEDULER_ALIVE, cb=on_event(SchedulerBeat, dispatcher.on_scheduler_beat)
    )

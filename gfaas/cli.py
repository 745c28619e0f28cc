"""The `gfaas` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np

from gfaas import status_view
from gfaas.client import Client, outputs_of, spec_json
from gfaas.supervisor import (
    SERVICE_MODULES,
    PortInUse,
    StartFailed,
    Supervisor,
    expected_services,
    front_ports,
    metrics_ports,
    run_up,
)
from shared.config import DEFAULT_NATS_URL, Settings, settings_from_env
from shared.errors import GfaasError
from shared.logs import configure_logging
from shared.schema import ErrorCode, FunctionSpec, InvokeReply, WorkflowSpec
from shared.spec import SpecError, check_fits, load_any

SERVICE_NAMES = tuple(SERVICE_MODULES)
# How long `gfaas status` collects answers from each service's instances.
STATUS_WAIT_S = 0.5


def _settings(args: argparse.Namespace) -> Settings:
    return settings_from_env(
        nats_url=getattr(args, "nats_url", None),
        state_dir=getattr(args, "state_dir", None),
        http_port=getattr(args, "http_port", None),
        policy=getattr(args, "policy", None),
        device=getattr(args, "device", None),
        worker_id=getattr(args, "worker_id", None),
        threads=getattr(args, "threads", None),
        log_level=getattr(args, "log_level", None),
    )


def _platform_settings(args: argparse.Namespace) -> Settings:
    """`gfaas up` and `demo`: authentication on unless --insecure (or
    GFAAS_NATS_AUTH=false), HTTP and gRPC on 127.0.0.1 unless --http-host (or
    GFAAS_HTTP_HOST) says otherwise. The dataclass defaults are what `gfaas serve`
    and compose use."""
    settings = _settings(args)
    auth_on = "GFAAS_NATS_AUTH" not in os.environ or settings.nats_auth
    host = args.http_host or os.environ.get("GFAAS_HTTP_HOST") or "127.0.0.1"
    return dataclasses.replace(settings, nats_auth=auth_on and not args.insecure, http_host=host)


def _url(args: argparse.Namespace) -> str:
    return str(args.nats_url or settings_from_env().nats_url)


def _client(url: str, **kwargs: Any) -> AbstractAsyncContextManager[Client]:
    # A deploy may be the first to create the registry: with the cluster's replicas.
    return Client.connect(url, replicas=settings_from_env().js_replicas, **kwargs)


# Exit statuses. EXIT_ERROR: the command failed: a usage error (argparse's own 2), an
# error the platform answered (any GfaasError: `gfaas: <code>: <reason>`, as `invoke`
# and `profile` of an unknown function both say), a spec or value refused, NATS not
# reached. `main` maps every such exception to it; a command that catches one to say
# more returns it too. EXIT_NO: the command ran and its answer is no: nothing of that
# name to remove or revoke, no service answering `health`, no spans to `trace`, and
# `up` or `demo` failing to start.
EXIT_NO = 1
EXIT_ERROR = 2


# -- platform ----------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    settings = _platform_settings(args)
    configure_logging(settings.log_level)
    sup = Supervisor(
        settings=settings,
        nats_url=args.nats_url,
        nats_port=args.nats_port,
        workers=args.workers,
        replicas=args.replicas,
    )

    def announce(url: str) -> bool:
        # One line, once every service answers its status subject: ingress's ports as
        # bound (a port of 0 is the kernel's pick, one per replica).
        bound: dict[str, list[int]] = {}
        if (settings.http_enabled and settings.http_port == 0) or (
            settings.grpc_enabled and settings.grpc_port == 0
        ):
            from shared import auth

            ingresses = expected_services(sup.children).get("ingress", 0)
            creds = auth.default_admin_creds(settings)
            try:
                bound = anyio.run(front_ports, url, ingresses, creds)
            except Exception as exc:  # said as asked for rather than not at all
                print(f"gfaas up: could not ask ingress for its ports: {exc}", file=sys.stderr)

        def hosts(key: str, port: int, scheme: str = "") -> str:
            ports = (bound.get(key) or [port]) if port == 0 else [port]
            return ", ".join(f"{scheme}{settings.http_host}:{p}" for p in ports)

        parts = [f"NATS {url}"]
        if settings.http_enabled:
            scheme = "https" if settings.http_tls_cert else "http"
            parts.append(f"HTTP {hosts('http_port', settings.http_port, scheme + '://')}")
        if settings.grpc_enabled:
            tls = " (TLS)" if settings.http_tls_cert else ""
            parts.append(f"gRPC {hosts('grpc_port', settings.grpc_port)}{tls}")
        parts.append("auth on" if settings.nats_auth else "auth off (--insecure)")
        if settings.metrics_enabled:
            ports = metrics_ports(sup.children)
            parts.append("metrics " + ", ".join(f"{n} :{p or 'any'}" for n, p in ports.items()))
        services = len(sup.children)
        print(
            f"gfaas up: {services} services ready ({', '.join(parts)}) (Ctrl-C stops)", flush=True
        )
        return True

    try:
        run_up(sup, announce, ready=True)
    except (PortInUse, StartFailed) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_NO
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gfaas.demo import run_demo

    if args.log_level is None:
        args.log_level = "warning"
    settings = _platform_settings(args)
    configure_logging(settings.log_level)
    sup = Supervisor(
        settings=settings,
        nats_url=args.nats_url,
        nats_port=args.nats_port,
        workers=args.workers,
        replicas=args.replicas,
    )
    outcome: list[int] = [1]

    def demo(url: str) -> bool:
        outcome[0] = anyio.run(run_demo, url, settings)
        if args.keep and outcome[0] == 0:
            print(f"platform stays up at {url} (Ctrl-C stops)")
            return True
        return False

    try:
        # As `gfaas up`: a port in use is one line, not an ingress restarted in a loop
        # under a demo that waits for it until its own timeout.
        run_up(sup, demo, ready=True)
    except (PortInUse, StartFailed) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_NO
    return outcome[0]


def cmd_serve(args: argparse.Namespace) -> int:
    from importlib import import_module

    from shared.service import run_service

    settings = _settings(args)
    module = import_module(f"{SERVICE_MODULES[args.service]}.app")
    return run_service(args.service, module.serve, settings)


# -- registry, models, invocation ----------------------------------------------------------


async def _deploy(url: str, paths: Sequence[Path]) -> None:
    specs = [load_any(p) for p in paths]
    async with _client(url) as client:
        for spec in specs:
            if isinstance(spec, FunctionSpec):
                await client.check_code(spec)  # before a worker would fetch it
                await _check_devices(client, spec)
                await _check_handler(client, spec)
        for spec in specs:
            # Handlers were checked above, before any spec was registered.
            await client.deploy(spec, handler_check=False)
            if isinstance(spec, WorkflowSpec):
                chain = ", ".join(f"{s.name}={s.function}" for s in spec.stages)
                print(f"deployed workflow {spec.name} (stages {chain})")
            else:
                print(f"deployed {spec.name} ({spec.kind}, handler {spec.handler})")


async def _check_devices(client: Client, spec: FunctionSpec) -> None:
    """Refuse a function no device of the cluster can hold: it would only ever wait."""
    devices = await client.device_memory(spec.kind)
    if not devices:
        # A cluster still starting (or without a scheduler) is no reason to refuse.
        print(
            f"gfaas: warning: no worker answered; {spec.name}'s memory_mb is unchecked",
            file=sys.stderr,
        )
        return
    reason = check_fits(spec, devices)
    if reason is not None:
        raise SpecError(reason)


async def _check_handler(client: Client, spec: FunctionSpec) -> None:
    """Refuse a handler a worker cannot import (a ValueError with its reason)."""
    if not await client.check_handler(spec):
        # As for memory: a cluster without workers yet is no reason to refuse.
        print(
            f"gfaas: warning: no worker checked {spec.name}'s handler {spec.handler}; "
            "it is unchecked",
            file=sys.stderr,
        )


async def _ls(url: str, as_json: bool) -> None:
    async with _client(url) as client:
        specs = await client.functions()
        workflows = await client.workflows()
        live = await _live_instances(client)
        registry = await client.registry()
        versions = {s.name: await registry.fetch_revision(s.name) for s in specs}
    if as_json:
        out = []
        for s in specs:
            out.append(
                {
                    **msgspec.to_builtins(s),
                    "version": versions[s.name],
                    "instances": live.get(s.name, []),
                }
            )
        out += [msgspec.to_builtins(w) for w in workflows]
        print(json.dumps(out, indent=2))
        return
    print(
        f"{'NAME':24} {'KIND':8} {'MODEL':16} {'SLO_MS':>7} {'VER':>4} {'INST':>4}  "
        "HANDLER / STAGES"
    )
    for s in specs:
        n = len(live.get(s.name, []))
        print(
            f"{s.name:24} {s.kind:8} {s.model or '-':16} {s.slo_ms:7.0f} {versions[s.name]:4} "
            f"{n:4}  {s.handler}"
        )
    for w in workflows:
        chain = " -> ".join(st.function for st in w.stages)
        print(f"{w.name:24} {'workflow':8} {'-':16} {w.slo_ms:7.0f} {'-':>4} {'-':>4}  {chain}")


async def _live_instances(client: Client) -> dict[str, list[dict[str, Any]]]:
    """Each function's live instances, as the active scheduler knows them ({}: none
    answered)."""
    for status in await client.status_all("scheduler", timeout=STATUS_WAIT_S):
        if status.details.get("active"):
            live = (status.details.get("instances") or {}).get("live") or {}
            return dict(live)
    return {}


async def _profile(url: str, function: str, as_json: bool) -> int:
    async with _client(url) as client:
        try:
            profile = await client.profile(function)
        except GfaasError as exc:
            workflow = None
            if exc.code is ErrorCode.UNKNOWN_FUNCTION:
                # A workflow is deployed but no function: "not deployed" misled.
                workflow = await (await client.workflow_registry()).fetch(function)
            if workflow is not None:
                stages = ", ".join(dict.fromkeys(stage.function for stage in workflow.stages))
                print(
                    f"gfaas: {function} is a workflow: profile its functions ({stages})",
                    file=sys.stderr,
                )
            else:
                print(f"gfaas: {exc.code}: {exc.reason}", file=sys.stderr)
            return EXIT_ERROR  # as `main` for any GfaasError (`gfaas invoke` of it)
    if as_json:
        print(json.dumps(msgspec.to_builtins(profile), indent=2))
        return 0
    print(f"{profile.function} on {profile.device} of {profile.agent} (spatial: {profile.spatial})")
    print(f"{'SM_SHARE':>8} {'TIME_QUOTA':>10} {'P50_MS':>9} {'P99_MS':>9} {'REQ/S':>9}")
    for r in profile.rows:
        print(
            f"{r.sm_share:8.2f} {r.time_quota:10.2f} {r.p50_ms:9.2f} {r.p99_ms:9.2f} "
            f"{r.throughput:9.1f}"
        )
    return 0


async def _rm(url: str, name: str, force: bool) -> int:
    async with _client(url) as client:
        if await client.remove(name, force=force):
            print(f"removed {name}")
            return 0
    print(f"no function or workflow named {name}", file=sys.stderr)
    return EXIT_NO


async def _model_push(url: str, name: str, path: Path) -> None:
    async with _client(url) as client:
        size = await client.push_model(name, path)
    print(f"pushed {name}: {size} bytes")


async def _push_code(url: str, name: str, directory: Path) -> None:
    async with _client(url) as client:
        ref, written = await client.push_code(name, directory)
    # The line alone on stdout, for `code = "..."` in a spec (or a script's $(...)).
    print(ref)
    if not written:
        print(f"gfaas: {name}: that content was pushed already", file=sys.stderr)


async def _code_ls(url: str) -> None:
    async with _client(url) as client:
        for ref, size, users in await client.code_bundles():
            print(f"{ref:84} {size:>10}  {','.join(users) or '-'}")


async def _code_rm(url: str, ref: str, force: bool) -> int:
    async with _client(url) as client:
        removed = await client.remove_code(ref, force=force)  # refused: EXIT_ERROR
    if not removed:
        print(f"gfaas: no code bundle {ref}", file=sys.stderr)
        return EXIT_NO
    return 0


async def _model_ls(url: str) -> None:
    async with _client(url) as client:
        for name, size in await client.models():
            print(f"{name:32} {size:>12}")


def parse_input(text: str) -> tuple[str, Any]:
    """NAME=@file.npy, or NAME=<JSON array>[:dtype] (dtype defaults to float32)."""
    name, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"input {text!r} must look like NAME=@file.npy or NAME=[1,2,3]")
    if value.startswith("@"):
        try:
            return name, np.load(value[1:])
        except ValueError as exc:
            # Not an .npy file, or one of objects: numpy's advice (allow_pickle, to
            # load it unsafely) is not for a command line. Said with the input.
            why = "" if "pickle" in str(exc) else f": {exc}"
            raise ValueError(f"input {name}: {value[1:]} is no .npy file of numbers{why}") from None
    dtype = "float32"
    if ":" in value and not value.rstrip().endswith("]"):
        value, dtype = value.rsplit(":", 1)
    try:
        data = json.loads(value)
    except ValueError as exc:
        raise ValueError(f"input {name}: {value!r} is no JSON array: {exc}") from None
    try:
        return name, np.asarray(data, dtype=dtype)
    except (TypeError, ValueError) as exc:
        # numpy's word for a dtype it does not know ("float99") is a TypeError, which
        # escaped `gfaas invoke` as a traceback; ragged or non-numeric data a
        # ValueError that did not say which input.
        raise ValueError(f"input {name}: {exc}") from None


def parse_inputs(items: Sequence[str]) -> dict[str, Any]:
    """Every -i of `gfaas invoke`: one input given twice is refused (the first was
    dropped without a word)."""
    inputs: dict[str, Any] = {}
    for item in items:
        name, value = parse_input(item)
        if name in inputs:
            raise ValueError(f"input {name} is given twice")
        inputs[name] = value
    return inputs


def _print_reply(reply: InvokeReply) -> None:
    out = outputs_of(reply)
    for name, array in out.items():
        print(f"{name} {array.dtype}{list(array.shape)}: {np.array2string(array, threshold=20)}")


async def _invoke(url: str, args: argparse.Namespace) -> int:
    from shared import tracing
    from shared.schema import OutputMode, new_invocation_id

    inputs = parse_inputs(args.input)
    traced = _client_tracing(args)
    try:
        async with _client(url, timeout=args.timeout) as client:
            if args.async_:
                invocation_id = await client.invoke_async(args.function, inputs)
                print(invocation_id)
                return 0
            invocation_id = new_invocation_id()
            # Outputs over the bus limit come by handle, as inputs over it go (this
            # command runs on the node): read, printed, then released. Not for a
            # tenant: it may not lease or release at the broker (shared.auth).
            mode = OutputMode.VALUE if client.tenant_account else OutputMode.AUTO
            reply = await client.invoke_reply(
                args.function, inputs, invocation_id=invocation_id, outputs_by=mode
            )
            try:
                # The id `gfaas trace` takes; on stderr, so that stdout is the outputs.
                print(f"invocation {invocation_id}", file=sys.stderr)
                _print_reply(reply)
            finally:
                await client.release(reply.outputs)
    finally:
        if traced:
            tracing.shutdown_tracing()
    return 0


async def _result(url: str, invocation_id: str) -> int:
    async with _client(url) as client:
        reply = await client.result(invocation_id)
    _print_reply(reply)
    return 0


async def _status(url: str, services: Sequence[str], as_json: bool) -> None:
    """Every instance of each service (each answers the status subject): a table, or
    the raw statuses as JSON lines with --json."""
    rows: list[tuple[str, str, float, str]] = []
    live: dict[str, Any] | None = None
    async with _client(url) as client:
        for service in services or SERVICE_NAMES:
            found = await client.status_all(service, timeout=STATUS_WAIT_S)
            if not found:
                rows.append((service, "-", 0.0, "no answer"))
                if as_json:
                    print(json.dumps({"service": service, "error": "no answer"}))
            for status in found:
                if as_json:
                    print(json.dumps(msgspec.to_builtins(status)))
                else:
                    text = status_view.summary(service, status.details)
                    rows.append((service, status.instance, status.uptime_s, text))
                    if service == "scheduler" and status.details.get("active"):
                        live = (status.details.get("instances") or {}).get("live")
    if not as_json:
        print(status_view.table(rows))
        if live is not None:
            print()
            print(status_view.instances_table(live))


async def _health(url: str, service: str, any_instance: bool) -> int:
    """0 when an instance of `service` on this host answers its status subject (the
    container's own process, for compose's healthcheck), or any with --any; else 1."""
    import socket

    host = socket.gethostname()
    with anyio.fail_after(STATUS_WAIT_S * 8):
        async with _client(url) as client:
            found = await client.status_all(service, timeout=STATUS_WAIT_S * 2)
    # Instance names start with the host's name (shared.service.instance_name; a
    # worker's with at most 24 of its characters).
    mine = [s for s in found if any_instance or s.instance.startswith(host[:24])]
    if not mine:
        print(f"{service}: no answer" + ("" if any_instance else f" from {host}"))
        return EXIT_NO
    print(f"{service}: {', '.join(s.instance for s in mine)} up")
    return 0


# -- logs ------------------------------------------------------------------------------------

# How long `gfaas logs` waits for the next stored record before giving up on it.
LOGS_WAIT_S = 5.0


def format_failure(record: Any) -> str:
    """One failed invocation (a shared.schema.FailureRecord), as `gfaas logs` prints it."""
    import datetime

    at = datetime.datetime.fromtimestamp(record.at_ms / 1000.0, datetime.UTC)
    where = f"{record.service} {record.instance}".strip()
    lines = [
        f"{at.isoformat(timespec='milliseconds')} {record.function} {record.code} "
        f"invocation={record.invocation_id} tenant={record.tenant} "
        f"trace={record.trace_id or '-'} by={where or '-'}",
        f"  {record.reason}",
    ]
    lines += [f"  {line}" for line in record.traceback.rstrip().splitlines()]
    return "\n".join(lines)


def _print_now(text: str) -> None:
    print(text, flush=True)


async def _logs(
    url: str,
    function: str | None,
    follow: bool,
    last: int,
    emit: Callable[[str], object] = _print_now,
) -> int:
    """The last `last` failed invocations (of `function`, or all), from stream
    GFAAS_LOGS, each `emit`ted; with `follow`, new ones as they come until interrupted."""
    import collections
    import contextlib

    from nats.js.api import DeliverPolicy

    from shared import jetstream, subjects
    from shared.schema import FailureRecord, decode

    subject = subjects.logs(function) if function else subjects.LOGS_ALL
    async with _client(url) as client:
        js = client.nc.jetstream()
        await jetstream.ensure_logs_stream(js, replicas=settings_from_env().js_replicas)
        info = await js.stream_info(jetstream.LOGS_STREAM, subjects_filter=subject)
        # `last` 0: none of what is stored (with --follow, only what comes from now
        # on, as `tail -n 0 -f`); the deque below keeps at least one, and printed it.
        stored = sum((info.state.subjects or {}).values()) if last > 0 else 0
        if not stored and not follow:
            return 0
        policy = DeliverPolicy.ALL if last > 0 else DeliverPolicy.NEW
        sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=policy)
        kept: collections.deque[FailureRecord] = collections.deque(maxlen=max(last, 1))
        try:
            # What is stored: the last `last` of it.
            while stored:
                msg = await sub.next_msg(timeout=LOGS_WAIT_S)
                # Not a record (a newer schema's, say): skipped.
                with contextlib.suppress(msgspec.MsgspecError):
                    kept.append(decode(msg.data, FailureRecord))
                if msg.metadata.num_pending == 0:
                    break
            for record in kept:
                emit(format_failure(record))
            while follow:
                try:
                    msg = await sub.next_msg(timeout=3600.0)
                except TimeoutError:
                    continue
                try:
                    emit(format_failure(decode(msg.data, FailureRecord)))
                except msgspec.MsgspecError:
                    continue
        finally:
            await sub.unsubscribe()
    return 0


# -- traces and top ------------------------------------------------------------------------


def _trace_dir(args: argparse.Namespace) -> Path:
    """Where the span files are: --dir, $GFAAS_TRACE_DIR, or `gfaas up`'s default
    under the state dir."""
    import os

    from shared import tracing

    if getattr(args, "dir", None):
        return Path(args.dir)
    return Path(
        os.environ.get(tracing.TRACE_DIR_ENV) or tracing.trace_dir(_settings(args).state_dir)
    )


def _client_tracing(args: argparse.Namespace) -> bool:
    """The CLI's own spans (its call is the trace's root): to the collector, or to the
    span files of a local `gfaas up`. True when installed (shut down after)."""
    from shared import tracing

    directory = _trace_dir(args)
    if not tracing.otlp_endpoint() and not directory.is_dir():
        return False
    tracing.configure_tracing("cli", directory if directory.is_dir() else "")
    return True


def cmd_trace(args: argparse.Namespace) -> int:
    """`gfaas trace INVOCATION_ID`: the invocation's spans from the span files, as a tree."""
    import time

    from shared import tracing

    directory = _trace_dir(args)
    deadline = time.monotonic() + args.wait
    while True:
        spans = tracing.spans_of(tracing.read_spans(directory), args.invocation_id)
        if spans or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if not spans:
        print(
            f"gfaas trace: no spans of {args.invocation_id} in {directory} "
            "(traces go to the collector when OTEL_EXPORTER_OTLP_ENDPOINT is set)",
            file=sys.stderr,
        )
        return EXIT_NO
    print("\n".join(tracing.trace_tree(spans)))
    return 0


async def _scrape(host: str, ports: Sequence[int]) -> status_view.Samples:
    import httpx

    scrapes = []
    async with httpx.AsyncClient(timeout=2.0) as http:
        for port in ports:
            try:
                response = await http.get(f"http://{host}:{port}/metrics")
            except httpx.HTTPError:
                continue
            scrapes.append(status_view.parse_metrics(response.text))
    return status_view.merge(scrapes)


async def _status_rows(client: Client) -> list[tuple[str, str, float, str]]:
    rows: list[tuple[str, str, float, str]] = []
    for service in SERVICE_NAMES:
        found = await client.status_all(service, timeout=STATUS_WAIT_S)
        if not found:
            rows.append((service, "-", 0.0, "no answer"))
        for status in sorted(found, key=lambda s: s.instance):
            text = status_view.summary(service, status.details)
            rows.append((service, status.instance, status.uptime_s, text))
    return rows


async def _top(url: str, interval: float, once: bool, host: str) -> int:
    """Per-function rates and percentiles (ingress's metrics scraped twice, `interval`
    apart: counters and histogram buckets differenced) and the services' lines."""
    import time
    from urllib.parse import urlsplit

    from rich.console import Console
    from rich.live import Live

    host = host or urlsplit(url.split(",")[0]).hostname or "127.0.0.1"
    console = Console()
    async with _client(url) as client:

        async def ports() -> list[int]:
            found = await client.status_all("ingress", timeout=STATUS_WAIT_S)
            return [int(p) for s in found if (p := s.details.get("metrics_port"))]

        before, at = await _scrape(host, await ports()), time.monotonic()

        async def frame() -> Any:
            nonlocal before, at
            await anyio.sleep(interval)
            after, now = await _scrape(host, await ports()), time.monotonic()
            rates = status_view.function_rates(before, after, now - at)
            window = now - at
            before, at = after, now
            return status_view.top_renderable(rates, await _status_rows(client), window)

        if once:
            console.print(await frame())
            return 0
        with Live(await frame(), console=console, auto_refresh=False) as live:
            while True:
                live.update(await frame(), refresh=True)


# -- tenants -------------------------------------------------------------------------------


def cmd_tenant_add(args: argparse.Namespace) -> int:
    """A tenant's NATS credentials file and HTTP API key, into the state directory;
    a running embedded server (its pid file there) is told to reload its accounts."""
    from gfaas.supervisor import PID_FILE
    from shared import auth

    settings = settings_from_env(state_dir=args.state_dir)
    creds, key = auth.add_tenant(auth.auth_dir(settings), args.name)
    reloaded = auth.reload_server(settings.state_dir / "nats" / PID_FILE)
    if args.json:
        print(
            json.dumps(
                {"tenant": args.name, "creds": str(creds), "api_key": key, "reloaded": reloaded}
            )
        )
        return 0
    print(f"tenant {args.name}")
    print(f"  NATS credentials: {creds}")
    print("    (connect with: Client.connect(url, creds=PATH); it may invoke only)")
    print(f"  HTTP/gRPC API key (shown once): {key}")
    print("    (send: Authorization: Bearer KEY)")
    if reloaded:
        print("  the running nats-server reloaded its accounts")
    else:
        print(
            "  no embedded nats-server runs from this state dir: it takes effect at the "
            "next `gfaas up` (an external server: reload it with its accounts include, "
            f"{auth.auth_dir(settings) / 'accounts.conf'})"
        )
    return 0


def cmd_auth_init(args: argparse.Namespace) -> int:
    """Every service's and the admin's credentials and the server's accounts include,
    into the auth directory (GFAAS_AUTH_DIR, else the state directory's `auth/`); kept
    when they exist. What `gfaas up` does at its first start, for a platform whose
    server and services start apart (compose's `auth-init`)."""
    from shared import auth

    settings = settings_from_env(state_dir=args.state_dir)
    state = auth.ensure(auth.auth_dir(settings))
    if args.json:
        files = {identity: str(state.creds_file(identity)) for identity in auth.IDENTITIES}
        print(
            json.dumps({"dir": str(state.directory), "accounts": str(state.accounts_file), **files})
        )
        return 0
    print(f"credentials in {state.directory}")
    print(f"  nats-server include: {state.accounts_file}")
    for identity in auth.IDENTITIES:
        print(f"  {identity}: {state.creds_file(identity)}")
    return 0


def add_auth_commands(sub: Any) -> None:
    auth_cmd = sub.add_parser("auth", help="the platform's own NATS credentials")
    auth_sub = auth_cmd.add_subparsers(dest="auth_command", required=True)
    init = auth_sub.add_parser(
        "init", help="make every service's and the admin's credentials (kept if they exist)"
    )
    init.add_argument("--state-dir", type=Path, default=None)
    init.add_argument("--json", action="store_true", help="one JSON line: the files")
    init.set_defaults(func=cmd_auth_init)


def cmd_tenant_revoke(args: argparse.Namespace) -> int:
    """Take a tenant's access away: its NATS user, credentials file and API keys; a
    running embedded server is told to reload (and drops the tenant's connections)."""
    from gfaas.supervisor import PID_FILE
    from shared import auth

    settings = settings_from_env(state_dir=args.state_dir)
    had_user, keys = auth.remove_tenant(auth.auth_dir(settings), args.name)
    if not had_user and not keys:
        print(f"no tenant {args.name!r}", file=sys.stderr)
        return EXIT_NO
    reloaded = auth.reload_server(settings.state_dir / "nats" / PID_FILE)
    print(f"tenant {args.name} revoked: its NATS user and {keys} API key(s)")
    if not reloaded:
        print("  no embedded nats-server runs from this state dir: reload yours (SIGHUP)")
    return 0


def add_tenant_commands(sub: Any) -> None:
    tenant = sub.add_parser("tenant", help="tenants: NATS credentials and HTTP API keys")
    tenant_sub = tenant.add_subparsers(dest="tenant_command", required=True)
    add = tenant_sub.add_parser(
        "add", help="issue a tenant's credentials file and API key (another key if it exists)"
    )
    add.add_argument("name")
    add.add_argument("--state-dir", type=Path, default=None)
    add.add_argument("--json", action="store_true", help="one JSON line: creds, api_key")
    add.set_defaults(func=cmd_tenant_add)
    revoke = tenant_sub.add_parser(
        "revoke", help="revoke a tenant: its NATS user, credentials file and every API key"
    )
    revoke.add_argument("name")
    revoke.add_argument("--state-dir", type=Path, default=None)
    revoke.set_defaults(func=cmd_tenant_revoke)


# -- argument parsing ----------------------------------------------------------------------


def _duration(text: str, *, zero_ok: bool) -> float:
    """A duration flag's seconds: finite, and above 0 (or 0 too). A usage error
    otherwise: `--timeout inf` ended `gfaas invoke` in an OverflowError (its
    milliseconds are an int), and `--wait nan` never ended `gfaas trace` (no time is
    >= NaN)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    # Written so that NaN, which compares false to everything, is refused too.
    above_least = value >= 0.0 if zero_ok else value > 0.0
    if not (above_least and value < math.inf):
        least = "0 or more" if zero_ok else "above 0"
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be {least} and finite")
    return value


def _seconds(text: str) -> float:
    return _duration(text, zero_ok=False)


def _seconds_or_zero(text: str) -> float:
    return _duration(text, zero_ok=True)


def _count(text: str) -> int:
    """A count argument: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _port(text: str, *, lowest: int = 0) -> int:
    """A TCP port flag: 65536 and up ended `gfaas up` in an OverflowError traceback
    from its port check, a negative --http-port in ingress's, restarted as a crash."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not lowest <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is no TCP port ({lowest}..65535)")
    return value


def _nats_port(text: str) -> int:
    return _port(text, lowest=-1)  # -1: any free one


def _positive(text: str) -> int:
    """A count of 1 or more (--replicas 0 ran one of each, as 1 does)."""
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not 1 or more")
    return value


def _service(text: str) -> str:
    """A service's name (`gfaas status`): a misspelt one got "no answer", as if the
    service were down."""
    if text not in SERVICE_NAMES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is no service (one of {', '.join(SERVICE_NAMES)})"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gfaas", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def nats_opt(p: argparse.ArgumentParser, help_text: str) -> None:
        p.add_argument(
            "--nats-url", default=None, help=f"{help_text}; a cluster's URLs comma-separated"
        )

    def platform_opts(p: argparse.ArgumentParser) -> None:
        nats_opt(p, "use this NATS server instead of starting the embedded one")
        p.add_argument(
            "--nats-port", type=_nats_port, default=4222, help="embedded server port (-1: any)"
        )
        p.add_argument(
            "--workers", type=_count, default=0, help="gpu-worker processes (default: one per GPU)"
        )
        p.add_argument(
            "--replicas",
            type=_positive,
            default=1,
            help="schedulers and ingresses to run (one scheduler active, the rest standing by)",
        )
        p.add_argument("--state-dir", type=Path, default=None)
        p.add_argument("--http-port", type=_port, default=None)
        p.add_argument("--policy", default=None, help="scheduling policy")
        p.add_argument("--threads", type=int, default=None, help="torch threads per worker")
        p.add_argument("--log-level", default=None)
        p.add_argument(
            "--insecure",
            action="store_true",
            help="no NATS authentication, no API keys on HTTP/gRPC (GFAAS_NATS_AUTH=false)",
        )
        p.add_argument(
            "--http-host", default=None, help="address HTTP and gRPC bind (default 127.0.0.1)"
        )

    add_tenant_commands(sub)
    add_auth_commands(sub)
    up = sub.add_parser("up", help="start NATS (embedded) and every service")
    platform_opts(up)
    up.set_defaults(func=cmd_up)

    demo = sub.add_parser("demo", help="start the platform, deploy the examples, invoke them")
    platform_opts(demo)
    demo.set_defaults(nats_port=-1)
    demo.add_argument("--keep", action="store_true", help="keep running after the demo")
    demo.set_defaults(func=cmd_demo)

    serve = sub.add_parser("serve", help="run one service (what compose.yaml runs)")
    serve.add_argument("service", choices=SERVICE_NAMES)
    nats_opt(serve, f"NATS server (default $GFAAS_NATS_URL or {DEFAULT_NATS_URL})")
    serve.add_argument("--state-dir", type=Path, default=None)
    serve.add_argument("--http-port", type=_port, default=None)
    serve.add_argument("--policy", default=None)
    serve.add_argument("--device", default=None, help="gpu-worker: cpu, cuda:N or auto")
    serve.add_argument("--worker-id", default=None)
    serve.add_argument("--threads", type=int, default=None)
    serve.add_argument("--log-level", default=None)
    serve.set_defaults(func=cmd_serve)

    deploy = sub.add_parser("deploy", help="register functions from spec files")
    deploy.add_argument("specs", nargs="+", type=Path)
    nats_opt(deploy, "NATS server")
    deploy.set_defaults(func=lambda a: anyio.run(_deploy, _url(a), a.specs) or 0)

    prof = sub.add_parser(
        "profile", help="measure a function on a node's device per (SM share, time quota)"
    )
    prof.add_argument("function")
    prof.add_argument("--json", action="store_true")
    nats_opt(prof, "NATS server")
    prof.set_defaults(func=lambda a: anyio.run(_profile, _url(a), a.function, a.json))

    ls = sub.add_parser("ls", help="list deployed functions")
    ls.add_argument("--json", action="store_true")
    nats_opt(ls, "NATS server")
    ls.set_defaults(func=lambda a: anyio.run(_ls, _url(a), a.json) or 0)

    rm = sub.add_parser("rm", help="remove a function or a workflow")
    rm.add_argument("name")
    rm.add_argument(
        "--force", action="store_true", help="remove a function even if workflows use it"
    )
    nats_opt(rm, "NATS server")
    rm.set_defaults(func=lambda a: anyio.run(_rm, _url(a), a.name, a.force))

    model = sub.add_parser("model", help="model weights in the object store")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    push = model_sub.add_parser("push", help="upload weights")
    push.add_argument("name")
    push.add_argument("file", type=Path)
    nats_opt(push, "NATS server")
    push.set_defaults(func=lambda a: anyio.run(_model_push, _url(a), a.name, a.file) or 0)
    mls = model_sub.add_parser("ls", help="list models")
    nats_opt(mls, "NATS server")
    mls.set_defaults(func=lambda a: anyio.run(_model_ls, _url(a)) or 0)

    code = sub.add_parser("code", help="code bundles (handlers' code) in the object store")
    code_sub = code.add_subparsers(dest="code_command", required=True)
    push_code = code_sub.add_parser(
        "push",
        help="pack DIR's Python packages into a code bundle, store it, print NAME@sha256:...",
    )
    push_code.add_argument("name")
    push_code.add_argument("dir", type=Path)
    nats_opt(push_code, "NATS server")
    push_code.set_defaults(func=lambda a: anyio.run(_push_code, _url(a), a.name, a.dir) or 0)
    code_ls = code_sub.add_parser("ls", help="list stored bundles and the functions pinning each")
    nats_opt(code_ls, "NATS server")
    code_ls.set_defaults(func=lambda a: anyio.run(_code_ls, _url(a)) or 0)
    code_rm = code_sub.add_parser(
        "rm", help="remove a stored bundle version (refused while a function pins it)"
    )
    code_rm.add_argument("ref", help="NAME@sha256:<hex>")
    code_rm.add_argument("--force", action="store_true", help="even if functions pin it")
    nats_opt(code_rm, "NATS server")
    code_rm.set_defaults(func=lambda a: anyio.run(_code_rm, _url(a), a.ref, a.force))

    invoke = sub.add_parser("invoke", help="invoke a function")
    invoke.add_argument("function")
    invoke.add_argument(
        "-i", "--input", action="append", default=[], help="NAME=@file.npy or NAME=[json]:dtype"
    )
    invoke.add_argument("--async", dest="async_", action="store_true")
    invoke.add_argument("--timeout", type=_seconds, default=30.0)
    invoke.add_argument(
        "--state-dir", type=Path, default=None, help="a local `gfaas up`'s (for its span files)"
    )
    nats_opt(invoke, "NATS server")
    invoke.set_defaults(func=lambda a: anyio.run(_invoke, _url(a), a))

    trace_cmd = sub.add_parser(
        "trace", help="an invocation's spans as a tree, from the local span files"
    )
    trace_cmd.add_argument("invocation_id", help="an invocation id (or a trace id)")
    trace_cmd.add_argument("--state-dir", type=Path, default=None)
    trace_cmd.add_argument("--dir", type=Path, default=None, help="the span files' directory")
    trace_cmd.add_argument(
        "--wait",
        type=_seconds_or_zero,
        default=1.0,
        help="seconds to wait for the spans to be written",
    )
    trace_cmd.set_defaults(func=cmd_trace)

    top = sub.add_parser("top", help="live per-function rates and latencies, and the services")
    top.add_argument("--interval", type=_seconds, default=2.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument(
        "--metrics-host", default="", help="where ingress's metrics are (default: NATS's host)"
    )
    nats_opt(top, "NATS server")
    top.set_defaults(func=lambda a: anyio.run(_top, _url(a), a.interval, a.once, a.metrics_host))

    result = sub.add_parser("result", help="fetch an async invocation's result")
    result.add_argument("invocation_id")
    nats_opt(result, "NATS server")
    result.set_defaults(func=lambda a: anyio.run(_result, _url(a), a.invocation_id))

    status = sub.add_parser("status", help="ask services for their status")
    # Not `choices`: argparse checks nargs="*"'s empty default against them.
    status.add_argument("services", nargs="*", type=_service, help=f"any of {SERVICE_NAMES}")
    status.add_argument("--json", action="store_true", help="raw statuses, one JSON per line")
    nats_opt(status, "NATS server")
    status.set_defaults(func=lambda a: anyio.run(_status, _url(a), a.services, a.json) or 0)

    health = sub.add_parser("health", help="exit 0 when this host's SERVICE answers (compose)")
    health.add_argument("service", choices=SERVICE_NAMES)
    health.add_argument("--any", action="store_true", help="any host's instance will do")
    nats_opt(health, "NATS server")
    health.set_defaults(func=lambda a: anyio.run(_health, _url(a), a.service, a.any))

    logs = sub.add_parser("logs", help="failed invocations, with tracebacks (from the bus)")
    logs.add_argument("function", nargs="?", default=None, help="only this function's")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new ones")
    logs.add_argument("-n", "--last", type=_count, default=50, help="how many stored ones")
    nats_opt(logs, "NATS server")
    logs.set_defaults(func=lambda a: anyio.run(_logs, _url(a), a.function, a.follow, a.last))

    spec = sub.add_parser("spec", help="validate a spec file and print it")
    spec.add_argument("file", type=Path)
    spec.set_defaults(func=lambda a: print(spec_json(load_any(a.file))) or 0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status (EXIT_ERROR, EXIT_NO and what a command
    returns)."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (GfaasError, SpecError, ValueError, ConnectionError, OSError) as exc:
        print(f"gfaas: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        # Ctrl-C (how `logs --follow` and `top` end): the shell's 128 + SIGINT, not a
        # traceback of wherever the event loop was.
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())

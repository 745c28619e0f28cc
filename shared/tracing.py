"""OpenTelemetry: W3C trace context in NATS headers, one span per service hop.

The SDK is installed only when an exporter is asked for (OTEL_EXPORTER_OTLP_ENDPOINT,
GFAAS_TRACE_DIR or GFAAS_TRACE_CONSOLE=1), so an untraced deployment pays for no-op
spans only; the trace context still propagates, because extracted parents pass through
no-op spans.

Without a collector, `gfaas up` sets GFAAS_TRACE_DIR (`<state_dir>/traces`): each
process writes its finished spans there as JSON lines (`SpanFileExporter`,
`<service>-<pid>.jsonl`, rotated at a size cap), which `gfaas trace` reads back
(`read_spans`, `trace_tree`).

Which span is an invocation's root: the caller's, when the caller sends a trace
context (`gfaas.Client` and the CLI open a client span per call and inject it; so does
any OpenTelemetry-instrumented caller): every service's span is its descendant and it
ends when the reply has arrived. A caller without one (plain NATS, HTTP without a
`traceparent`) makes ingress's span the root: for HTTP it ends with the response; for a
NATS invocation, which the worker answers directly, ingress keeps it open until the
worker's done note arrives (sent just before that reply).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider

_TRACER_NAME = "gfaas"
# The directory of span files (set by `gfaas up` when no collector is configured).
TRACE_DIR_ENV = "GFAAS_TRACE_DIR"
# A span file is rotated (one previous file kept) once it grows past this.
SPAN_FILE_MAX_BYTES = 32 * 1024 * 1024
# How often the batch processor writes a span file: soon enough for `gfaas trace`.
SPAN_FILE_DELAY_MS = 200
# The share of untraced invocations whose spans go to span files (see configure_tracing).
SPAN_FILE_SAMPLE = 0.1
TRACE_SAMPLE_ENV = "GFAAS_TRACE_SAMPLE"


def trace_dir(state_dir: Path) -> Path:
    """Where `gfaas up`'s services write their span files."""
    return state_dir / "traces"


def otlp_endpoint() -> str:
    return os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""
    )


def configure_tracing(service_name: str, directory: str | Path = "") -> None:
    """Install the SDK with the exporters the environment asks for; `directory`: span
    files there, as GFAAS_TRACE_DIR asks (which wins)."""
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return  # someone (a test, an embedding app) installed one already
    endpoint = otlp_endpoint()
    console = os.environ.get("GFAAS_TRACE_CONSOLE", "") in {"1", "true"}
    directory = os.environ.get(TRACE_DIR_ENV, "") or str(directory or "")
    if not endpoint and not console and not directory:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    # Span files only (no collector): of the invocations no caller traces, one in ten
    # is recorded (GFAAS_TRACE_SAMPLE); a caller's sampled context (`gfaas invoke`,
    # a traced client) is always followed. Recording every span cost the sync path
    # about 20% of its p50 (benchmarks.md, "Overhead of metrics and tracing").
    ratio = 1.0
    if service_name != "cli":
        ratio = _sample_ratio(1.0 if endpoint else SPAN_FILE_SAMPLE)
    sampler = None
    if ratio < 1.0:
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        sampler = ParentBased(TraceIdRatioBased(ratio))
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"gfaas-{service_name}"}), sampler=sampler
    )
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if console:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    if directory:
        add_span_file(provider, Path(directory), service_name)
    trace.set_tracer_provider(provider)


def _sample_ratio(default: float) -> float:
    """GFAAS_TRACE_SAMPLE as a ratio in [0, 1]; anything else is one warning and
    `default`: read as each service starts, a typo must cost its sampling choice, not
    the service (float() raised, and so did the sampler for a ratio below 0)."""
    text = os.environ.get(TRACE_SAMPLE_ENV, "")
    if not text:
        return default
    try:
        ratio = float(text)
    except ValueError:
        ratio = math.nan
    if not 0.0 <= ratio <= 1.0:  # NaN too, which compared as "record everything"
        from shared.logs import get_logger  # shared.logs imports this module

        get_logger("tracing").warning(
            "tracing.bad_sample_ratio",
            variable=TRACE_SAMPLE_ENV,
            value=text,
            using=default,
            hint="a ratio from 0 to 1",
        )
        return default
    return ratio


def add_span_file(
    provider: TracerProvider, directory: Path, service: str, *, batch: bool = True
) -> SpanFileExporter:
    """Have `provider` also write its spans to `directory` (see SpanFileExporter)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    exporter = SpanFileExporter(directory, service)
    if batch:
        provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=SPAN_FILE_DELAY_MS)
        )
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if callable(shutdown):
        shutdown()


_tracer: tuple[trace.TracerProvider, trace.Tracer] | None = None


def tracer() -> trace.Tracer:
    """gfaas's tracer from the current provider, made once per provider: the SDK's
    `get_tracer` builds a new Tracer and its scope on every call (about 5% of
    ingress's CPU per invocation in a profile of the sync path)."""
    global _tracer
    provider = trace.get_tracer_provider()
    cached = _tracer
    if cached is None or cached[0] is not provider:
        cached = _tracer = (provider, provider.get_tracer(_TRACER_NAME))
    return cached[1]


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context (traceparent, tracestate) to outgoing headers."""
    propagate.inject(headers)
    return headers


@contextmanager
def handling_span(
    name: str,
    headers: Mapping[str, str] | None,
    *,
    kind: SpanKind = SpanKind.CONSUMER,
    invocation_id: str = "",
    attributes: Mapping[str, str | int | float | bool] | None = None,
    end_on_exit: bool = True,
) -> Iterator[Span]:
    """A span whose parent comes from the incoming headers (none: a new root, whatever
    is current), current inside the block, with the invocation id in the log context
    (`log_context`). With `end_on_exit` False the caller ends it (`span.end()`), later.

    Every service opens one per message it handles, most of them unsampled: written
    with the SDK's `start_as_current_span` and structlog's `bound_contextvars` it cost
    about 50 us a call here; this way, about 20 (benchmarks.md, "Spans and HTTP
    parsing cheaper")."""
    parent = extract(headers)
    span = tracer().start_span(name, context=parent, kind=kind, attributes=attributes)
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    log_token = _INVOCATION_ID.set(invocation_id) if invocation_id else None
    try:
        if invocation_id:
            span.set_attribute("gfaas.invocation_id", invocation_id)
        yield span
    except Exception as exc:  # as the SDK's use_span: BaseExceptions are not errors
        if span.is_recording():
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        if log_token is not None:
            _INVOCATION_ID.reset(log_token)
        otel_context.detach(token)
        if end_on_exit:
            span.end()


# The invocation a service is handling, for its log lines (see log_context).
_INVOCATION_ID: ContextVar[str] = ContextVar("gfaas_invocation_id", default="")


def log_context(
    logger: object, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: the handled invocation's id and the current trace id on
    every line, unless the line names its own. Read when a line is written, not bound
    per message: most messages log nothing."""
    invocation_id = _INVOCATION_ID.get()
    if invocation_id:
        event.setdefault("invocation_id", invocation_id)
    if "trace_id" not in event:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            event["trace_id"] = format(ctx.trace_id, "032x")
    return event


_TRACEPARENT = TraceContextTextMapPropagator._TRACEPARENT_HEADER_FORMAT_RE
_TRACEPARENT_MAX = TraceContextTextMapPropagator._TRACEPARENT_MAXIMUM_LENGTH
_default_textmap: tuple[object, bool] | None = None


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context in incoming headers (an empty context without one).

    With the default propagators (W3C trace context and baggage) and only a
    `traceparent` to read, parsed here as TraceContextTextMapPropagator parses it, in
    half its time: the composite propagator, its getter and the baggage propagator's
    look-ups were most of it. Anything else goes to `propagate.extract`."""
    if not headers:
        return otel_context.Context()
    if not _is_default_textmap() or "tracestate" in headers or "baggage" in headers:
        return propagate.extract(dict(headers))
    header = headers.get("traceparent")
    if not header:
        return otel_context.Context()
    if not isinstance(header, str) or len(header) > _TRACEPARENT_MAX:
        return propagate.extract(dict(headers))  # the SDK's checks and warning
    match = _TRACEPARENT.match(header)
    if match is None:
        return otel_context.Context()
    version, trace_id, span_id, flags, rest = match.groups()
    if trace_id == "0" * 32 or span_id == "0" * 16 or version == "ff" or (version == "00" and rest):
        return otel_context.Context()
    span_context = trace.SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(span_id, 16),
        is_remote=True,
        trace_flags=trace.TraceFlags(int(flags, 16)),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context), otel_context.Context())


def _is_default_textmap() -> bool:
    """Whether the global propagator is the SDK's default pair (OTEL_PROPAGATORS unset
    or "tracecontext,baggage"); worked out once per propagator object."""
    global _default_textmap
    textmap = propagate.get_global_textmap()
    cached = _default_textmap
    if cached is None or cached[0] is not textmap:
        kinds = [type(p) for p in getattr(textmap, "_propagators", ())]
        default = type(textmap) is CompositePropagator and kinds == [
            TraceContextTextMapPropagator,
            W3CBaggagePropagator,
        ]
        cached = _default_textmap = (textmap, default)
    return cached[1]


def has_parent(headers: Mapping[str, str] | None) -> bool:
    """Whether the incoming headers carry a (valid) trace context."""
    if not headers or "traceparent" not in headers:
        return False
    return trace.get_current_span(extract(headers)).get_span_context().is_valid


def nats_attributes(
    subject: str, operation: str = "process", *, tenant: str = ""
) -> dict[str, str | int | float | bool]:
    """OpenTelemetry's messaging attributes for a NATS message (and the tenant)."""
    attributes: dict[str, str | int | float | bool] = {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.operation": operation,
    }
    if tenant:
        attributes["gfaas.tenant"] = tenant
    return attributes


def mark_error(span: Span, code: str, reason: str) -> None:
    span.set_status(Status(StatusCode.ERROR, f"{code}: {reason}"))
    span.set_attribute("gfaas.error_code", code)


# -- span files: written when no collector is configured, read by `gfaas trace` ------------


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """One finished span as a span file's JSON line."""
    ctx = span.context
    parent = span.parent
    service = str(span.resource.attributes.get("service.name", "")) if span.resource else ""
    return {
        "trace_id": format(ctx.trace_id, "032x") if ctx else "",
        "span_id": format(ctx.span_id, "016x") if ctx else "",
        "parent_id": format(parent.span_id, "016x") if parent else "",
        "name": span.name,
        "service": service.removeprefix("gfaas-"),
        "kind": span.kind.name.lower(),
        "start_ns": span.start_time or 0,
        "end_ns": span.end_time or 0,
        "error": span.status.description or "error"
        if span.status.status_code is StatusCode.ERROR
        else "",
        "attributes": {k: _plain(v) for k, v in (span.attributes or {}).items()},
    }


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


_ENCODER = msgspec.json.Encoder(enc_hook=str)


class SpanFileExporter(SpanExporter):
    """Finished spans as JSON lines in `<directory>/<service>-<pid>.jsonl`; past
    `max_bytes` the file becomes `<service>-<pid>.1.jsonl` (the one before is dropped),
    so a process never keeps more than twice the cap on disk."""

    def __init__(
        self, directory: Path, service: str, *, max_bytes: int = SPAN_FILE_MAX_BYTES
    ) -> None:
        self.directory = directory
        self.path = directory / f"{service}-{os.getpid()}.jsonl"
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._closed = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._closed:
            return SpanExportResult.FAILURE
        # msgspec: a third of json.dumps's time, on a thread that holds the GIL the
        # service's loop wants.
        text = b"".join(_ENCODER.encode(span_record(s)) + b"\n" for s in spans)
        try:
            with self._lock:
                self.directory.mkdir(parents=True, exist_ok=True)
                if self.path.exists() and self.path.stat().st_size + len(text) > self.max_bytes:
                    self.path.replace(self.path.with_suffix(".1.jsonl"))
                with self.path.open("ab") as f:
                    f.write(text)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._closed = True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def read_spans(directory: Path) -> list[dict[str, Any]]:
    """Every span in the span files under `directory` (unreadable lines skipped)."""
    spans: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.jsonl")) if directory.is_dir() else []:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("span_id"):
                spans.append(record)
    return spans


def spans_of(spans: Iterable[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The spans of the trace(s) of invocation `key` (its gfaas.invocation_id, or a
    32-hex trace id), each span once."""
    spans = list(spans)
    traces = {
        s["trace_id"]
        for s in spans
        if s.get("trace_id") == key or (s.get("attributes") or {}).get("gfaas.invocation_id") == key
    }
    unique = {s["span_id"]: s for s in spans if s.get("trace_id") in traces}
    return sorted(unique.values(), key=lambda s: (s["start_ns"], s["span_id"]))


def _service_of(span: Mapping[str, Any]) -> str:
    service = str(span.get("service") or "")
    if not service or service.startswith("unknown_service"):
        service = str(span.get("name", "")).split(" ", 1)[0]
    return service


def trace_tree(spans: Sequence[Mapping[str, Any]]) -> list[str]:
    """The spans of one or more traces as an indented tree: offset from the trace's
    first span and duration in ms, service, name, and the error if any."""
    if not spans:
        return []
    ids = {s["span_id"] for s in spans}
    children: dict[str, list[Mapping[str, Any]]] = {}
    roots: list[Mapping[str, Any]] = []
    for s in sorted(spans, key=lambda s: (s["start_ns"], s["span_id"])):
        parent = s.get("parent_id") or ""
        if parent in ids:
            children.setdefault(parent, []).append(s)
        else:
            roots.append(s)
    lines = [f"{'start ms':>9} {'dur ms':>9}  span"]
    for root in roots:
        origin = root["start_ns"]
        if root.get("parent_id"):
            lines.append(f"trace {root['trace_id']} (parent {root['parent_id']} not recorded)")
        else:
            lines.append(f"trace {root['trace_id']}")
        stack: list[tuple[Mapping[str, Any], int]] = [(root, 0)]
        while stack:
            span, depth = stack.pop()
            offset = (span["start_ns"] - origin) / 1e6
            duration = (span["end_ns"] - span["start_ns"]) / 1e6
            error = f"  ERROR {span['error']}" if span.get("error") else ""
            lines.append(
                f"{offset:9.3f} {duration:9.3f}  {'  ' * depth}{_service_of(span)}: "
                f"{span['name']}{error}"
            )
            for child in reversed(children.get(span["span_id"], [])):
                stack.append((child, depth + 1))
    return lines

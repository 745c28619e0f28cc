"""OpenTelemetry: W3C trace context in NATS headers, one span per service hop.

The SDK is installed only when an exporter is asked for (OTEL_EXPORTER_OTLP_ENDPOINT
or GFAAS_TRACE_CONSOLE=1), so an untraced deployment pays for no-op spans only; the
trace context still propagates, because extracted parents pass through no-op spans.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

_TRACER_NAME = "gfaas"


def configure_tracing(service_name: str) -> None:
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return  # someone (a test, an embedding app) installed one already
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    console = os.environ.get("GFAAS_TRACE_CONSOLE", "") in {"1", "true"}
    if not endpoint and not console:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": f"gfaas-{service_name}"}))
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if console:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if callable(shutdown):
        shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer(_TRACER_NAME)


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
) -> Iterator[Span]:
    """A span whose parent comes from the incoming headers, with log context bound."""
    parent = propagate.extract(dict(headers or {}))
    token = otel_context.attach(parent)
    try:
        with tracer().start_as_current_span(name, kind=kind, attributes=attributes) as span:
            ctx = span.get_span_context()
            bound = {"invocation_id": invocation_id} if invocation_id else {}
            if ctx.is_valid:
                bound["trace_id"] = format(ctx.trace_id, "032x")
            with structlog.contextvars.bound_contextvars(**bound):
                if invocation_id:
                    span.set_attribute("gfaas.invocation_id", invocation_id)
                yield span
    finally:
        otel_context.detach(token)


def mark_error(span: Span, code: str, reason: str) -> None:
    span.set_status(Status(StatusCode.ERROR, f"{code}: {reason}"))
    span.set_attribute("gfaas.error_code", code)

"""The span every service opens per message (tracing.handling_span): its parent from
the incoming headers, read as OpenTelemetry's propagators read them; current inside;
errors recorded; the invocation in the log context."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from shared import tracing

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
REPO = Path(__file__).resolve().parent.parent

# What W3C trace context says of each, as TraceContextTextMapPropagator reads it.
HEADERS: dict[str, Mapping[str, str] | None] = {
    "none": None,
    "empty": {},
    "unrelated": {"Nats-Msg-Id": "x"},
    "sampled": {"traceparent": f"00-{TRACE}-{SPAN}-01"},
    "unsampled": {"traceparent": f"00-{TRACE}-{SPAN}-00"},
    "zero span id": {"traceparent": f"00-{TRACE}-{'0' * 16}-01"},
    "zero trace id": {"traceparent": f"00-{'0' * 32}-{SPAN}-01"},
    "version 00 with more": {"traceparent": f"00-{TRACE}-{SPAN}-01-more"},
    "later version with more": {"traceparent": f"01-{TRACE}-{SPAN}-01-more"},
    "version ff": {"traceparent": f"ff-{TRACE}-{SPAN}-01"},
    "upper case": {"traceparent": f"00-{TRACE.upper()}-{SPAN}-01"},
    "blanks around": {"traceparent": f" \t00-{TRACE}-{SPAN}-01 "},
    "too long": {"traceparent": f"01-{TRACE}-{SPAN}-01-" + "x" * 600},
    "garbage": {"traceparent": "not a trace"},
    "with tracestate": {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "k=v"},
    "with baggage": {"traceparent": f"00-{TRACE}-{SPAN}-01", "baggage": "user=7"},
}


def described(ctx: Context) -> tuple[object, ...]:
    span = trace.get_current_span(ctx).get_span_context()
    return (
        span.is_valid,
        span.trace_id,
        span.span_id,
        int(span.trace_flags),
        span.is_remote,
        span.trace_state.to_header(),
    )


@pytest.mark.parametrize("case", list(HEADERS))
def test_the_parent_is_read_as_opentelemetrys_propagators_read_it(case: str) -> None:
    headers = HEADERS[case]
    assert described(tracing.extract(headers)) == described(propagate.extract(dict(headers or {})))


def test_the_baggage_a_caller_sends_is_kept() -> None:
    from opentelemetry import baggage

    ctx = tracing.extract(HEADERS["with baggage"])
    assert baggage.get_baggage("user", ctx) == "7"


class _HeaderPropagator(TextMapPropagator):
    """A deployment's own propagator (OTEL_PROPAGATORS): its trace id in one header."""

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        value = getter.get(carrier, "x-trace")
        if not value:
            return context or Context()
        span = trace.NonRecordingSpan(
            trace.SpanContext(int(value[0], 16), int(SPAN, 16), is_remote=True)
        )
        return trace.set_span_in_context(span, context)

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        return None

    @property
    def fields(self) -> set[str]:
        return {"x-trace"}


@pytest.fixture
def own_propagator() -> Iterator[None]:
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([_HeaderPropagator()]))
    try:
        yield
    finally:
        propagate.set_global_textmap(previous)


def test_a_configured_propagator_is_honoured(own_propagator: None) -> None:
    ctx = tracing.extract({"x-trace": TRACE})
    assert trace.get_current_span(ctx).get_span_context().trace_id == int(TRACE, 16)
    # A traceparent means nothing to it.
    ctx = tracing.extract(HEADERS["sampled"])
    assert not trace.get_current_span(ctx).get_span_context().is_valid


def test_the_span_is_the_callers_child_and_current_inside(
    exporter: InMemorySpanExporter,
) -> None:
    exporter.clear()
    with tracing.handling_span("hop", HEADERS["sampled"], invocation_id="inv-1") as span:
        assert trace.get_current_span() is span
        with tracing.tracer().start_as_current_span("inner"):
            pass
    assert not trace.get_current_span().get_span_context().is_valid
    finished = {s.name: s for s in exporter.get_finished_spans()}
    hop = finished["hop"]
    assert hop.context is not None
    assert hop.parent is not None
    assert hop.context.trace_id == int(TRACE, 16)
    assert hop.parent.span_id == int(SPAN, 16)
    assert (hop.attributes or {})["gfaas.invocation_id"] == "inv-1"
    inner = finished["inner"]
    assert inner.parent is not None
    assert inner.parent.span_id == hop.context.span_id


def test_without_a_parent_the_span_is_a_root_whatever_is_current(
    exporter: InMemorySpanExporter,
) -> None:
    exporter.clear()
    with tracing.tracer().start_as_current_span("outer"), tracing.handling_span("hop", {}):
        pass
    hop = next(s for s in exporter.get_finished_spans() if s.name == "hop")
    assert hop.parent is None


def test_an_exception_marks_the_span_and_goes_on(exporter: InMemorySpanExporter) -> None:
    exporter.clear()
    with pytest.raises(ValueError, match="bad"), tracing.handling_span("hop", HEADERS["sampled"]):
        raise ValueError("bad")
    hop = next(s for s in exporter.get_finished_spans() if s.name == "hop")
    assert hop.status.status_code is StatusCode.ERROR
    assert hop.status.description == "ValueError: bad"
    assert [e.name for e in hop.events] == ["exception"]
    assert not trace.get_current_span().get_span_context().is_valid


def test_a_span_left_open_is_ended_by_its_owner(exporter: InMemorySpanExporter) -> None:
    exporter.clear()
    with tracing.handling_span("hop", HEADERS["sampled"], end_on_exit=False) as span:
        pass
    assert exporter.get_finished_spans() == ()
    span.end()
    assert [s.name for s in exporter.get_finished_spans()] == ["hop"]


def test_log_lines_name_the_invocation_and_trace(exporter: InMemorySpanExporter) -> None:
    assert tracing.log_context(None, "info", {}) == {}
    with tracing.handling_span("hop", HEADERS["sampled"], invocation_id="inv-2"):
        assert tracing.log_context(None, "info", {}) == {
            "invocation_id": "inv-2",
            "trace_id": TRACE,
        }
        # A line that names its own keeps them.
        line = tracing.log_context(None, "info", {"invocation_id": "other", "trace_id": "t"})
        assert line == {"invocation_id": "other", "trace_id": "t"}
        with tracing.handling_span("nested", HEADERS["unsampled"]):
            assert tracing.log_context(None, "info", {})["invocation_id"] == "inv-2"
    assert tracing.log_context(None, "info", {}) == {}


@pytest.mark.parametrize("text", ["abc", "-0.5", "1e999x", "nan"])
def test_a_bad_sample_ratio_is_a_warning_and_the_default_not_a_dead_service(
    text: str, tmp_path: Path
) -> None:
    # GFAAS_TRACE_SAMPLE is read where each service starts (run_service): a value
    # that is no ratio must not keep it from starting, nor sample something else.
    probe = (
        "from opentelemetry import trace\n"
        "from shared import tracing\n"
        "tracing.configure_tracing('ingress')\n"
        "print(trace.get_tracer_provider().sampler.get_description())\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        tracing.TRACE_DIR_ENV: str(tmp_path),
        tracing.TRACE_SAMPLE_ENV: text,
    }
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    env.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert f"TraceIdRatioBased{{{tracing.SPAN_FILE_SAMPLE}}}" in done.stdout, done.stdout
    assert tracing.TRACE_SAMPLE_ENV in done.stderr + done.stdout

"""One invocation is one trace: each service opens a span under the caller's context."""

from __future__ import annotations

import numpy as np
import pytest
from nats.aio.client import Client as NATS
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.schema import FunctionSpec
from tests.conftest import Platform
from tests.helpers import body, deploy_and_wait

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # The global provider can be set once per process; this module owns it.
    trace.set_tracer_provider(provider)
    return exporter


async def test_one_invocation_is_one_trace_across_services(
    exporter: InMemorySpanExporter, platform: Platform, nc: NATS
) -> None:
    await deploy_and_wait(nc, FunctionSpec(name="echo", handler="tests.funcs:echo"))
    exporter.clear()
    traceparent = f"00-{TRACE_ID}-{PARENT}-01"
    msg = await nc.request(
        "gfaas.v1.invoke.echo",
        body(x=np.ones(3, np.float32)),
        timeout=5,
        headers={"traceparent": traceparent, "Gfaas-Invocation-Id": "traced-1"},
    )
    assert msg.headers is not None
    assert msg.headers["Gfaas-Status"] == "ok"
    spans = {s.name: s for s in exporter.get_finished_spans() if s.context is not None}
    assert {"ingress invoke", "scheduler assign", "worker run"} <= set(spans)
    for span in spans.values():
        assert span.context is not None
        assert format(span.context.trace_id, "032x") == TRACE_ID
    ingress, scheduler, worker = (
        spans["ingress invoke"],
        spans["scheduler assign"],
        spans["worker run"],
    )
    assert ingress.parent is not None
    assert format(ingress.parent.span_id, "016x") == PARENT
    assert scheduler.parent is not None
    assert ingress.context is not None
    assert scheduler.parent.span_id == ingress.context.span_id
    assert worker.parent is not None
    assert scheduler.context is not None
    assert worker.parent.span_id == scheduler.context.span_id
    assert worker.attributes is not None
    assert worker.attributes["gfaas.invocation_id"] == "traced-1"

"""One invocation is one trace: each service opens a span under the caller's context."""

from __future__ import annotations

import anyio
import numpy as np
import pytest
from nats.aio.client import Client as NATS
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gfaas.client import Client
from shared.schema import DType, FunctionSpec, StageSpec, TensorSpec, WorkflowSpec
from tests.helpers import body, deploy_and_wait
from tests.platform import Platform

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


async def test_a_workflow_is_one_trace_with_a_span_per_stage(
    exporter: InMemorySpanExporter, platform: Platform, nc: NATS
) -> None:
    x = [TensorSpec(name="x", dtype=DType.FLOAT32, shape=[-1])]
    await deploy_and_wait(nc, FunctionSpec(name="add-one", handler="tests.funcs:add_one", inputs=x))
    client = Client(nc)
    await client.deploy(
        WorkflowSpec(
            name="twice",
            inputs=x,
            stages=[
                StageSpec(name="a", function="add-one", inputs={"x": "$in.x"}),
                StageSpec(name="b", function="add-one", inputs={"x": "a.y"}),
            ],
            outputs={"y": "b.y"},
        )
    )
    with anyio.fail_after(5):
        while "twice" not in (await client.status("ingress")).details["workflows"]:
            await anyio.sleep(0.02)
    exporter.clear()
    msg = await nc.request(
        "gfaas.v1.invoke.twice",
        body(x=np.ones(3, np.float32)),
        timeout=5,
        headers={"traceparent": f"00-{TRACE_ID}-{PARENT}-01"},
    )
    assert msg.headers is not None
    assert msg.headers["Gfaas-Status"] == "ok"
    spans = [s for s in exporter.get_finished_spans() if s.context is not None]
    assert {format(s.context.trace_id, "032x") for s in spans if s.context} == {TRACE_ID}
    names = [s.name for s in spans]
    assert names.count("ingress workflow") == 1
    assert names.count("worker run") == 2
    # The first stage goes through the scheduler; the second may go straight to the
    # worker under the grant the first one earned.
    assert 1 <= names.count("scheduler assign") <= 2
    (run,) = [s for s in spans if s.name == "ingress workflow"]
    assert run.context is not None
    assigns = {s.context.span_id for s in spans if s.name == "scheduler assign" and s.context}
    # Both stages hang under the workflow's span, directly or through the scheduler's.
    for s in spans:
        if s.name == "scheduler assign":
            assert s.parent is not None
            assert s.parent.span_id == run.context.span_id
        if s.name == "worker run":
            assert s.parent is not None
            assert s.parent.span_id in assigns | {run.context.span_id}

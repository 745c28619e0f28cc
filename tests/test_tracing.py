"""One invocation is one trace: each service opens a span under the caller's context."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import anyio
import numpy as np
import pytest
from nats.aio.client import Client as NATS
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gfaas.client import Client
from shared.schema import (
    DType,
    FunctionSpec,
    OutputMode,
    StageSpec,
    TensorSpec,
    WorkflowSpec,
)
from tests.helpers import body, deploy_and_wait
from tests.platform import Platform
from tests.specs import ECHO

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


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


def _trace_of(spans: Sequence[ReadableSpan], trace_id: int) -> list[ReadableSpan]:
    return [s for s in spans if s.context is not None and s.context.trace_id == trace_id]


async def test_the_callers_span_is_the_root_and_covers_the_reply(
    exporter: InMemorySpanExporter,
    platform: Platform,
    nc: NATS,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await deploy_and_wait(nc, ECHO)
    client = Client(nc, tenant="acme")
    # The reply's arrival, as the client's connection hands it over.
    arrivals: list[int] = []
    request = nc.request

    async def timed(subject: str, *args: Any, **kwargs: Any) -> Any:
        msg = await request(subject, *args, **kwargs)
        if subject.startswith("gfaas.v1.invoke."):
            arrivals.append(time.time_ns())
        return msg

    monkeypatch.setattr(nc, "request", timed)
    await client.invoke("echo", {"x": np.ones(3, np.float32)})  # warm: model, grants
    exporter.clear()
    arrivals.clear()
    # Over the bus limit: the input goes by handle, so the broker is in the trace (the
    # client's lease and release, the worker's check, its output buffer and transfer).
    x = np.arange(300_000, dtype=np.float32)
    out = await client.invoke("echo", {"x": x}, outputs_by=OutputMode.HANDLE)
    assert np.array_equal(out["y"], x)
    finished = exporter.get_finished_spans()
    (root,) = [s for s in finished if s.name == "client invoke echo"]
    assert root.context is not None
    assert root.parent is None
    spans = _trace_of(finished, root.context.trace_id)
    assert [s for s in spans if s.parent is None] == [root]
    assert root.start_time is not None
    assert root.end_time is not None
    (arrived,) = arrivals
    assert root.end_time >= arrived
    for span in spans:
        assert span.start_time is not None
        assert span.end_time is not None
        assert root.start_time <= span.start_time, span.name
        assert span.end_time <= root.end_time, span.name
    # One tree: every span's parent is in it.
    ids = {s.context.span_id for s in spans if s.context}
    assert all(s.parent.span_id in ids for s in spans if s.parent is not None)
    names = [s.name for s in spans]
    assert {"ingress invoke", "worker run"} <= set(names)
    broker = [s for s in spans if s.name.startswith("broker ")]
    assert {"broker lease", "broker release", "broker transfer"} <= {s.name for s in broker}
    by_id = {s.context.span_id: s for s in spans if s.context}

    def ancestors(span: ReadableSpan) -> list[str]:
        found = []
        while span.parent is not None:
            span = by_id[span.parent.span_id]
            found.append(span.name)
        return found

    # The worker's own broker operations hang under its run.
    assert any("worker run" in ancestors(s) for s in broker)
    (ingress,) = [s for s in spans if s.name == "ingress invoke"]
    attributes = dict(ingress.attributes or {})
    assert attributes["messaging.system"] == "nats"
    assert attributes["messaging.destination.name"] == "gfaas.v1.invoke.echo"
    assert attributes["messaging.operation"] == "process"
    assert attributes["gfaas.tenant"] == "acme"
    assert dict(root.attributes or {})["gfaas.tenant"] == "acme"
    lease = next(s for s in broker if s.name == "broker lease")
    assert str(dict(lease.attributes or {})["messaging.destination.name"]).startswith(
        "gfaas.v1.broker."
    )


async def test_without_a_callers_context_ingress_is_the_root_until_the_done_note(
    exporter: InMemorySpanExporter, platform: Platform, nc: NATS
) -> None:
    await deploy_and_wait(nc, ECHO)
    exporter.clear()
    msg = await nc.request(
        "gfaas.v1.invoke.echo",
        body(x=np.ones(3, np.float32)),
        timeout=5,
        headers={"Gfaas-Invocation-Id": "untraced-1"},
    )
    assert msg.headers is not None
    assert msg.headers["Gfaas-Status"] == "ok"
    with anyio.fail_after(5):  # ingress ends its span when the done note comes
        while not [s for s in exporter.get_finished_spans() if s.name == "ingress invoke"]:
            await anyio.sleep(0.01)
    finished = exporter.get_finished_spans()
    (ingress,) = [s for s in finished if s.name == "ingress invoke"]
    assert ingress.parent is None
    assert ingress.context is not None
    spans = _trace_of(finished, ingress.context.trace_id)
    (worker,) = [s for s in spans if s.name == "worker run"]
    assert ingress.start_time is not None
    assert ingress.end_time is not None
    assert worker.end_time is not None
    assert worker.end_time <= ingress.end_time
    for span in spans:
        assert span.start_time is not None
        assert span.end_time is not None
        assert ingress.start_time <= span.start_time
        assert span.end_time <= ingress.end_time


async def test_the_scale_from_zero_span_lasts_until_the_new_instance_takes_the_call(
    exporter: InMemorySpanExporter, platform: Platform, nc: NATS
) -> None:
    from tests.test_instances import wait_instances

    spec = FunctionSpec(name="echo-cold", handler="tests.funcs:echo", max_instances=1, idle_s=30)
    await deploy_and_wait(nc, spec)
    exporter.clear()
    reply = await Client(nc).invoke_reply("echo-cold", {"x": np.ones(2, np.float32)}, timeout=30)
    assert reply.error is None, reply.error
    (instance,) = await wait_instances(nc, "echo-cold", 1)
    (cold,) = [s for s in exporter.get_finished_spans() if s.name == "scheduler scale from zero"]
    assert cold.attributes is not None
    assert cold.attributes["gfaas.worker"] == reply.worker == instance.instance_id
    assert cold.start_time is not None
    assert cold.end_time is not None
    # It covers the instance's start (command to first heartbeat), not only the command.
    assert (cold.end_time - cold.start_time) / 1e9 > instance.ready_s / 2 > 0
    # And the scheduler's histogram of scale-from-zero latency counted it.
    from tests.test_metrics import ports, scrape, value

    scheduler = await scrape((await ports(Client(nc)))["scheduler"])
    name = "gfaas_scale_from_zero_duration_seconds"
    assert value(scheduler, f"{name}_count", function="echo-cold") == 1
    assert value(scheduler, f"{name}_sum", function="echo-cold") > instance.ready_s / 2

"""`gfaas trace`: spans written to local span files (no collector), read back as a tree."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from nats.aio.client import Client as NATS
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from gfaas import cli
from gfaas.client import Client
from shared import tracing
from tests.helpers import deploy_and_wait
from tests.platform import Platform
from tests.specs import ECHO


def _provider() -> TracerProvider:
    """The process's SDK provider (set once per process: shared with test_tracing)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    return provider


def test_span_files_are_json_lines_rotated_at_their_cap(tmp_path: Path) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "gfaas-ingress"}))
    exporter = tracing.SpanFileExporter(tmp_path, "ingress", max_bytes=4096)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    with (
        tracer.start_as_current_span("ingress invoke", attributes={"gfaas.invocation_id": "a"}),
        tracer.start_as_current_span("worker run") as child,
    ):
        child.set_status(trace.Status(trace.StatusCode.ERROR, "handler_error: boom"))
    (path,) = tmp_path.glob("*.jsonl")
    assert path.name.startswith("ingress-")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["name"] for r in records] == ["worker run", "ingress invoke"]
    assert records[1]["service"] == "ingress"
    assert records[0]["parent_id"] == records[1]["span_id"]
    assert records[0]["error"] == "handler_error: boom"
    for _ in range(100):
        with tracer.start_as_current_span("filler"):
            pass
    files = sorted(p.name for p in tmp_path.glob("*.jsonl"))
    assert len(files) == 2  # the current file and the one before: at most twice the cap
    assert all(p.stat().st_size <= 4096 for p in tmp_path.glob("*.jsonl"))
    exporter.shutdown()


def test_the_tree_nests_children_under_parents_with_offsets() -> None:
    def span(sid: str, parent: str, name: str, start: int, end: int) -> dict[str, object]:
        return {
            "trace_id": "t" * 32,
            "span_id": sid,
            "parent_id": parent,
            "name": name,
            "service": name.split()[0],
            "start_ns": start,
            "end_ns": end,
            "error": "",
            "attributes": {"gfaas.invocation_id": "inv"} if sid == "b" else {},
        }

    spans = [
        span("a", "", "client invoke echo", 1_000_000, 9_000_000),
        span("b", "a", "ingress invoke", 2_000_000, 3_000_000),
        span("c", "b", "worker run", 4_000_000, 8_000_000),
        span("x", "", "other", 0, 1),
    ]
    spans[3]["trace_id"] = "u" * 32
    found = tracing.spans_of(spans, "inv")
    assert [s["span_id"] for s in found] == ["a", "b", "c"]
    lines = tracing.trace_tree(found)
    assert lines[1] == f"trace {'t' * 32}"
    assert lines[2].split() == ["0.000", "8.000", "client:", "client", "invoke", "echo"]
    assert lines[3].endswith("    ingress: ingress invoke")
    assert lines[3].split()[:2] == ["1.000", "1.000"]
    assert lines[4].endswith("      worker: worker run")


@pytest.fixture
def span_dir(platform: Platform) -> Iterator[Path]:
    """What `gfaas up` sets up without a collector: spans in <state_dir>/traces."""
    directory = tracing.trace_dir(platform.state_dir)
    exporter = tracing.add_span_file(_provider(), directory, "test", batch=False)
    yield directory
    exporter.shutdown()


@pytest.mark.nats
@pytest.mark.anyio
async def test_gfaas_trace_prints_an_invocations_tree(
    span_dir: Path,
    platform: Platform,
    nc: NATS,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await deploy_and_wait(nc, ECHO)
    client = Client(nc)
    reply = await client.invoke_reply(
        "echo", {"x": np.ones(3, np.float32)}, invocation_id="trace-cli-1"
    )
    assert reply.error is None
    capsys.readouterr()
    code = cli.main(["trace", "trace-cli-1", "--state-dir", str(platform.state_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["start", "ms", "dur", "ms", "span"]
    assert lines[1].startswith("trace ")

    def depth(name: str) -> int:
        """The indentation of the span's name: past the two 9-wide columns."""
        (line,) = [line for line in lines if line.endswith(name)]
        tree = line[21:]
        return len(tree) - len(tree.lstrip())

    root, ingress, scheduler, worker = (
        depth("client invoke echo"),
        depth("ingress invoke"),
        depth("scheduler assign"),
        depth("worker run"),
    )
    assert root < ingress < scheduler < worker
    # Offsets and durations are milliseconds from the root's start.
    (root_line,) = [line for line in lines if line.endswith("client invoke echo")]
    offset, duration = (float(v) for v in root_line.split()[:2])
    assert offset == 0.0
    assert duration > 0.0


def test_gfaas_trace_says_when_it_finds_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["trace", "nope", "--dir", str(tmp_path), "--wait", "0"])
    assert code == 1
    assert "no spans of nope" in capsys.readouterr().err

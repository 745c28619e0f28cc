"""Ingress's records of calls sent on the NATS path (the worker answers the caller):
each caller's call is its own, though callers may reuse an invocation id."""

from __future__ import annotations

from typing import Any, cast

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.ingress.handlers import Ingress
from shared.metrics import OK, IngressMetrics
from shared.schema import H_INVOCATION, FunctionSpec, InvocationMeta, InvokeRequest, encode

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

SPEC = FunctionSpec(name="f", handler="tests.funcs:echo")


class Bus:
    async def reply_error(self, *args: object) -> None:
        raise AssertionError(f"nothing is refused here: {args}")


class Dispatcher:
    bus = Bus()

    async def send(self, meta: InvocationMeta, body: bytes, reply: str) -> str | None:
        return "w1"


class Functions:
    specs = {SPEC.name: SPEC}

    def get(self, name: str) -> FunctionSpec | None:
        return self.specs.get(name)


class Workflows:
    def get(self, name: str) -> None:
        return None


class Recorded:
    def __init__(self) -> None:
        self.outcomes: list[tuple[str, str, str]] = []

    def finished(
        self, function: str, tenant: str, outcome: str, seconds: float | None, **_: Any
    ) -> None:
        self.outcomes.append((function, tenant, outcome))


def ingress() -> tuple[Ingress, Recorded]:
    front = Ingress(
        cast(Any, Dispatcher()),
        cast(Any, Functions()),
        cast(Any, Workflows()),
        cast(Any, None),
        cast(Any, None),
        holder="ingress-t",
        max_payload=1 << 20,
        workflow_concurrency=1,
        send_reply=cast(Any, None),
        connected=lambda: True,
    )
    recorded = Recorded()
    front.metrics = cast(IngressMetrics, recorded)
    return front, recorded


async def test_two_calls_under_one_id_each_end_with_their_own_done_note(
    exporter: InMemorySpanExporter,
) -> None:
    """Two callers' calls in flight under one id (a correlation id, a retry): each is
    counted once with its own outcome and its root span ended once, by the done note
    that names its reply subject; a done note of ingress's own call under the id (an
    inbox of ours, recorded elsewhere) ends neither. Keyed by id alone, the second
    call's record replaced the first's: one outcome was lost, the other taken by
    whichever note came first."""
    front, recorded = ingress()
    exporter.clear()
    body = encode(InvokeRequest())
    headers = {H_INVOCATION: "corr-1"}
    await front.invoke("f", body, headers, "_INBOX.first")
    await front.invoke("f", body, headers, "_INBOX.second")
    assert len(front.open) == 2

    front.heard_done("corr-1", "handler_error", "_INBOX.ours")  # not one of these two
    assert recorded.outcomes == []
    front.heard_done("corr-1", "handler_error", "_INBOX.second")
    assert recorded.outcomes == [("f", "default", "handler_error")]
    front.heard_done("corr-1", OK, "_INBOX.first")
    assert recorded.outcomes == [("f", "default", "handler_error"), ("f", "default", OK)]
    front.heard_done("corr-1", OK, "_INBOX.first")  # a repeat ends nothing more
    assert len(recorded.outcomes) == 2
    assert len(front.open) == 0

    spans = [s for s in exporter.get_finished_spans() if s.name == "ingress invoke"]
    assert len(spans) == 2
    assert sorted(str((s.attributes or {}).get("gfaas.error_code", OK)) for s in spans) == sorted(
        [OK, "handler_error"]
    )
    front.expire_open(float("inf"))  # nothing was left open to count twice
    assert len(recorded.outcomes) == 2
    assert len([s for s in exporter.get_finished_spans() if s.name == "ingress invoke"]) == 2


async def test_calls_whose_done_note_never_came_expire_each_once() -> None:
    front, recorded = ingress()
    body = encode(InvokeRequest())
    headers = {H_INVOCATION: "corr-2"}
    for reply in ("_INBOX.a", "_INBOX.b", "_INBOX.c"):
        await front.invoke("f", body, headers, reply)
    front.heard_done("corr-2", OK, "_INBOX.b")
    front.expire_open(float("inf"))
    assert sorted(o for _, _, o in recorded.outcomes) == [OK, "unknown", "unknown"]
    assert len(front.open) == 0
    # The id is free again: its next call is recorded under it, and ended by its note.
    await front.invoke("f", body, headers, "_INBOX.d")
    front.heard_done("corr-2", OK, "_INBOX.d")
    assert len(recorded.outcomes) == 4
    assert len(front.open) == 0

"""Every request subject answers every class of malformed message, within 2 s, and
every event subscriber survives malformed events.

`pytest tests/test_malformed.py -s` prints the table docs/reliability.md records.
"""

from __future__ import annotations

from collections import Counter

import anyio
import msgspec
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from gfaas.client import Client
from tests.helpers import body, deploy_and_wait, request
from tests.platform import Platform
from tests.specs import ECHO

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

GOOD = {"Gfaas-Invocation-Id": "m1", "Gfaas-Function": "echo"}

BODIES: dict[str, bytes] = {
    "empty body": b"",
    "not msgpack": b"\xc1\xc1\xc1",
    "msgpack of the wrong type": msgspec.msgpack.encode([1, 2, 3]),
    "unknown fields": msgspec.msgpack.encode({"nope": 1}),
    "wrong field types": msgspec.msgpack.encode({"inputs": "x", "sizes": "y", "handles": 3}),
    "a huge list": msgspec.msgpack.encode({"sizes": [1] * 20_000, "owner": "x"}),
}
HEADERS: dict[str, dict[str, str] | None] = {
    "no headers": None,
    "bad deadline": {**GOOD, "Gfaas-Deadline-Ms": "soon"},
    "bad invocation id": {**GOOD, "Gfaas-Invocation-Id": "has spaces"},
    "bad tenant": {**GOOD, "Gfaas-Tenant": "a.b"},
    "bad function": {**GOOD, "Gfaas-Function": "NOT A NAME"},
    "bad claim": {**GOOD, "Gfaas-Claim": "first"},
}
SUBJECTS = [
    "gfaas.v1.invoke.echo",
    "gfaas.v1.schedule",
    "gfaas.v1.worker.w0.run",
    "gfaas.v1.result.m1",
    *(
        f"gfaas.v1.broker.local.{op}"
        for op in (
            "lease",
            "check",
            "retain",
            "release",
            "transfer",
            "park",
            "unpark",
            "copy",
            "read",
            "nosuchop",
        )
    ),
]
EVENTS = [
    "gfaas.v1.heartbeat.w9",
    "gfaas.v1.done.scheduler.x",
    "gfaas.v1.grant_return",
    "gfaas.v1.worker_lost",
    "gfaas.v1.scheduler_alive",
]


async def answer(nc: NATS, subject: str, data: bytes, headers: dict[str, str] | None) -> str:
    try:
        msg = await nc.request(subject, data, timeout=2, headers=headers)
    except Exception as exc:
        return f"NO ANSWER ({type(exc).__name__})"
    try:
        decoded = msgspec.msgpack.decode(msg.data)
    except msgspec.DecodeError:
        return "undecodable answer"
    error = decoded.get("error") if isinstance(decoded, dict) else None
    return str(error["code"]) if error else "ok"


async def test_every_request_subject_answers_malformed_messages(
    platform: Platform, nc: NATS
) -> None:
    await deploy_and_wait(nc, ECHO)
    table: dict[str, Counter[str]] = {}
    for subject in SUBJECTS:
        seen: Counter[str] = Counter()
        for data in BODIES.values():
            seen[await answer(nc, subject, data, GOOD)] += 1
        for headers in HEADERS.values():
            seen[await answer(nc, subject, body(x=np.ones(1, np.float32)), headers)] += 1
        table[subject] = seen
    print("\n| subject | answers to 12 malformed messages |\n|---|---|")
    for subject, seen in table.items():
        print(f"| `{subject}` | {', '.join(f'{k} x{v}' for k, v in sorted(seen.items()))} |")
    unanswered = {s: c for s, c in table.items() if any(k.startswith("NO ANSWER") for k in c)}
    assert not unanswered, unanswered


async def test_malformed_events_leave_every_service_working(platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, ECHO)
    for subject in EVENTS:
        for data in BODIES.values():
            await nc.publish(subject, data)
    await nc.flush()
    await anyio.sleep(0.3)
    _, reply = await request(nc, "echo", body(x=np.ones(2, np.float32)))
    assert "error" not in reply, reply
    for service in ("ingress", "scheduler", "gpu-worker", "memory-broker"):
        await Client(nc).status(service)

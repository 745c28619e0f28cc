"""The async path: a JetStream work queue, deduplicated by id, results stored and fetched."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import anyio
import msgspec
import numpy as np
import pytest
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from gfaas.client import Client, outputs_of
from services.ingress import tenant_async
from shared import jetstream
from shared.bus import header_bytes
from shared.config import effective_max_payload
from shared.natsd import NatsServer
from shared.results import MAX_ASYNC_S
from shared.schema import (
    H_DEADLINE,
    H_INVOCATION,
    H_MSG_ID,
    FunctionSpec,
    InvokeReply,
    now_millis,
)
from tests.helpers import body, deploy_and_wait, final_result, request, tensor
from tests.platform import Platform, settings_for
from tests.specs import ADD_ONE

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

BOOM = FunctionSpec(name="boom", handler="tests.funcs:boom")


async def test_plain_jetstream_publish_runs_and_stores_the_result(
    platform: Platform, nc: NATS
) -> None:
    await deploy_and_wait(nc, ADD_ONE)
    js = nc.jetstream()
    ack = await js.publish(
        "gfaas.v1.invoke_async.add-one",
        body(x=np.array([41.0])),
        headers={"Nats-Msg-Id": "job-1"},
    )
    assert ack.stream == "GFAAS_INVOCATIONS"
    reply = await final_result(Client(nc), "job-1")
    assert outputs_of(reply)["y"].tolist() == [42.0]
    # Plain request on the result subject works for any client too.
    msg = await nc.request("gfaas.v1.result.job-1", b"", timeout=5)
    assert msgspec.msgpack.decode(msg.data)["invocation_id"] == "job-1"


async def test_duplicate_publish_is_deduplicated_by_invocation_id(
    platform: Platform, nc: NATS
) -> None:
    await deploy_and_wait(nc, ADD_ONE)
    js = nc.jetstream()
    first = await js.publish(
        "gfaas.v1.invoke_async.add-one", body(x=np.array([1.0])), headers={"Nats-Msg-Id": "dup"}
    )
    second = await js.publish(
        "gfaas.v1.invoke_async.add-one", body(x=np.array([1.0])), headers={"Nats-Msg-Id": "dup"}
    )
    assert not first.duplicate
    assert second.duplicate
    await final_result(Client(nc), "dup")


async def test_callback_subject_receives_the_reply(platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, ADD_ONE)
    sub = await nc.subscribe("my.callbacks")
    client = Client(nc)
    invocation_id = await client.invoke_async(
        "add-one", {"x": np.array([2.0])}, callback="my.callbacks"
    )
    msg = await sub.next_msg(timeout=10)
    reply = msgspec.msgpack.decode(msg.data, type=InvokeReply)
    assert reply.invocation_id == invocation_id
    assert outputs_of(reply)["y"].tolist() == [3.0]


async def test_failed_async_invocation_stores_the_error(platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, BOOM)
    client = Client(nc)
    invocation_id = await client.invoke_async("boom", {"x": np.array([2.0])})
    reply = await final_result(client, invocation_id)
    assert reply.error is not None
    assert reply.error.code == "handler_error"
    unknown = await client.invoke_async("nope", {"x": np.array([2.0])})
    reply = await final_result(client, unknown)
    assert reply.error is not None
    assert reply.error.code == "unknown_function"


async def test_result_of_an_unknown_id_is_not_found(platform: Platform, nc: NATS) -> None:
    reply = await Client(nc).result("never-submitted")
    assert reply.error is not None
    assert reply.error.code == "not_found"


async def test_a_malformed_request_s_error_reaches_its_callback(
    platform: Platform, nc: NATS
) -> None:
    """Its error is stored as the result, and the callback the caller asked for is
    told it as it is told any other result; it heard nothing, and waited for good."""
    sub = await nc.subscribe("my.malformed-callbacks")
    await nc.jetstream().publish(
        "gfaas.v1.invoke_async.add-one",
        b"\xc1garbage",
        headers={"Nats-Msg-Id": "garbled-cb", "Gfaas-Callback": "my.malformed-callbacks"},
    )
    msg = await sub.next_msg(timeout=10)
    reply = msgspec.msgpack.decode(msg.data, type=InvokeReply)
    assert reply.invocation_id == "garbled-cb"
    assert reply.error is not None
    assert reply.error.code == "bad_request"
    assert reply == await final_result(Client(nc), "garbled-cb")


HOURS_2_MS = 2 * 3600 * 1000


def timed_body(timeout_ms: int) -> bytes:
    return msgspec.msgpack.encode(
        {"inputs": [tensor("x", np.array([1.0]))], "timeout_ms": timeout_ms}
    )


async def test_an_async_deadline_past_the_results_ttl_is_refused_not_outlived(
    platform: Platform, nc: NATS
) -> None:
    """The results store keeps a record an hour from its last write: an attempt
    whose deadline was further off outlived its record (looked up not_found while it
    ran; a redelivery ran it again). Such an invocation is now refused, its result
    the bad request that says why; sync calls keep their deadlines, and an async one
    within the limit runs."""
    long_echo = FunctionSpec(name="long-echo", handler="tests.funcs:echo", timeout_ms=HOURS_2_MS)
    await deploy_and_wait(nc, long_echo)
    client = Client(nc)
    js = nc.jetstream()
    await js.publish(
        "gfaas.v1.invoke_async.long-echo", timed_body(HOURS_2_MS), headers={H_MSG_ID: "too-long"}
    )
    await js.publish(
        "gfaas.v1.invoke_async.long-echo", timed_body(60_000), headers={H_MSG_ID: "in-time"}
    )
    by_spec = await client.invoke_async("long-echo", {"x": np.array([1.0])})
    for invocation_id in ("too-long", by_spec):
        reply = await final_result(client, invocation_id)
        assert reply.error is not None, invocation_id
        assert reply.error.code == "bad_request", reply.error
        assert f"at most {MAX_ASYNC_S:.0f} s off" in reply.error.reason, reply.error
    assert (await final_result(client, "in-time")).error is None
    _, sync = await request(nc, "long-echo", body(x=np.array([1.0])))
    assert "error" not in sync, sync


async def test_a_tenant_asking_for_too_long_an_async_deadline_is_told_at_submit() -> None:
    published: list[str] = []

    class Stream:
        async def publish(self, subject: str, payload: bytes, headers: object = None) -> None:
            published.append(subject)

    js = cast(JetStreamContext, Stream())
    far = str(now_millis() + HOURS_2_MS)
    for data, headers in (
        (timed_body(HOURS_2_MS), {}),
        (timed_body(0), {H_DEADLINE: far}),
        (timed_body(1000), {H_DEADLINE: far}),  # the header is the deadline, as admitted
    ):
        reply = await tenant_async.submit(js, "acme", "echo", data, headers, max_payload=1 << 20)
        assert reply.error is not None
        assert reply.error.code == "bad_request", reply.error
        assert "deadline may be at most" in reply.error.reason
    assert published == []
    queued = await tenant_async.submit(
        js, "acme", "echo", timed_body(60_000), {}, max_payload=1 << 20
    )
    assert queued.error is not None
    assert queued.error.code == "pending"
    assert published == ["gfaas.v1.invoke_async.echo"]


async def test_an_async_invocation_refused_at_admission_keeps_its_id(
    platform: Platform, nc: NATS
) -> None:
    """A function not deployed is refused before the call has an id: its stored
    result, and what its callback heard, said invocation_id "", so the callback could
    not tell whose error it was."""
    sub = await nc.subscribe("my.refused-callbacks")
    client = Client(nc)
    invocation_id = await client.invoke_async(
        "not-deployed", {"x": np.array([2.0])}, callback="my.refused-callbacks"
    )
    stored = await final_result(client, invocation_id)
    told = msgspec.msgpack.decode((await sub.next_msg(timeout=10)).data, type=InvokeReply)
    for reply in (stored, told):
        assert reply.error is not None
        assert reply.error.code == "unknown_function"
        assert reply.invocation_id == invocation_id


async def test_a_tenants_submit_too_large_to_queue_is_refused_not_published(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    """A tenant's body just under the server's limit, with the headers ingress adds
    to queue it, was a publish past max_payload: the server closed ingress's
    connection (and the tenant, told `unavailable`, tried again)."""
    js = nc.jetstream()
    await jetstream.ensure_invocations_stream(js)
    limit = effective_max_payload(settings_for(nats_server.url, tmp_path), nc.max_payload)
    # As the tenant sent it, it fits: the server let it through to ingress.
    sent = {H_INVOCATION: "a" * 40}
    near_server_max = body(x=np.zeros((nc.max_payload - 150) // 8))
    assert limit < len(near_server_max)
    assert len(near_server_max) + header_bytes(sent) <= nc.max_payload
    reply = await tenant_async.submit(js, "acme", "echo", near_server_max, sent, max_payload=limit)
    assert reply.error is not None
    assert reply.error.code == "payload_too_large", reply.error
    huge_headers = {f"X-Pad-{i}": "p" * 1000 for i in range(20)}
    reply = await tenant_async.submit(
        js, "acme", "echo", body(x=np.zeros(1)), huge_headers, max_payload=limit
    )
    assert reply.error is not None
    assert reply.error.code == "bad_request", reply.error
    await anyio.sleep(0.2)
    assert nc.is_connected
    assert (await js.stream_info(jetstream.INVOCATIONS_STREAM)).state.messages == 0

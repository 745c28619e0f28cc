"""The async path: a JetStream work queue, deduplicated by id, results stored and fetched."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from gfaas.client import Client, outputs_of
from shared.schema import FunctionSpec, InvokeReply
from tests.helpers import body, deploy_and_wait, final_result
from tests.platform import Platform
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

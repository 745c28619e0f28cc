"""A worker's run against its invocation's deadline, sent to the worker directly as
the scheduler sends it."""

from __future__ import annotations

import numpy as np
import pytest
from nats.aio.client import Client as NATS

from shared import subjects
from shared.schema import (
    Done,
    ErrorCode,
    FunctionSpec,
    InvocationMeta,
    InvokeReply,
    InvokeRequest,
    decode,
    encode,
    now_millis,
)
from shared.tensors import from_mapping
from tests.helpers import deploy_and_wait
from tests.platform import Platform

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

SLEEP = FunctionSpec(name="sleep-late", handler="tests.funcs:sleep")


async def test_a_handler_that_returns_after_the_deadline_is_answered_deadline_exceeded(
    platform: Platform, nc: NATS
) -> None:
    """The handler runs in a thread, which the deadline cannot cancel: it returns
    late. Before, that late result was answered as a success (and its done note said
    ok); the caller now hears deadline_exceeded, and the result is dropped."""
    await deploy_and_wait(nc, SLEEP, handler_check=False)
    dones = await nc.subscribe(subjects.done_scheduled(""))
    meta = InvocationMeta(
        invocation_id="late-1", function=SLEEP.name, deadline_ms=now_millis() + 300
    )
    body = encode(InvokeRequest(inputs=from_mapping({"seconds": np.array(0.8)})))
    msg = await nc.request(subjects.worker_run("w0"), body, timeout=10, headers=meta.to_headers())
    reply = decode(msg.data, InvokeReply)
    assert reply.error is not None, reply
    assert reply.error.code is ErrorCode.DEADLINE_EXCEEDED, reply.error
    assert reply.outputs == []
    done = decode((await dones.next_msg(timeout=5)).data, Done)
    assert done.invocation_id == "late-1"
    assert not done.ok
    # It ran for its 0.8 s all the same: the scheduler learns that from the note.
    assert done.exec_ms >= 700.0, done

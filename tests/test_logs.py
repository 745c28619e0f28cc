"""Failed invocations are logged once, with the handler's traceback, and `gfaas logs`
shows them from the bus (stream GFAAS_LOGS), filtered by function."""

from __future__ import annotations

import anyio
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from gfaas import cli
from shared.schema import FunctionSpec
from tests.helpers import body, deploy_and_wait, request
from tests.platform import Platform
from tests.specs import ECHO

pytestmark = [pytest.mark.nats, pytest.mark.anyio]


BOOM = FunctionSpec(name="boom", handler="tests.funcs:boom")
BAD_SHAPE = FunctionSpec(name="bad-shape", handler="tests.funcs:not_a_mapping")


async def logs_of(url: str, function: str | None, *, until: str) -> str:
    """`gfaas logs [FUNCTION]`'s output, once it shows `until` (records reach the
    stream just after the reply)."""
    with anyio.fail_after(10):
        while True:
            printed: list[str] = []
            assert await cli._logs(url, function, False, 50, emit=printed.append) == 0
            out = "\n".join(printed)
            if until in out:
                return out
            await anyio.sleep(0.05)


async def test_handler_failure_is_logged_with_its_traceback(platform: Platform, nc: NATS) -> None:
    await deploy_and_wait(nc, ECHO, BOOM, BAD_SHAPE)
    x = np.ones((1, 3), dtype=np.float32)
    _, ok = await request(nc, "echo", body(x=x))
    assert "error" not in ok
    _, failed = await request(nc, "boom", body(x=x))
    assert failed["error"]["code"] == "handler_error"
    _, other = await request(nc, "bad-shape", body(x=x))
    assert other["error"]["code"] == "handler_error"

    out = await logs_of(platform.url, "boom", until=failed["invocation_id"])
    assert "handler_error" in out
    # The handler's own traceback: its file, its line, the exception.
    assert "Traceback (most recent call last)" in out
    assert "tests/funcs.py" in out
    assert "ValueError: the handler failed on purpose" in out
    assert "tenant=default" in out
    # Filtered: the other function's failure is not shown, nor any success.
    assert other["invocation_id"] not in out
    assert "bad-shape" not in out
    assert ok["invocation_id"] not in out
    assert out.count(failed["invocation_id"]) == 1

    everything = await logs_of(platform.url, None, until=other["invocation_id"])
    assert failed["invocation_id"] in everything


async def test_failure_decided_at_ingress_is_logged_there(platform: Platform, nc: NATS) -> None:
    msg = await nc.request(
        "gfaas.v1.invoke.ghost",
        body(x=np.ones(3, dtype=np.float32)),
        timeout=5,
        headers={"Gfaas-Invocation-Id": "ghost-call-1"},
    )
    assert msg.headers is not None
    assert msg.headers.get("Gfaas-Status") != "ok"
    out = await logs_of(platform.url, "ghost", until="ghost-call-1")
    assert "unknown_function" in out
    assert "by=ingress" in out


async def test_no_failures_prints_nothing(platform: Platform) -> None:
    printed: list[str] = []
    assert await cli._logs(platform.url, "nothing-failed", False, 50, emit=printed.append) == 0
    assert printed == []


async def test_last_zero_prints_no_stored_failure(platform: Platform, nc: NATS) -> None:
    # `gfaas logs -n 0` (with -f: only the failures from now on, as `tail -n 0 -f`)
    # printed the newest stored one all the same; -n 1 prints just that one.
    await deploy_and_wait(nc, BOOM)
    x = np.ones((1, 3), dtype=np.float32)
    ids = [(await request(nc, "boom", body(x=x)))[1]["invocation_id"] for _ in range(2)]
    await logs_of(platform.url, "boom", until=ids[-1])
    printed: list[str] = []
    assert await cli._logs(platform.url, "boom", False, 0, emit=printed.append) == 0
    assert printed == []
    assert await cli._logs(platform.url, "boom", False, 1, emit=printed.append) == 0
    assert len(printed) == 1
    assert ids[-1] in printed[0]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["logs", "-n", "-1"])

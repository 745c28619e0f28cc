"""The node agent's books and its token arbiter's front (services/gpu_worker/agent.py),
without a bus or instance processes: what it accepts, refuses and charges."""

from __future__ import annotations

import math
from typing import Any, cast

import anyio
import pytest

from services.gpu_worker.agent import Agent, Spatial
from shared.config import Settings
from shared.schema import StartInstance, TokenAcquire, TokenRelease

pytestmark = pytest.mark.unit
MB = 1024 * 1024


def agent(memory_mb: int = 600) -> Agent:
    return Agent(
        cast(Any, None),
        Settings(),
        agent_id="a",
        device="cpu",
        memory_total=memory_mb * MB,
        spatial=Spatial("cores"),
    )


def command(name: str, memory_mb: int, **kw: Any) -> StartInstance:
    return StartInstance(
        instance_id=name,
        function="f",
        sm_share=0.5,
        time_quota=1.0,
        memory_bytes=memory_mb * MB,
        **kw,
    )


def test_a_negative_memory_budget_is_refused() -> None:
    # Booked, it would count as memory freed: with -500 MiB here, a 1000 MiB start
    # would fit this 600 MiB device.
    a = agent(600)
    for bad in (command("neg", -500), command("negw", 100, weight_bytes=-1)):
        reason = a.refusal(bad)
        assert "must not be negative" in str(reason), reason
    assert a.refusal(command("ok", 600)) is None


@pytest.mark.anyio
async def test_a_release_with_no_usable_time_still_ends_the_grant() -> None:
    # A release that says NaN (a broken measure, or a handler holding the instance's
    # credentials): refused by the arbiter, it left the grant held for good, and
    # every other instance of the device waited behind it.
    a = agent()
    a.runner.arbiter.add("i1", base=0.5, maximum=0.5)
    a.runner.arbiter.add("i2", base=0.5, maximum=0.5)
    first = TokenAcquire(instance_id="i1")
    grant = await a.acquire(first, a.waiting(first))
    assert grant.error is None
    a.release(TokenRelease(instance_id="i1", used_s=math.nan))
    assert a.runner.arbiter.holders() == []
    second = TokenAcquire(instance_id="i2")
    with anyio.fail_after(2):
        grant = await a.acquire(second, a.waiting(second))
    assert grant.error is None

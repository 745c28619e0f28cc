"""The node agent's books and its token arbiter's front (services/gpu_worker/agent.py),
without a bus or instance processes: what it accepts, refuses and charges."""

from __future__ import annotations

from typing import Any, cast

import pytest

from services.gpu_worker.agent import Agent, Spatial
from shared.config import Settings
from shared.schema import StartInstance

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

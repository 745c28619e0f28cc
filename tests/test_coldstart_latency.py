"""A start from a spare, step by step (issue 9): the scheduler's `cold_starts` and the
instance's `setup_at` give the timeline bench/coldstart.py prints. Its steps are all
there and in causal order (no durations are asserted: this machine is shared)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from gfaas.client import Client
from shared.natsd import NatsServer
from shared.schema import FunctionSpec
from tests.helpers import agent_details, deploy_and_wait
from tests.platform import Platform, platform_at

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

# Each step happens after the one before it: the scheduler's (arrived, scale,
# joined, dispatched) interleaved with the instance's. The handler takes a second to
# load, so the instance subscribes and takes the request while it loads (SAGE's
# parallel setup): the request's inputs are staged before the load ends.
CAUSAL = [
    "arrived",  # scheduler: the request, no instance
    "scale",  # scheduler: scale from zero
    "assigned",  # spare: its assignment read
    "serve",
    "connect",
    "stores",
    "subscribed",  # instance: subscribed while it loads, a starting beat goes
    "joined",  # scheduler: that heartbeat heard
    "dispatched",  # scheduler: the queued request sent
    "run_received",
    "run_started",
    "run_staged",  # its inputs on the device, while the handler still loads
    "handler",  # instance: handler loaded
    "run_executed",
    "run_answered",
]


@pytest.fixture
def agent_platform(nats_server: NatsServer, tmp_path: Path) -> Iterator[Platform]:
    with platform_at(nats_server.url, tmp_path / "state", agent_memory_mb=600) as p:
        yield p


@pytest.mark.slow  # 7-14 s of instance processes: the default run stays under 10 minutes
async def test_a_start_from_a_spare_reports_every_step_in_order(
    agent_platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    spec = FunctionSpec(
        name="echo-cold", handler="tests.funcs:SlowToLoad", max_instances=1, idle_s=60
    )
    await deploy_and_wait(nc, spec)
    with anyio.fail_after(30):  # instances are wanted here: the agent starts a spare
        while (await agent_details(client))["spares"] < 1:
            await anyio.sleep(0.1)

    out = await client.invoke("echo-cold", {"x": np.array([2.0], dtype=np.float32)}, timeout=60)
    assert out["y"].tolist() == [2.0]
    assert (await agent_details(client))["started_from_spares"] == 1

    scheduler = (await client.status("scheduler")).details["cold_starts"]["echo-cold"]
    [instance] = [
        s.details
        for s in await client.status_all("gpu-worker", timeout=1.0)
        if s.details.get("function") == "echo-cold"
    ]
    at = {**scheduler, **instance["setup_at"]}
    assert set(CAUSAL) <= set(at), f"missing steps: {set(CAUSAL) - set(at)}"
    times = [at[step] for step in CAUSAL]
    assert times == sorted(times), dict(zip(CAUSAL, times, strict=True))
    # The start command is answered after it was sent (the instance may be ready first).
    assert at["commanded"] >= at["scale"]
    # Ready (its beats stop saying "starting") once loaded, whether or not the run
    # that waited has executed by then.
    assert at["ready"] >= at["handler"]
    # The setup steps' durations are the same marks (status's `setup_ms`).
    assert {"connect", "stores", "subscribed", "handler", "ready"} <= set(instance["setup_ms"])

"""Limits on instance processes (issue 10): open files capped, no core dumps, and on
a CPU the memory budget binds the handler: an allocation past budget plus slack fails
in the handler with a clear error, and the instance answers the next call."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from nats.aio.client import Client as NATS

from gfaas.client import Client
from shared.natsd import NatsServer
from shared.schema import FunctionSpec
from tests.helpers import deploy_and_wait
from tests.platform import Platform, platform_at
from tests.test_instances import wait_instances

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

MB = 1024 * 1024
ALLOCATE = FunctionSpec(
    name="allocate-i", handler="tests.funcs:allocate", min_instances=1, max_instances=1,
    memory_mb=256, idle_s=60.0,
)  # fmt: skip


@pytest.fixture
def limited(nats_server: NatsServer, tmp_path: Path) -> Iterator[Platform]:
    with platform_at(
        nats_server.url,
        tmp_path / "state",
        agent_memory_mb=600,
        instance_max_files=512,
        instance_memory_slack_mb=768,
    ) as p:
        yield p


def limits_of(pid: int) -> dict[str, str]:
    rows = Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]
    return {row[:26].strip(): row[26:47].strip() for row in rows}


@pytest.mark.slow  # 7-14 s of instance processes: the default run stays under 10 minutes
async def test_an_instance_cannot_allocate_past_its_budget_and_lives_on(
    limited: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await deploy_and_wait(nc, ALLOCATE)
    (instance,) = await wait_instances(nc, "allocate-i", 1)
    limits = limits_of(instance.pid)
    assert limits["Max open files"] == "512"
    assert limits["Max core file size"] == "0"
    assert limits["Max data size"] == str((256 + 768) * MB)
    # Past 256 MiB + 768 MiB: refused inside the handler, a clear error to the caller.
    reply = await client.invoke_reply("allocate-i", {"mb": np.array([4096])}, timeout=30)
    assert reply.error is not None
    assert reply.error.code == "handler_error"
    assert "allocate" in reply.error.reason, reply.error.reason
    # Within it: the same instance answers.
    out = await client.invoke("allocate-i", {"mb": np.array([64])}, timeout=30)
    assert out["bytes"].tolist() == [64 * MB]
    (after,) = await wait_instances(nc, "allocate-i", 1)
    assert after.instance_id == instance.instance_id

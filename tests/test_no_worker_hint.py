"""What a call that finds no worker is told to do about it: under `gfaas up` (which
runs the workers and restarts one that exits) not to start one."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import pytest

from gfaas.supervisor import service_env
from services.scheduler.handlers import Scheduler
from shared.config import Settings, settings_from_env
from shared.registry import Registry
from shared.scheduling import make_policy
from shared.schema import ErrorCode, FunctionSpec, InvocationMeta

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

ECHO = FunctionSpec(name="echo", handler="tests.funcs:echo")


class Bus:
    def __init__(self) -> None:
        self.errors: list[tuple[ErrorCode, str]] = []

    async def publish(self, subject: str, data: bytes, **_: Any) -> None:
        pass

    async def reply_error(
        self, subject: str, invocation_id: str, code: ErrorCode, reason: str
    ) -> None:
        self.errors.append((code, reason))


class OneSpec:
    synced = True
    specs: Mapping[str, FunctionSpec] = {ECHO.name: ECHO}

    async def lookup(self, name: str) -> FunctionSpec | None:
        return self.specs.get(name)


async def no_worker_reason(settings: Settings) -> str:
    bus = Bus()
    registry = cast(Registry[FunctionSpec], OneSpec())
    scheduler = Scheduler(bus, registry, make_policy("least_loaded"), settings)  # type: ignore[arg-type]
    meta = InvocationMeta(invocation_id="i0", function=ECHO.name)
    await scheduler.schedule(meta, {}, b"", "reply")
    ((code, reason),) = bus.errors
    assert code == ErrorCode.NO_WORKER
    return reason


async def test_under_gfaas_up_no_worker_does_not_say_to_start_one(tmp_path: Path) -> None:
    # The scheduler gfaas up starts reads its settings from the environment it is given.
    env = service_env(Settings(state_dir=tmp_path), "nats://unused")
    reason = await no_worker_reason(settings_from_env(env))
    assert "gfaas serve gpu-worker" not in reason
    assert "gfaas up" in reason


async def test_a_scheduler_of_its_own_says_to_start_a_worker() -> None:
    reason = await no_worker_reason(Settings())
    assert "start one with `gfaas serve gpu-worker`" in reason

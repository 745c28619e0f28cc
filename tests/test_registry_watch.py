"""The registry's watched copy wakes whoever waits on a change (Registry.changed):
the node's prefetcher starts its round on a deploy, not at its next tick."""

from __future__ import annotations

import anyio
import pytest
from nats.aio.client import Client as NATS

from shared.registry import Registry
from shared.schema import FunctionSpec

pytestmark = [pytest.mark.nats, pytest.mark.anyio]


async def wake_on_change(registry: Registry[FunctionSpec], woke: anyio.Event) -> None:
    await registry.changed()
    woke.set()


async def test_a_deploy_and_a_removal_each_wake_a_waiter_and_nothing_else_does(nc: NATS) -> None:
    registry = await Registry.open(nc.jetstream())
    writer = await Registry.open(nc.jetstream())
    async with anyio.create_task_group() as tg:
        await tg.start(registry.watch)
        with anyio.move_on_after(0.3) as quiet:  # nothing changed: it keeps waiting
            await registry.changed()
        assert quiet.cancelled_caught
        for change in ("deploy", "removal"):
            async with anyio.create_task_group() as waiting:
                woke = anyio.Event()

                waiting.start_soon(wake_on_change, registry, woke)
                await anyio.sleep(0.05)  # waiting before the change is made
                if change == "deploy":
                    await writer.put(FunctionSpec(name="watched", handler="tests.funcs:echo"))
                else:
                    assert await writer.delete("watched")
                with anyio.fail_after(5):
                    await woke.wait()
            assert (registry.get("watched") is None) == (change == "removal")
        tg.cancel_scope.cancel()

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


async def test_a_lookup_that_raced_a_removal_does_not_bring_the_spec_back(nc: NATS) -> None:
    """`lookup` reads the bucket for a spec the watch has not delivered yet: when the
    function is removed and the watch hears it while that read is under way, the
    removal stands (before, the read's result went into the cache after it, and the
    removed function stayed deployed to this service until its next deploy)."""
    registry = await Registry.open(nc.jetstream())
    writer = await Registry.open(nc.jetstream())
    read = registry._fetch
    reads: list[str] = []

    async with anyio.create_task_group() as tg:

        async def read_then_removed(name: str) -> tuple[FunctionSpec | None, int]:
            reads.append(name)
            got = await read(name)
            assert await writer.delete(name)
            await tg.start(registry.watch)  # started: it has heard the removal
            return got

        registry._fetch = read_then_removed  # type: ignore[method-assign]
        await writer.put(FunctionSpec(name="raced", handler="tests.funcs:echo"))
        spec = await registry.lookup("raced")  # no watch yet: read from the bucket
        assert reads == ["raced"]
        assert spec is not None  # what the bucket held when it was read
        assert registry.get("raced") is None
        tg.cancel_scope.cancel()

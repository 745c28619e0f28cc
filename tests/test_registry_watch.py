"""The registry's watched copy wakes whoever waits on a change (Registry.changed):
the node's prefetcher starts its round on a deploy, not at its next tick."""

from __future__ import annotations

import anyio
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS

from shared.registry import Registry, RegistryWatchError
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


class _Ended:
    """A KV watcher whose subscription has closed: it delivers nothing, not even the
    end of the initial values."""

    def __aiter__(self) -> _Ended:
        return self

    async def __anext__(self) -> object:
        raise StopAsyncIteration

    async def stop(self) -> None:
        pass


class _Silent(_Ended):
    """A KV watcher whose initial values never come."""

    async def __anext__(self) -> object:
        await anyio.sleep_forever()
        raise AssertionError


def _first_watches(registry: Registry[FunctionSpec], first: list[object]) -> list[object]:
    """Make `registry`'s first watches of its bucket `first` (a watcher, or an
    exception raised), the later ones real; the real watchers it got, in order."""
    real = registry._kv.watchall
    watchers: list[object] = []

    async def watchall(**kwargs: object) -> object:
        if first:
            got = first.pop(0)
            if isinstance(got, BaseException):
                raise got
            return got
        watcher = await real(**kwargs)
        watchers.append(watcher)
        return watcher

    registry._kv.watchall = watchall  # type: ignore[method-assign,assignment]
    return watchers


@pytest.mark.parametrize("fault", ["ended", "timeout", "silent"])
async def test_a_watch_that_fails_before_its_initial_values_is_watched_again(
    nc: NATS, fault: str
) -> None:
    """A watch whose subscription ended before it had delivered the bucket's contents
    (before, the caller's start failed with anyio's 'Child exited without calling
    task_status.started()'), one that could not start for a timeout (before, the
    service's start failed with it), and one whose initial values stopped coming
    (before, its start waited forever) are each watched again: started once the
    bucket's contents are in."""
    writer = await Registry.open(nc.jetstream())
    await writer.put(FunctionSpec(name="there", handler="tests.funcs:echo"))
    registry = await Registry.open(nc.jetstream())
    registry.sync_idle_s = 0.3
    first: object = {
        "ended": _Ended(),
        "timeout": nats.errors.TimeoutError(),
        "silent": _Silent(),
    }[fault]
    _first_watches(registry, [first])
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(4):
            await tg.start(registry.watch)
        assert registry.synced
        assert registry.get("there") is not None
        tg.cancel_scope.cancel()


async def test_a_watch_that_ends_later_is_watched_again_and_misses_nothing(nc: NATS) -> None:
    """A watch that ended after it had started (its subscription closed) is watched
    again: what was deployed and removed meanwhile is heard (before, the watch
    returned and the registry went on with its cache as it was, deaf to deploys)."""
    writer = await Registry.open(nc.jetstream())
    await writer.put(FunctionSpec(name="kept", handler="tests.funcs:echo"))
    await writer.put(FunctionSpec(name="removed", handler="tests.funcs:echo"))
    registry = await Registry.open(nc.jetstream())
    watchers = _first_watches(registry, [])
    async with anyio.create_task_group() as tg:
        await tg.start(registry.watch)
        assert set(registry.specs) == {"kept", "removed"}
        await watchers[0].stop()  # type: ignore[attr-defined]
        await anyio.sleep(0.05)
        assert await writer.delete("removed")
        await writer.put(FunctionSpec(name="added", handler="tests.funcs:echo"))
        with anyio.fail_after(4):
            while set(registry.specs) != {"kept", "added"}:
                await registry.changed()
        assert len(watchers) == 2
        # The new watch is live: a later deploy is heard too.
        await writer.put(FunctionSpec(name="later", handler="tests.funcs:echo"))
        with anyio.fail_after(4):
            while registry.get("later") is None:
                await registry.changed()
        tg.cancel_scope.cancel()


async def test_a_cached_spec_gone_from_the_bucket_unwatched_is_dropped_on_rewatch(
    nc: NATS,
) -> None:
    """A spec the cache has that the bucket no longer holds at all (its removal's
    marker gone too: purged while no watch listened) is dropped when a new watch has
    delivered the bucket's contents."""
    writer = await Registry.open(nc.jetstream())
    await writer.put(FunctionSpec(name="stays", handler="tests.funcs:echo"))
    registry = await Registry.open(nc.jetstream())
    watchers = _first_watches(registry, [])
    async with anyio.create_task_group() as tg:
        await tg.start(registry.watch)
        registry._specs["vanished"] = FunctionSpec(name="vanished", handler="tests.funcs:echo")
        await watchers[0].stop()  # type: ignore[attr-defined]
        with anyio.fail_after(4):
            while "vanished" in registry.specs:
                await registry.changed()
        assert set(registry.specs) == {"stays"}
        tg.cancel_scope.cancel()


async def test_a_watch_on_a_closed_connection_fails_with_a_clear_error(
    nats_server: object,
) -> None:
    conn = await nats.connect(nats_server.url)  # type: ignore[attr-defined]
    registry = await Registry.open(conn.jetstream())
    await conn.close()
    with pytest.raises(RegistryWatchError, match="connection is closed"):
        with anyio.fail_after(4):
            await registry.watch()


async def test_a_watch_that_cannot_start_for_long_fails_the_start_saying_why(nc: NATS) -> None:
    """A fault that lasts (the bucket's watch refused, timing out every try) is not
    retried for good before the watch has started: the caller's start fails with
    RegistryWatchError and the last error (before, with the first try's own
    nats TimeoutError, not retried at all)."""
    registry = await Registry.open(nc.jetstream())
    registry.start_retry_s = 0.5
    _first_watches(registry, [nats.errors.TimeoutError() for _ in range(100)])
    with anyio.fail_after(4):
        async with anyio.create_task_group() as tg:
            with pytest.raises(RegistryWatchError, match=r"within 0\.5 s: TimeoutError"):
                await tg.start(registry.watch)

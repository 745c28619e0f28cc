"""The worker's device tier on its own (no NATS): loads under way are reported and pinned."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import anyio
import nats.errors
import pytest
import torch

from services.gpu_worker.models import HandlerCache
from shared.dataplane.backend import BackendError
from shared.errors import REASON_CHARS, GfaasError
from shared.modelswap import HostTier, tier_prefix
from shared.schema import CALLER_FAULTS, ErrorCode, FunctionSpec
from tests import funcs

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

MIB = 1024 * 1024


@pytest.fixture
def tier() -> Iterator[HostTier]:
    host = HostTier(tier_prefix(f"gfaas-t{secrets.token_hex(4)}"))
    try:
        yield host
    finally:
        host.purge()


def weights(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.pt"
    torch.save({"factor": torch.ones(MIB // 4)}, path)  # 1 MiB
    return path


async def test_a_store_that_cannot_be_reached_is_the_platforms_fault_not_the_handlers(
    tier: HostTier,
) -> None:
    """A fetch that times out (the client's own error, as nats-py raises it) is
    `unavailable`, which an async invocation retries; it came as handler_error, the
    function's fault, stored as the call's final result. Nothing stays reserved."""

    async def fetch(name: str) -> Path:
        raise nats.errors.TimeoutError

    cache = HandlerCache(
        device="cpu", threads=1, capacity_bytes=MIB, fetch_weights=fetch, host_tier=tier
    )
    spec = FunctionSpec(name="scale", handler="tests.funcs:Scale", model="a")
    with pytest.raises(GfaasError) as err:
        async with cache.use(spec):
            pass
    assert err.value.code is ErrorCode.UNAVAILABLE, err.value
    assert "the weights of model 'a' could not be fetched" in err.value.reason
    assert err.value.code not in CALLER_FAULTS
    assert cache.cache.entries == {}
    assert cache.report().loading == []


async def test_weights_that_cannot_be_read_say_why(
    tier: HostTier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reason a model's weights could not be put into the host tier (no room in
    /dev/shm, a file that is not a checkpoint) reaches the caller, clipped, not just
    the exception's type name (`BackendError`, which says nothing a user can act on)."""
    path = weights(tmp_path, "a")

    async def fetch(name: str) -> Path:
        return path

    cache = HandlerCache(
        device="cpu", threads=1, capacity_bytes=2 * MIB, fetch_weights=fetch, host_tier=tier
    )
    spec = FunctionSpec(name="scale", handler="tests.funcs:Scale", model="a")
    why = "no room in /dev/shm for shared-memory segment 'gfaas-t-a' of 1048576 bytes"

    def full(model: str, digest: str, load: object) -> None:
        raise BackendError(why + "\n  (free some, or raise the limit)" + " pad" * 1000)

    monkeypatch.setattr(tier, "get_or_load", full)
    with pytest.raises(GfaasError) as err:
        async with cache.use(spec):
            pass
    assert err.value.code is ErrorCode.MODEL_UNAVAILABLE, err.value
    reason = err.value.reason
    assert f"weights of model 'a' cannot be read: BackendError: {why}" in reason
    assert "\n" not in reason
    assert len(reason) < REASON_CHARS + 100
    assert "more characters cut" in reason
    assert cache.cache.entries == {}

    # A file that is not a checkpoint at all: torch's own words, not "UnpicklingError".
    monkeypatch.undo()
    path.write_bytes(b"not a torch file" * 100)
    with pytest.raises(GfaasError) as err:
        async with cache.use(spec):
            pass
    assert err.value.code is ErrorCode.MODEL_UNAVAILABLE, err.value
    assert "cannot be read: " in err.value.reason
    assert len(err.value.reason.split("cannot be read: ", 1)[1]) > 40, err.value.reason


async def test_a_model_being_loaded_is_reported_and_never_evicted(
    tier: HostTier, tmp_path: Path
) -> None:
    async def fetch(name: str) -> Path:
        return weights(tmp_path, name)

    cache = HandlerCache(
        device="cpu", threads=1, capacity_bytes=MIB + MIB // 2, fetch_weights=fetch, host_tier=tier
    )
    slow = FunctionSpec(name="slow", handler="tests.funcs:GatedScale", model="a")
    other = FunctionSpec(name="other", handler="tests.funcs:Scale", model="b")
    funcs.BUILD_GATE.clear()
    async with anyio.create_task_group() as tg:

        async def load_slow() -> None:
            async with cache.use(slow):
                pass

        tg.start_soon(load_slow)
        with anyio.fail_after(10):
            while cache.report().loading != ["a"]:
                await anyio.sleep(0.01)
        assert cache.report().sizes == {"a": MIB}
        # "a" is half-built: "b" must wait for memory, not evict it.
        with pytest.raises(GfaasError) as info:
            async with cache.use(other, wait_s=0.2):
                pass
        assert info.value.code == "deadline_exceeded"
        assert "in use" in info.value.reason
        assert cache.report().sizes == {"a": MIB}

        async def load_other() -> None:
            async with cache.use(other):
                pass

        # Without a deadline "b" queues, and loads once "a" is built and released.
        tg.start_soon(load_other)
        with anyio.fail_after(10):
            while cache.room_waits < 2:
                await anyio.sleep(0.01)
        assert cache.loads == 0
        funcs.BUILD_GATE.set()
    report = cache.report()
    assert (report.sizes, report.loading) == ({"b": MIB}, [])
    assert report.load_s["b"] > 0.0
    assert cache.loads == 2
    assert cache.evictions == 1


# -- SAGE's parallel setup: the handler is built while its weights are fetched ----------


def linear_weights(tmp_path: Path) -> tuple[Path, torch.nn.Linear]:
    torch.manual_seed(3)
    model = torch.nn.Linear(4, 4)
    path = tmp_path / "lin.pt"
    torch.save(model.state_dict(), path)
    return path, model


LINEAR = FunctionSpec(name="lin", handler="tests.funcs:Linear4", model="lin")


async def test_a_handler_is_built_while_its_weights_are_fetched(
    tier: HostTier, tmp_path: Path
) -> None:
    path, model = linear_weights(tmp_path)
    fetching = anyio.Event()

    async def fetch(name: str) -> Path:
        # The weights come only once the skeleton is built: a load that builds only
        # after its fetch never gets them.
        fetching.set()
        while not funcs.SKELETON_BUILT.is_set():
            await anyio.sleep(0.005)
        return path

    cache = HandlerCache(
        device="cpu", threads=1, capacity_bytes=MIB, fetch_weights=fetch, host_tier=tier
    )
    funcs.SKELETON_BUILT.clear()
    with anyio.fail_after(10):
        async with cache.use(LINEAR) as entry:
            x = torch.randn(2, 4)
            got = entry.handler({"x": x})["y"]
    assert fetching.is_set()
    with torch.no_grad():
        assert torch.equal(got, model(x))
    # The start-up timeline has both ends of the overlap, in order.
    assert 0 < entry.setup_at["skeleton"] <= entry.setup_at["weights"]
    assert cache.report().sizes == {"lin": entry.size}


async def test_a_handler_that_cannot_build_stops_its_fetch(tier: HostTier, tmp_path: Path) -> None:
    cancelled = anyio.Event()

    async def fetch(name: str) -> Path:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    cache = HandlerCache(
        device="cpu", threads=1, capacity_bytes=MIB, fetch_weights=fetch, host_tier=tier
    )
    broken = FunctionSpec(name="broken", handler="tests.funcs:no_such_handler", model="lin")
    with anyio.fail_after(10), pytest.raises(GfaasError) as info:
        async with cache.use(broken):
            pass
    assert info.value.code == "handler_error"
    assert "no_such_handler" in info.value.reason
    assert cancelled.is_set()  # the weights were not fetched for nothing
    assert cache.report().sizes == {}
    assert cache.report().loading == []


async def test_weights_that_never_come_fail_the_load_with_the_fetchs_reason(
    tier: HostTier, tmp_path: Path
) -> None:
    path, _ = linear_weights(tmp_path)
    fail = True

    async def fetch(name: str) -> Path:
        # The build is waiting for the weights when the fetch fails.
        while not funcs.SKELETON_BUILT.is_set():
            await anyio.sleep(0.005)
        if fail:
            raise GfaasError(ErrorCode.MODEL_UNAVAILABLE, "the store has no model 'lin'")
        return path

    cache = HandlerCache(
        device="cpu", threads=1, capacity_bytes=MIB, fetch_weights=fetch, host_tier=tier
    )
    funcs.SKELETON_BUILT.clear()
    with anyio.fail_after(10), pytest.raises(GfaasError) as info:
        async with cache.use(LINEAR):
            pass
    assert info.value.code == "model_unavailable"
    assert "no model 'lin'" in info.value.reason
    assert cache.report().sizes == {}
    # Nothing was left half-loaded: the next load of it works.
    fail = False
    funcs.SKELETON_BUILT.clear()
    with anyio.fail_after(10):
        async with cache.use(LINEAR) as entry:
            assert entry.handler({"x": torch.zeros(1, 4)})["y"].shape == (1, 4)


async def test_a_load_cancelled_while_its_build_waits_for_weights_ends_at_once(
    tier: HostTier, tmp_path: Path
) -> None:
    async def fetch(name: str) -> Path:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    cache = HandlerCache(
        device="cpu", threads=1, capacity_bytes=MIB, fetch_weights=fetch, host_tier=tier
    )
    funcs.SKELETON_BUILT.clear()
    with anyio.fail_after(10):
        with anyio.move_on_after(0.5) as scope:
            async with cache.use(LINEAR):
                pass
    assert scope.cancelled_caught
    assert funcs.SKELETON_BUILT.is_set()  # it was waiting for the weights, in a thread
    assert cache.report().sizes == {}
    assert cache.report().loading == []


async def test_a_redeploy_while_a_call_runs_keeps_or_waits_for_the_old_version(
    tier: HostTier, tmp_path: Path
) -> None:
    """A redeploy while a call holds the old version: with only keys outside the
    build changed, the warm handler serves the new spec at once; with another
    handler, the new load waits for the call to finish, then replaces it. Before,
    the drop of a handler in use raised, and every later load of it failed
    ('already resident')."""

    async def fetch(name: str) -> Path:
        return weights(tmp_path, name)

    cache = HandlerCache(
        device="cpu", threads=1, capacity_bytes=4 * MIB, fetch_weights=fetch, host_tier=tier
    )
    v1 = FunctionSpec(name="f", handler="tests.funcs:echo", description="v1", concurrency=2)
    v2 = FunctionSpec(name="f", handler="tests.funcs:echo", description="v2", concurrency=3)
    v3 = FunctionSpec(name="f", handler="tests.funcs:sleep", description="v3")
    running, finish = anyio.Event(), anyio.Event()
    loaded: list[FunctionSpec] = []

    async def call_on_v1() -> None:
        async with cache.use(v1) as first:
            running.set()
            async with cache.use(v2) as second:
                assert second is first  # the warm handler, now under the new spec
                assert second.spec == v2
                assert second.limiter.total_tokens == 3
            await finish.wait()

    async def call_on_v3() -> None:
        async with cache.use(v3) as third:
            loaded.append(third.spec)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call_on_v1)
            await running.wait()
            tg.start_soon(call_on_v3)
            await anyio.sleep(0.2)
            assert loaded == []  # waits for the call still on the old version
            finish.set()
    assert loaded == [v3]
    async with cache.use(v3) as again:  # and stays loadable
        assert again.spec == v3
    assert cache.evictions == 1

"""The worker's tiers live: device cache eviction, host tier reuse, bad models."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch
from nats.aio.client import Client as NATS
from nats.js import api

from examples.specs import example_spec_paths
from examples.text.tokenize import tokenize
from examples.weights import write_all
from gfaas.client import Client
from services.gpu_worker.models import HandlerCache
from services.gpu_worker.prefetch import PERIOD_S as PREFETCH_PERIOD_S
from services.gpu_worker.prefetch import Prefetcher
from shared.dataplane.shm import list_segments
from shared.errors import GfaasError
from shared.jetstream import MODELS_BUCKET
from shared.modelstore import CHUNK_BYTES, SHA256_HEADER, SIZE_HEADER, ModelStore, file_sha256
from shared.modelswap import HostTier, tier_prefix
from shared.modelswap.host_tier import LOCK_DIR
from shared.natsd import NatsServer
from shared.registry import Registry
from shared.schema import FunctionSpec
from shared.spec import load_spec
from tests.helpers import deploy_and_wait
from tests.platform import Platform, platform_at

pytestmark = [pytest.mark.nats, pytest.mark.anyio]

SPECS = {load_spec(p).name: load_spec(p) for p in example_spec_paths()}
PIXELS = np.zeros((1, 3, 64, 64), np.float32)


@pytest.fixture
def small_cache(nats_server: NatsServer, tmp_path: Path) -> Iterator[Platform]:
    # 13 MiB: the 12.3 MB classifier and the 1.8 MB encoder do not fit together.
    with platform_at(nats_server.url, tmp_path / "s", device_cache_mb=13) as p:
        yield p


async def push_examples(client: Client, tmp_path: Path) -> None:
    for name, path in write_all(tmp_path / "w").items():
        await client.push_model(name, path)


async def worker_details(client: Client) -> dict[str, Any]:
    return (await client.status("gpu-worker")).details


async def test_eviction_keeps_the_device_cache_within_its_size(
    small_cache: Platform, nc: NATS, tmp_path: Path
) -> None:
    client = Client(nc)
    await push_examples(client, tmp_path)
    await deploy_and_wait(nc, SPECS["classifier"], SPECS["text-encoder"])
    first = await client.invoke("classifier", {"pixels": PIXELS})
    await client.invoke("text-encoder", {"tokens": tokenize("evict the cnn")})
    details = await worker_details(client)
    assert details["models"] == ["text-encoder"]
    assert details["evictions"] == 1
    again = await client.invoke("classifier", {"pixels": PIXELS})
    np.testing.assert_allclose(again["logits"], first["logits"], rtol=1e-5)
    details = await worker_details(client)
    # The second swap-in of the CNN came from the host tier, not the object store.
    assert details["host_tier_loads"] == 2
    assert details["model_loads"] == 3
    cache = details["device_cache"]
    assert isinstance(cache, dict)
    assert cache["used"] <= cache["capacity"]


async def test_model_bigger_than_the_device_is_refused_clearly(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    with platform_at(nats_server.url, tmp_path / "s", device_cache_mb=4):
        client = Client(nc)
        await push_examples(client, tmp_path)
        await deploy_and_wait(nc, SPECS["classifier"], SPECS["noop"])
        with pytest.raises(GfaasError) as info:
            await client.invoke("classifier", {"pixels": PIXELS})
        assert info.value.code == "model_unavailable"
        assert "vision-cnn" in info.value.reason or "classifier" in info.value.reason
        out = await client.invoke("noop", {"x": np.ones(2, np.float32)})
        assert out["y"].tolist() == [1.0, 1.0]


async def test_corrupt_weights_give_model_unavailable(
    platform: Platform, nc: NATS, tmp_path: Path
) -> None:
    client = Client(nc)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file" * 100)
    await client.push_model("vision-cnn", garbage)
    await deploy_and_wait(nc, SPECS["classifier"])
    with pytest.raises(GfaasError) as info:
        await client.invoke("classifier", {"pixels": PIXELS})
    assert info.value.code == "model_unavailable"
    assert "cannot be read" in info.value.reason
    with anyio.fail_after(5):
        assert (await worker_details(client))["inflight"] == 0


async def test_host_tier_segments_do_not_outlive_the_platform(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    namespace = "gfaas-tier-cleanup"
    with platform_at(nats_server.url, tmp_path / "s", shm_namespace=namespace):
        client = Client(nc)
        await push_examples(client, tmp_path)
        await deploy_and_wait(nc, SPECS["text-encoder"])
        await client.invoke("text-encoder", {"tokens": tokenize("stay in shared memory")})
        assert len(list_segments(tier_prefix(namespace))) == 1
    assert list_segments(tier_prefix(namespace)) == []
    assert list(LOCK_DIR.glob(f"{tier_prefix(namespace)}*")) == []


@pytest.fixture
def no_prefetch(nats_server: NatsServer, tmp_path: Path) -> Iterator[Platform]:
    """A node that puts no deployed model into its host tier ahead of requests: a
    first request loads from the object store."""
    with platform_at(nats_server.url, tmp_path / "np", host_prefetch_mb=0) as p:
        yield p


async def test_first_answers_from_the_object_store_equal_warm_ones(
    no_prefetch: Platform, nc: NATS, tmp_path: Path
) -> None:
    """Cold (object store -> host tier -> pipelined swap-in) answers what warm does."""
    client = Client(nc)
    await push_examples(client, tmp_path)
    await deploy_and_wait(nc, SPECS["classifier"], SPECS["text-encoder"])
    pixels = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    calls: list[tuple[str, dict[str, np.ndarray], str]] = [
        ("classifier", {"pixels": pixels}, "logits"),
        ("text-encoder", {"tokens": tokenize("first equals warm")}, "embedding"),
    ]
    for function, inputs, output in calls:
        cold = await client.invoke(function, inputs)
        warm = await client.invoke(function, inputs)
        assert not np.isnan(cold[output]).any()
        np.testing.assert_allclose(cold[output], warm[output], rtol=1e-4, atol=1e-5)
    assert (await worker_details(client))["prefetch"]["models"] == []


@pytest.mark.parametrize("budget_mb", [-1, 0])
async def test_deployed_models_are_in_the_host_tier_before_their_first_request(
    nats_server: NatsServer, nc: NATS, tmp_path: Path, budget_mb: int
) -> None:
    """The node puts a deployed function's model into its host tier on its own, so
    the first request's load reads host memory, not the object store; a model no
    function uses any more leaves the tier. With no budget nothing is fetched ahead
    (the mechanism off: the request fills the tier itself)."""
    namespace = f"gfaas-prefetch{budget_mb + 1}"
    with platform_at(
        nats_server.url, tmp_path / "s", shm_namespace=namespace, host_prefetch_mb=budget_mb
    ):
        client = Client(nc)
        await push_examples(client, tmp_path)
        await deploy_and_wait(nc, SPECS["text-encoder"])
        if budget_mb == 0:
            await anyio.sleep(PREFETCH_PERIOD_S)  # a deploy starts a round at once
            details = await worker_details(client)
            assert details["prefetch"]["models"] == []
            assert list_segments(tier_prefix(namespace)) == []
            assert details["host_tier_loads"] == 0
            # The request fills the tier itself; the node's beat says it holds it now.
            await client.invoke("text-encoder", {"tokens": tokenize("fill it myself")})
            with anyio.fail_after(3 * PREFETCH_PERIOD_S):
                while (await worker_details(client))["prefetch"]["resident"] != ["text-encoder"]:
                    await anyio.sleep(0.1)
            return
        with anyio.fail_after(2 * PREFETCH_PERIOD_S):  # the deploy's round, not the next
            while not (await worker_details(client))["prefetch"]["models"]:
                await anyio.sleep(0.05)
        details = await worker_details(client)
        assert details["prefetch"]["models"] == ["text-encoder"]
        assert details["prefetch"]["resident"] == ["text-encoder"]
        assert len(list_segments(tier_prefix(namespace))) == 1
        assert details["host_tier_loads"] == 1
        out = await client.invoke("text-encoder", {"tokens": tokenize("already in memory")})
        assert out["embedding"].shape[-1] > 0
        # The request's load mapped what was there: the tier was not filled again.
        assert (await worker_details(client))["host_tier_loads"] == 1
        assert await client.remove("text-encoder", force=True)
        with anyio.fail_after(2 * PREFETCH_PERIOD_S):
            while (await worker_details(client))["prefetch"]["models"]:
                await anyio.sleep(0.2)
        # (The worker's handler was built on a copy: the tier's is no longer read.)
        details = await worker_details(client)
        assert details["prefetch"]["dropped"] == 1
        assert list_segments(tier_prefix(namespace)) == []


async def test_a_corrupt_or_truncated_blob_is_refused(nc: NATS, tmp_path: Path) -> None:
    js = nc.jetstream()
    store = await ModelStore.open(js)
    weights = write_all(tmp_path / "w")["text-encoder"]
    await store.push("text-encoder", weights)
    objects = store._store
    info = await objects.get_info("text-encoder")
    assert info.headers == {
        SHA256_HEADER: [file_sha256(weights)],
        SIZE_HEADER: [str(weights.stat().st_size)],
    }
    intact = await store.fetch("text-encoder", tmp_path / "ok")
    assert intact.read_bytes() == weights.read_bytes()

    raw = weights.read_bytes()
    flipped = raw[:1000] + bytes([raw[1000] ^ 0xFF]) + raw[1001:]
    # Put under the same name with the pushed headers: the client's own digest is
    # computed over these bytes, so only the digest recorded at push can tell.
    for reason, blob in {"corrupt": flipped, "truncated": raw[: len(raw) // 2]}.items():
        meta = api.ObjectMeta(name="text-encoder", headers=info.headers)
        await objects.put("text-encoder", blob, meta=meta)
        cache = tmp_path / reason
        with anyio.fail_after(10), pytest.raises(GfaasError) as refused:
            await store.fetch("text-encoder", cache)
        assert refused.value.code == "model_unavailable"
        assert f"is {reason} in the store" in refused.value.reason
        assert list(cache.iterdir()) == []  # no half-written file left behind

    # Chunks lost in the store: refused at once, not waited for.
    await store.push("text-encoder", weights)
    info = await objects.get_info("text-encoder")
    assert info.chunks is not None
    assert info.chunks > 1
    chunks = f"$O.{MODELS_BUCKET}.C.{info.nuid}"
    last = await js.get_last_msg(f"OBJ_{MODELS_BUCKET}", chunks)
    assert last.seq is not None
    await js.delete_msg(f"OBJ_{MODELS_BUCKET}", last.seq)
    with anyio.fail_after(10), pytest.raises(GfaasError) as refused:
        await store.fetch("text-encoder", tmp_path / "lost")
    assert f"truncated in the store: {info.chunks - 1} of {info.chunks} chunks" in str(
        refused.value.reason
    )
    await js.purge_stream(f"OBJ_{MODELS_BUCKET}", subject=chunks)
    with anyio.fail_after(10), pytest.raises(GfaasError) as refused:
        await store.fetch("text-encoder", tmp_path / "gone")
    assert f"0 of {info.chunks} chunks" in refused.value.reason

    # Pushed again, intact: it loads.
    await store.push("text-encoder", weights)
    again = await store.fetch("text-encoder", tmp_path / "again")
    assert again.read_bytes() == raw


async def test_pushes_store_large_chunks_and_older_small_chunked_objects_still_load(
    nc: NATS, tmp_path: Path
) -> None:
    """A push stores chunks as large as one message may be (up to CHUNK_BYTES), so a
    fetch handles an eighth as many messages; objects pushed in the client's default
    128 KiB chunks (older clients) are still fetched whole and checked."""
    store = await ModelStore.open(nc.jetstream())
    weights = tmp_path / "big.bin"
    weights.write_bytes(np.random.default_rng(1).bytes(5 * CHUNK_BYTES + 12345))
    await store.push("big", weights)
    info = await store._store.get_info("big")
    chunk = min(CHUNK_BYTES, nc.max_payload)
    assert info.chunks == -(-weights.stat().st_size // chunk)
    assert (await store.fetch("big", tmp_path / "new")).read_bytes() == weights.read_bytes()

    meta = api.ObjectMeta(name="old", headers=info.headers)  # the client's default chunks
    with weights.open("rb") as f:
        await store._store.put("old", f, meta=meta)
    old = await store._store.get_info("old")
    assert old.chunks is not None
    assert old.chunks > 8 * int(info.chunks or 0) - 8
    with anyio.fail_after(20):
        fetched = await store.fetch("old", tmp_path / "old")
    assert fetched.read_bytes() == weights.read_bytes()


async def test_concurrent_fetches_of_one_model_share_one_download(
    nc: NATS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prefetcher and a cold load (or two loads) asking for one model at once get
    the same whole file from one download; two writers of one partial file (CI's
    FileNotFoundError on the rename) must not happen."""
    store = await ModelStore.open(nc.jetstream())
    weights = tmp_path / "big.bin"
    weights.write_bytes(np.random.default_rng(2).bytes(6 * CHUNK_BYTES + 777))
    await store.push("big", weights)
    downloads = 0
    download = store._download

    async def counted(*args: Any) -> None:
        nonlocal downloads
        downloads += 1
        await download(*args)

    monkeypatch.setattr(store, "_download", counted)
    cache = tmp_path / "cache"
    paths: list[Path] = []

    async def fetch() -> None:
        paths.append(await store.fetch("big", cache))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(fetch)
    assert len(set(paths)) == 1
    assert paths[0].read_bytes() == weights.read_bytes()
    assert downloads == 1
    assert [p.name for p in cache.iterdir()] == [paths[0].name]  # no partial left
    assert store._fetching == {}


async def test_a_fetch_that_a_push_overtakes_gets_the_new_weights(
    nc: NATS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push under the name purges the old object's chunks once the new ones are in.
    A fetch that read the old object's info just before finds its chunks gone: the
    model is there (pushed again), so the fetch takes the new one instead of
    answering `model_unavailable` ("truncated in the store")."""
    store = await ModelStore.open(nc.jetstream())
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(np.random.default_rng(3).bytes(3 * CHUNK_BYTES + 5))
    new.write_bytes(np.random.default_rng(4).bytes(2 * CHUNK_BYTES + 9))
    await store.push("big", old)
    check = store._check_chunks
    pushed = False

    async def overtaken(name: str, info: api.ObjectInfo) -> None:
        nonlocal pushed
        if not pushed:  # the push lands between the fetch's info and its download
            pushed = True
            await store.push("big", new)
        await check(name, info)

    monkeypatch.setattr(store, "_check_chunks", overtaken)
    with anyio.fail_after(20):
        fetched = await store.fetch("big", tmp_path / "cache")
    assert pushed
    assert fetched.read_bytes() == new.read_bytes()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [fetched.name]


async def test_a_load_waiting_for_room_keeps_its_weights_from_the_prefetcher(
    nc: NATS, tmp_path: Path
) -> None:
    """A load that has its model's weights from the host tier and waits for device
    memory still reads them: the prefetcher dropping the copy it fetched (the model
    pushed again meanwhile) must wait for it, not empty it under the load (whose
    build then found none of the model's tensors: 'weights do not fit the model')."""
    js = nc.jetstream()
    store = await ModelStore.open(js)
    registry = await Registry.open(js)
    torch.manual_seed(3)
    first = torch.nn.Linear(4, 4)
    lin = tmp_path / "lin.pt"
    torch.save(first.state_dict(), lin)
    factor = tmp_path / "factor.pt"
    torch.save({"factor": torch.ones(64)}, factor)
    await store.push("lin", lin)
    await store.push("factor", factor)
    tier = HostTier(tier_prefix(f"gfaas-p{secrets.token_hex(3)}"))
    cache = HandlerCache(
        device="cpu",
        threads=1,
        capacity_bytes=300,  # room for one model at a time
        fetch_weights=lambda name: store.fetch(name, tmp_path / "cache"),
        host_tier=tier,
        fill_host_tier=store.fill_host_tier,
    )
    linear = FunctionSpec(name="lin", handler="tests.funcs:Linear4", model="lin")
    scale = FunctionSpec(name="scale", handler="tests.funcs:Scale", model="factor")
    await registry.put(linear)
    prefetcher = Prefetcher(registry, store, cache, budget=10 * 1024 * 1024)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(registry.watch)
            assert [w.model for w in (await prefetcher.round()).fetch] == ["lin"]
            ran = anyio.Event()
            release = anyio.Event()

            async def hold_the_device() -> None:
                async with cache.use(scale):
                    ran.set()
                    await release.wait()

            tg.start_soon(hold_the_device)
            await ran.wait()
            results: list[Any] = []

            async def call() -> None:
                with anyio.fail_after(20):
                    async with cache.use(linear) as loaded:
                        results.append(loaded.handler({"x": torch.ones(1, 4)})["y"])

            tg.start_soon(call)
            with anyio.fail_after(10):
                while cache.room_waits == 0:  # it has the weights, and waits for room
                    await anyio.sleep(0.01)
            torch.save(torch.nn.Linear(4, 4).state_dict(), lin)
            await store.push("lin", lin)  # the prefetched copy is stale now
            await prefetcher.round()
            release.set()
            with anyio.fail_after(20):
                while not results:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()  # the registry's watch
        with torch.no_grad():  # what the load read before the push: the first weights
            torch.testing.assert_close(results[0], first(torch.ones(1, 4)))
    finally:
        tier.purge()


async def test_a_fetch_leaves_no_consumer_on_the_server(nc: NATS, tmp_path: Path) -> None:
    """Each fetch pulls the chunks through a consumer of its own; done, it deletes it
    (not waited for) instead of leaving it to the server's inactive threshold
    (STALL_S)."""
    js = nc.jetstream()
    store = await ModelStore.open(js)
    weights = tmp_path / "b.bin"
    weights.write_bytes(np.random.default_rng(5).bytes(2 * CHUNK_BYTES + 1))
    await store.push("b", weights)
    fetched = await store.fetch("b", tmp_path / "cache")
    assert fetched.read_bytes() == weights.read_bytes()
    with anyio.fail_after(2):
        while await js.consumers_info(f"OBJ_{MODELS_BUCKET}") != []:
            await anyio.sleep(0.02)


async def test_a_workers_fetch_under_authentication_does_not_wait_for_a_refused_delete(
    tmp_path: Path,
) -> None:
    """Under authentication no service may delete a consumer: a worker's fetch (or
    fill) that waited for its consumer's deletion waited for the refused request's
    timeout, 5 s more for every model it loaded; it no longer waits for it."""
    import time

    import nats

    from shared import auth
    from tests.platform import auth_nats_server

    with auth_nats_server(tmp_path / "state") as server:
        creds = tmp_path / "state" / "auth"
        admin = await nats.connect(server.url, **auth.connect_options(creds=creds / "admin.json"))
        worker = await nats.connect(
            server.url, **auth.connect_options(creds=creds / "gpu-worker.json")
        )
        try:
            weights = tmp_path / "w.bin"
            weights.write_bytes(np.random.default_rng(8).bytes(2 * CHUNK_BYTES + 1))
            await (await ModelStore.open(admin.jetstream())).push("w", weights)
            store = await ModelStore.open(worker.jetstream())
            started = time.monotonic()
            fetched = await store.fetch("w", tmp_path / "cache")
            assert time.monotonic() - started < 2.0
            assert fetched.read_bytes() == weights.read_bytes()
        finally:
            await worker.close()
            await admin.close()


async def test_a_workers_fetch_under_authentication_sends_no_refused_delete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No service may delete a consumer (shared.auth): a worker's fetch that sent the
    delete anyway had the server log a permissions violation on its connection (in
    gfaas up's output as `nats.error`) for every model it loaded. It sends none; its
    consumer goes at its inactive threshold (CONSUMER_IDLE_S, short)."""
    import nats

    from shared import auth, modelstore
    from tests.platform import auth_nats_server

    monkeypatch.setattr(modelstore, "CONSUMER_IDLE_S", 0.5)
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:  # what shared.bus logs as nats.error
        errors.append(exc)

    with auth_nats_server(tmp_path / "state") as server:
        creds = tmp_path / "state" / "auth"
        admin = await nats.connect(server.url, **auth.connect_options(creds=creds / "admin.json"))
        worker = await nats.connect(
            server.url,
            error_cb=on_error,
            **auth.connect_options(creds=creds / "gpu-worker.json"),
        )
        try:
            weights = tmp_path / "w.bin"
            weights.write_bytes(np.random.default_rng(9).bytes(2 * CHUNK_BYTES + 1))
            await (await ModelStore.open(admin.jetstream())).push("w", weights)
            store = await ModelStore.open(worker.jetstream())
            fetched = await store.fetch("w", tmp_path / "cache")
            assert fetched.read_bytes() == weights.read_bytes()
            await anyio.sleep(0.2)  # a delete sent in the background, refused
            await worker.flush()
            assert errors == []
            stream = f"OBJ_{MODELS_BUCKET}"
            with anyio.fail_after(3):  # its threshold, and the server's sweep
                while await admin.jetstream().consumers_info(stream) != []:
                    await anyio.sleep(0.05)
        finally:
            await worker.close()
            await admin.close()


async def test_a_fetch_whose_chunks_a_push_purges_midway_takes_the_new_weights_at_once(
    nc: NATS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push under the name purges the old object's chunks while a fetch is reading
    them: the chunks still to come never arrive. The fetch sees the object replaced
    within about a second and takes the new one (before, it waited STALL_S, 30 s,
    for them first: a cold load racing a push missed its deadline)."""
    import threading

    import shared.modelstore as modelstore

    monkeypatch.setattr(modelstore, "STALL_S", 60.0)
    monkeypatch.setattr(modelstore, "FETCH_BYTES", CHUNK_BYTES)  # one chunk a batch
    store = await ModelStore.open(nc.jetstream())
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(np.random.default_rng(5).bytes(6 * CHUNK_BYTES + 3))
    new.write_bytes(np.random.default_rng(6).bytes(2 * CHUNK_BYTES + 1))
    await store.push("midway", old)
    write_all = modelstore._write_all
    first_written, pushed = threading.Event(), threading.Event()

    def held_after_the_first(writer: Any, data: list[bytes]) -> None:
        if not first_written.is_set():
            first_written.set()
            pushed.wait(10)  # the old chunks are purged meanwhile
        write_all(writer, data)

    monkeypatch.setattr(modelstore, "_write_all", held_after_the_first)
    fetched: list[Path] = []

    async def fetch() -> None:
        fetched.append(await store.fetch("midway", tmp_path / "cache"))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(fetch)
            while not first_written.is_set():
                await anyio.sleep(0.01)
            await store.push("midway", new)
            pushed.set()
    assert fetched[0].read_bytes() == new.read_bytes()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [fetched[0].name]

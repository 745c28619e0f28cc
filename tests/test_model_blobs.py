"""Loading-optimised weights (issue 9): a push stores, beside the original file, the
same tensors in the host tier's layout; a node streams that blob straight into its
host tier (no file written, nothing unpickled). A corrupt or stale blob is never
used: the node loads the original instead, and still answers correctly."""

from __future__ import annotations

import fcntl
import os
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
from nats.js.object_store import ObjectStore

from bench.live_models import WIDTH, mlp, write_mlp
from gfaas.client import Client
from shared.modelstore import BLOB_SUFFIX, SOURCE_HEADER, ModelStore, cache_stem
from shared.modelswap import HostTier
from shared.modelswap.host_tier import LOCK_DIR, segment_name
from shared.schema import FunctionSpec
from tests.helpers import deploy_and_wait
from tests.platform import Platform

pytestmark = [pytest.mark.nats, pytest.mark.anyio]


@pytest.fixture
def tier() -> Iterator[HostTier]:
    host_tier = HostTier(f"gfaas-blob{secrets.token_hex(3)}-model-")
    try:
        yield host_tier
    finally:
        host_tier.purge()


async def test_a_push_stores_a_blob_that_fills_the_host_tier_without_a_file(
    nc: NATS, tmp_path: Path, tier: HostTier
) -> None:
    store = await ModelStore.open(nc.jetstream())
    weights = tmp_path / "m3.pt"
    write_mlp(weights, 3, seed=2)
    await store.push("m3", weights)
    objects = store._store
    blob = await objects.get_info("m3" + BLOB_SUFFIX)
    original = await objects.get_info("m3")
    assert blob.headers is not None
    assert blob.headers[SOURCE_HEADER] == original.headers["Gfaas-Sha256"]  # type: ignore[index]
    # Listed models are the pushed ones; their blobs are the store's own business.
    assert [name for name, _ in await store.list()] == ["m3"]

    host = await store.fill_host_tier("m3", tier)
    assert host is not None
    assert tier.blob_loads == 1
    state = torch.load(weights, weights_only=True)
    assert host.tensors.keys() == state.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(host.tensors[name], tensor, rtol=0, atol=0)
    assert not list(tmp_path.glob("*.bin"))  # nothing was written to disk
    # Once there, the tier's copy is used: no second fill.
    again = await store.fill_host_tier("m3", tier)
    assert again is host
    assert tier.blob_loads == 1


async def test_a_corrupt_or_stale_blob_is_not_used(
    nc: NATS, tmp_path: Path, tier: HostTier
) -> None:
    store = await ModelStore.open(nc.jetstream())
    weights = tmp_path / "m3.pt"
    write_mlp(weights, 3, seed=2)
    await store.push("m3", weights)
    objects = store._store
    blob = await objects.get_info("m3" + BLOB_SUFFIX)
    raw = bytearray((await objects.get("m3" + BLOB_SUFFIX)).data or b"")
    raw[len(raw) // 2] ^= 0xFF
    # The same headers (the sha256 recorded at push): only the check can tell.
    meta = api.ObjectMeta(name="m3" + BLOB_SUFFIX, headers=blob.headers)
    await objects.put("m3" + BLOB_SUFFIX, bytes(raw), meta=meta)
    assert await store.fill_host_tier("m3", tier) is None
    assert tier.resident() == []  # nothing half-written left in shared memory

    # A blob made from other weights than the current file's: not used either.
    await store.push("m3", weights)
    other = tmp_path / "other.pt"
    write_mlp(other, 3, seed=5)
    with other.open("rb") as f:  # the original replaced as an older client would
        await objects.put("m3", f, meta=api.ObjectMeta(name="m3", headers={}))
    assert await store.fill_host_tier("m3", tier) is None


async def test_a_fill_given_up_while_another_holds_the_lock_leaves_it_free(
    nc: NATS, tmp_path: Path, tier: HostTier
) -> None:
    """A fill waits for the node-wide lock on the model in a thread. Given up
    meanwhile (its load cancelled), the lock its thread takes once the other filler
    is done must be given back: kept, no fill of that model ever ran again."""
    store = await ModelStore.open(nc.jetstream())
    weights = tmp_path / "m3.pt"
    write_mlp(weights, 3, seed=2)
    await store.push("m3", weights)
    key = cache_stem("m3", await store._store.get_info("m3"))
    other = tier.lock("m3", key)  # another process filling the same model
    with anyio.move_on_after(0.3) as waited:
        await store.fill_host_tier("m3", tier)
    assert waited.cancelled_caught
    tier.unlock(other)
    probe = os.open(LOCK_DIR / f"{segment_name('m3', key, tier.prefix)}.lock", os.O_RDONLY)
    try:
        with anyio.fail_after(5):
            while True:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await anyio.sleep(0.02)
        fcntl.flock(probe, fcntl.LOCK_UN)
    finally:
        os.close(probe)
    with anyio.fail_after(10):
        host = await store.fill_host_tier("m3", tier)
    assert host is not None


async def test_workers_answer_from_the_blob_and_from_the_file_when_asked(
    platform: Platform, nc: NATS, tmp_path: Path
) -> None:
    client = Client(nc)
    weights = tmp_path / "m4.pt"
    write_mlp(weights, 4, seed=3)
    await client.push_model("m4", weights)
    factor = tmp_path / "factor.pt"
    torch.save({"factor": torch.tensor([3.0])}, factor)
    await client.push_model("factor", factor)
    specs = [
        FunctionSpec(name="mlp4", handler="bench.live_models:Mlp", model="m4"),
        # A handler that reads the pushed file itself (ctx.weights_file()).
        FunctionSpec(name="scale", handler="tests.funcs:Scale", model="factor"),
    ]
    await deploy_and_wait(nc, *specs)
    x = np.random.default_rng(1).standard_normal((2, WIDTH)).astype(np.float32)
    model = mlp(4)
    model.load_state_dict(torch.load(weights, weights_only=True))
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    out = await client.invoke("mlp4", {"x": x})
    np.testing.assert_allclose(out["y"], expected, rtol=1e-5, atol=1e-6)
    scaled = await client.invoke("scale", {"x": np.array([2.0], dtype=np.float32)})
    assert scaled["y"].tolist() == [6.0]
    # The MLP came from its blob: its file was never fetched; Scale's was, on request.
    cached = {p.name.split("-")[0] for p in (platform.state_dir / "models").glob("*.bin")}
    assert cached == {"factor"}


async def test_a_file_that_changes_while_it_is_pushed_does_not_replace_the_stored_model(
    nc: NATS, tmp_path: Path, tier: HostTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file rewritten while the client reads it to put (a checkpoint still being
    saved) fails its push, and the version stored before stays whole (before, the
    push succeeded and stored bytes other than the ones its headers were hashed from:
    every node refused the model as corrupt, the good version gone)."""
    store = await ModelStore.open(nc.jetstream())
    weights = tmp_path / "m3.pt"
    write_mlp(weights, 3, seed=2)
    await store.push("m3", weights)
    first = await store.fetch("m3", tmp_path / "cache")
    real_put = ObjectStore.put

    async def put_while_rewritten(
        self: ObjectStore, name: str, data: Any, meta: Any = None
    ) -> api.ObjectInfo:
        if name == "m3":
            write_mlp(weights, 3, seed=5)  # the same size, other bytes, mid-push
        return await real_put(self, name, data, meta=meta)

    monkeypatch.setattr(ObjectStore, "put", put_while_rewritten)
    with pytest.raises(ValueError, match="changed while it was pushed"):
        await store.push("m3", weights)
    assert await store.fetch("m3", tmp_path / "cache") == first  # the old one, whole
    host = await store.fill_host_tier("m3", tier)
    assert host is not None
    for name, tensor in torch.load(first, weights_only=True).items():
        torch.testing.assert_close(host.tensors[name], tensor, rtol=0, atol=0)


async def test_a_file_that_changes_before_its_blob_is_made_gets_no_blob(
    nc: NATS, tmp_path: Path, tier: HostTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loading copy is made from the file after the original is stored: when the
    file changed in between, no blob of it is stored (before, one made from the new
    weights was stored as the copy of the old: nodes filled from it served other
    weights than the stored model's), and the push says so."""
    import shared.modelstore as modelstore

    store = await ModelStore.open(nc.jetstream())
    weights = tmp_path / "m3.pt"
    write_mlp(weights, 3, seed=2)
    pushed = torch.load(weights, weights_only=True)
    real_make = modelstore._make_blob

    def make_after_a_rewrite(path: Path, blob: Path) -> bool:
        write_mlp(path, 3, seed=5)
        return real_make(path, blob)

    monkeypatch.setattr(modelstore, "_make_blob", make_after_a_rewrite)
    with pytest.raises(ValueError, match="changed while it was pushed"):
        await store.push("m3", weights)
    stored = torch.load(await store.fetch("m3", tmp_path / "cache"), weights_only=True)
    for name, tensor in pushed.items():  # the original: as it was read
        torch.testing.assert_close(stored[name], tensor, rtol=0, atol=0)
    host = await store.fill_host_tier("m3", tier)
    assert host is None  # no blob: a node loads the original


async def test_a_push_cancelled_midway_leaves_no_chunks_in_the_store(
    nc: NATS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push cancelled while it sends its chunks (Ctrl-C in `gfaas model push`)
    stores nothing, and its chunks are purged (before, the client purged them only
    on an error: they stayed in the stream for good, named by no object)."""
    import threading
    import time

    import shared.modelstore as modelstore
    from shared.modelstore import CHUNK_BYTES

    store = await ModelStore.open(nc.jetstream())
    weights = tmp_path / "cut.bin"
    weights.write_bytes(np.random.default_rng(7).bytes(5 * CHUNK_BYTES + 1))
    read = modelstore._Pinned.readinto
    first = threading.Event()

    def slowly(self: object, buffer: bytearray) -> int:
        n = read(self, buffer)  # type: ignore[arg-type]
        if first.is_set():
            time.sleep(0.3)
        first.set()
        return n

    monkeypatch.setattr(modelstore._Pinned, "readinto", slowly)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.push, "cut", weights)
            while not first.is_set():
                await anyio.sleep(0.01)
            await anyio.sleep(0.5)  # a chunk or two sent
            tg.cancel_scope.cancel()
    objects: Any = store._store
    chunks = f"$O.{objects._name}.C.>"
    state = (await nc.jetstream().stream_info(objects._stream, subjects_filter=chunks)).state
    assert not state.subjects, state.subjects
    assert await store.size("cut") == 0  # nothing stored

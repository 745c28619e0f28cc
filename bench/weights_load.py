"""Getting weights onto a node and into a model (issue 9), step by step, each against
what it replaced, in one run:

- fetch: 100 MB from the object store into a file, by the client's ordered push
  consumer (`ObjectStore.get(writeinto=...)`) vs gfaas's batched pull
  (`ModelStore.fetch`);
- host tier: fetch the file and unpickle it into shared memory vs stream the
  loading-optimised blob into it (`ModelStore.fill_host_tier`);
- build: a 1,000-layer MLP on the host tier's read-only weights, by `to_empty` +
  `load_state_dict(assign=True)` vs gfaas's one walk (`instantiate(shared=True)`);
- first forward of the 100-layer MLP built on shared weights, with the mapping's
  pages faulted in on use vs populated in a thread while it is built;
- chunk size: the same weights pushed by `ModelStore.push` in the client's default
  128 KiB chunks vs the store's `CHUNK_BYTES` (1 MiB), and the host tier filled from
  each one's `.blob` object (`fill_host_tier`), the two alternated.

Medians of `--repeat` (3). Run: `.venv/bin/python -m bench.weights_load`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nats
import torch
from nats.js import api
from nats.js.object_store import OBJ_DEFAULT_CHUNK_SIZE

import shared.modelswap.host_tier as host_tier
from bench.live_models import WIDTH, mlp, write_mlp
from shared.modelstore import BLOB_SUFFIX, ModelStore, _HashingWriter
from shared.modelswap import HostTier
from shared.modelswap.pipeline import instantiate
from shared.natsd import nats_server


def tier() -> HostTier:
    return HostTier(f"gfaas-wl{secrets.token_hex(3)}-model-")


async def fetches(url: str, weights: Path, tmp: Path, repeat: int) -> dict[str, float]:
    nc = await nats.connect(url)
    try:
        store = await ModelStore.open(nc.jetstream())
        await store.push("m100", weights)
        out: dict[str, list[float]] = {k: [] for k in ("ordered", "pull", "file", "blob")}
        for i in range(repeat):
            started = time.perf_counter()
            with (tmp / f"ordered{i}").open("wb") as f:
                await store._store.get("m100", writeinto=f)
            out["ordered"].append(time.perf_counter() - started)
            started = time.perf_counter()
            await store.fetch("m100", tmp / f"pull{i}")
            out["pull"].append(time.perf_counter() - started)
            t = tier()
            started = time.perf_counter()
            path = await store.fetch("m100", tmp / f"file{i}")
            t.get_or_load("m100", path.stem, lambda p=path: p)  # type: ignore[misc]
            out["file"].append(time.perf_counter() - started)
            t.purge()
            t = tier()
            started = time.perf_counter()
            assert await store.fill_host_tier("m100", t) is not None
            out["blob"].append(time.perf_counter() - started)
            t.purge()
        return {k: statistics.median(v) for k, v in out.items()}
    finally:
        await nc.close()


class DefaultChunks(ModelStore):
    """`ModelStore.push` as it was before 1 MiB chunks: the file and its blob in the
    client's default chunks (what an older client's objects still look like)."""

    def _chunking(self) -> api.ObjectMetaOptions:
        return api.ObjectMetaOptions(max_chunk_size=OBJ_DEFAULT_CHUNK_SIZE)


class Discard(_HashingWriter):
    """Counts what arrives, writes and hashes nothing: the receive alone."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


SMALL, LARGE = "small", "large"  # 128 KiB, 1 MiB chunks


@dataclass
class Chunked:
    medians: dict[str, dict[str, float]]  # step -> SMALL / LARGE -> seconds
    ranges: dict[str, dict[str, tuple[float, float]]]  # the same -> (min, max)
    chunks: dict[str, tuple[int, int]]  # SMALL / LARGE -> chunks of the file, of the blob
    blob_mb: float


async def chunk_sizes(url: str, weights: Path, repeat: int) -> Chunked:
    """Each step with 128 KiB and with 1 MiB chunks, alternated (and which goes first
    alternated too), `repeat` times: the whole push (the file, its blob made and put),
    a put of the file alone, the host tier filled from the `.blob` object, and a
    receive of the blob's chunks with nothing written."""
    nc = await nats.connect(url)
    try:
        large = await ModelStore.open(nc.jetstream())
        stores: dict[str, ModelStore] = {LARGE: large, SMALL: DefaultChunks(large._store)}
        names = {SMALL: "c128k", LARGE: "c1m"}
        steps = ("push", "put", "fill", "receive")
        out: dict[str, dict[str, list[float]]] = {step: {SMALL: [], LARGE: []} for step in steps}

        def order(i: int) -> tuple[str, str]:
            return (SMALL, LARGE) if i % 2 == 0 else (LARGE, SMALL)

        for i in range(repeat):
            for k in order(i):
                started = time.perf_counter()
                await stores[k].push(names[k], weights)
                out["push"][k].append(time.perf_counter() - started)
        for i in range(repeat):
            for k in order(i):
                meta = api.ObjectMeta(name=f"put-{k}", options=stores[k]._chunking())
                started = time.perf_counter()
                with weights.open("rb") as f:
                    await large._store.put(f"put-{k}", f, meta=meta)
                out["put"][k].append(time.perf_counter() - started)
        blobs = {k: await large._store.get_info(names[k] + BLOB_SUFFIX) for k in names}
        files = {k: await large._store.get_info(names[k]) for k in names}
        for i in range(repeat):
            for k in order(i):
                t = tier()
                started = time.perf_counter()
                assert await large.fill_host_tier(names[k], t) is not None
                out["fill"][k].append(time.perf_counter() - started)
                t.purge()
        for i in range(repeat):
            for k in order(i):
                sink = Discard()
                started = time.perf_counter()
                await large._download(names[k] + BLOB_SUFFIX, blobs[k], sink)
                out["receive"][k].append(time.perf_counter() - started)
                assert sink.size == blobs[k].size
        return Chunked(
            medians={
                step: {k: statistics.median(v) for k, v in by.items()} for step, by in out.items()
            },
            ranges={step: {k: (min(v), max(v)) for k, v in by.items()} for step, by in out.items()},
            chunks={k: (int(files[k].chunks or 0), int(blobs[k].chunks or 0)) for k in names},
            blob_mb=int(blobs[LARGE].size or 0) / 1e6,
        )
    finally:
        await nc.close()


def old_build(factory: Callable[[], torch.nn.Module], views: dict[str, torch.Tensor]) -> None:
    with torch.device("meta"):
        model = factory()
    model = model.to_empty(device="cpu")
    model.load_state_dict(views, assign=True)


def builds(tmp: Path, repeat: int) -> dict[str, float]:
    weights = tmp / "m1000.pt"
    write_mlp(weights, 1000, seed=1)
    t = tier()
    try:
        host = t.get_or_load("m1000", "d", lambda: weights)
        views = host.readonly_tensors()
        out: dict[str, list[float]] = {"to_empty + assign": [], "one walk": []}
        for _ in range(repeat):
            started = time.perf_counter()
            old_build(lambda: mlp(1000), views)
            out["to_empty + assign"].append(time.perf_counter() - started)
            started = time.perf_counter()
            instantiate(lambda: mlp(1000), host, "cpu", shared=True)
            out["one walk"].append(time.perf_counter() - started)
        return {k: statistics.median(v) for k, v in out.items()}
    finally:
        t.purge()


def first_forward(weights: Path, populate: bool) -> float:
    """One fresh mapping each: the pages are not mapped in this process yet."""
    t = tier()
    saved = host_tier._populate_soon
    if not populate:
        host_tier._populate_soon = lambda segment: None
    try:
        t.get_or_load("m100", "d", lambda: weights)
        t.close()  # drop this process's mappings: the model maps the segment afresh
        host = t.cached("m100", "d")
        assert host is not None
        model, _ = instantiate(lambda: mlp(100), host, "cpu", shared=True)
        time.sleep(0.05)  # what the rest of a start takes, for the thread to run in
        started = time.perf_counter()
        with torch.inference_mode():
            model(torch.ones(1, WIDTH))
        return time.perf_counter() - started
    finally:
        host_tier._populate_soon = saved
        t.purge()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(
        f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"torch {torch.__version__}"
    )
    with torch.inference_mode():
        mlp(2)(torch.ones(1, WIDTH))  # torch's own first-call set-up, paid once here
    with tempfile.TemporaryDirectory() as d, nats_server(Path(d) / "nats") as server:
        tmp = Path(d)
        weights = tmp / "m100.pt"
        write_mlp(weights, 100, seed=1)
        mb = weights.stat().st_size / 1e6
        f = asyncio.run(fetches(server.url, weights, tmp, args.repeat))
        print(
            f"\nfetch {mb:.0f} MB into a file: ordered push consumer {f['ordered'] * 1000:.0f} ms, "
            f"batched pull {f['pull'] * 1000:.0f} ms ({f['ordered'] / f['pull']:.1f}x)"
        )
        print(
            f"into the host tier: file + unpickle {f['file'] * 1000:.0f} ms, "
            f"blob streamed {f['blob'] * 1000:.0f} ms ({f['file'] / f['blob']:.2f}x)"
        )
        b = builds(tmp, args.repeat)
        print(
            f"build 1,000-layer MLP on shared weights: to_empty + assign "
            f"{b['to_empty + assign'] * 1000:.0f} ms, one walk {b['one walk'] * 1000:.0f} ms "
            f"({b['to_empty + assign'] / b['one walk']:.1f}x)"
        )
        faulted = statistics.median(first_forward(weights, False) for _ in range(args.repeat))
        populated = statistics.median(first_forward(weights, True) for _ in range(args.repeat))
        print(
            f"first forward, 100-layer MLP on shared weights: pages faulted in "
            f"{faulted * 1000:.1f} ms, populated while built {populated * 1000:.1f} ms"
        )
        c = asyncio.run(chunk_sizes(server.url, weights, args.repeat))
        (fs, bs), (fl, bl) = c.chunks[SMALL], c.chunks[LARGE]
        print(
            f"\nchunk size: the same weights pushed in 128 KiB chunks (file {fs}, blob {bs}) "
            f"and in 1 MiB chunks (file {fl}, blob {bl}), alternated"
        )
        for step, what in (
            ("push", f"push {mb:.0f} MB (ModelStore.push: the file, its blob made and put)"),
            ("put", f"put {mb:.0f} MB file alone (ObjectStore.put)"),
            ("fill", f"fetch {c.blob_mb:.0f} MB into the host tier (.blob, fill_host_tier)"),
            ("receive", f"receive {c.blob_mb:.0f} MB blob, nothing written or hashed"),
        ):
            small, large = c.medians[step][SMALL], c.medians[step][LARGE]
            (s0, s1), (l0, l1) = c.ranges[step][SMALL], c.ranges[step][LARGE]
            print(
                f"{what}: 128 KiB chunks {small * 1000:.0f} ms, "
                f"1 MiB chunks {large * 1000:.0f} ms ({small / large:.2f}x; "
                f"ranges {s0 * 1000:.0f}-{s1 * 1000:.0f} / {l0 * 1000:.0f}-{l1 * 1000:.0f} ms)"
            )


if __name__ == "__main__":
    main()

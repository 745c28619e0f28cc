"""Model weights in the JetStream object store, cached on the worker's disk.

`get()` without `writeinto` rebuilds large objects by concatenation (about 9 s for
64 MiB here), and with it reads at about 50 MB/s; fetches pull the object's chunks
in batches straight from its stream (100 MB in about 0.13 s) into a file. Files
are keyed by the object's digest, so a re-pushed model is re-fetched.

Push also stores the file's own SHA-256 and size in the object's headers; a fetch
hashes the bytes as they arrive, and a blob that is corrupt or truncated (or whose
chunks are gone) is refused with `model_unavailable`, nothing left in the cache.
The client's digest check alone does not cover these: it trusts whatever was put
last, and waits forever for chunks that are missing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
from pathlib import Path
from typing import IO, Any

import nats.errors
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import DigestMismatchError, ObjectDeletedError, ObjectNotFoundError
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, ObjectStore

from shared import jetstream
from shared.errors import GfaasError
from shared.names import check_name, is_valid_name, name_problem
from shared.schema import ErrorCode

SHA256_HEADER = "Gfaas-Sha256"
SIZE_HEADER = "Gfaas-Size"
# A fetch that receives nothing for this long is given up (chunks lost in the store).
STALL_S = 30.0
# Chunks (128 KiB each) asked for in one pull: 32 MiB in flight.
FETCH_BATCH = 256


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _header(info: api.ObjectInfo, key: str) -> str | None:
    """A header of the object (lists, as Go's nats.Header writes them, or strings)."""
    value = (info.headers or {}).get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) else None


class _HashingWriter:
    """What the client streams into: the file, hashed and counted on the way."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._f.write(data)


class ModelStore:
    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    @classmethod
    async def open(cls, js: JetStreamContext, *, replicas: int = 1) -> ModelStore:
        return cls(await jetstream.models_store(js, replicas=replicas))

    async def push(self, name: str, path: Path) -> int:
        check_name("model", name)  # an object name, and a file name in every cache
        digest = await asyncio.to_thread(file_sha256, path)
        meta = api.ObjectMeta(
            name=name,
            headers={SHA256_HEADER: [digest], SIZE_HEADER: [str(path.stat().st_size)]},
        )
        with path.open("rb") as f:
            info = await self._store.put(name, f, meta=meta)
        return int(info.size or 0)

    async def fetch(self, name: str, cache_dir: Path) -> Path:
        """A local file holding the model's current weights (downloaded if needed)."""
        if not is_valid_name(name):  # `../x` would be a file outside `cache_dir`
            raise GfaasError(ErrorCode.MODEL_UNAVAILABLE, name_problem("model", name))
        try:
            info = await self._store.get_info(name)
        except (ObjectNotFoundError, ObjectDeletedError):
            raise GfaasError(
                ErrorCode.MODEL_UNAVAILABLE, f"model {name!r} is not in the model store"
            ) from None
        digest = (info.digest or "none").replace("SHA-256=", "").replace("/", "_")
        target = cache_dir / f"{name}-{digest.rstrip('=')}.bin"
        if target.exists():
            return target
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".part{os.getpid()}")
        try:
            await self._check_chunks(name, info)
            with partial.open("wb") as f:
                writer = _HashingWriter(f)
                await self._download(name, info, writer)
            _verify(name, info, writer)
        except DigestMismatchError:
            partial.unlink(missing_ok=True)
            raise GfaasError(
                ErrorCode.MODEL_UNAVAILABLE, f"model {name!r} is corrupt in the store"
            ) from None
        except (ObjectNotFoundError, ObjectDeletedError):
            partial.unlink(missing_ok=True)
            raise GfaasError(
                ErrorCode.MODEL_UNAVAILABLE, f"model {name!r} is not in the model store"
            ) from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)
        return target

    async def _check_chunks(self, name: str, info: api.ObjectInfo) -> None:
        """Refuse at once an object whose chunks are not all in the stream (the
        client would wait for them forever). Skipped where the client hides them."""
        js: Any = getattr(self._store, "_js", None)
        stream = getattr(self._store, "_stream", None)
        bucket = getattr(self._store, "_name", None)
        if js is None or not stream or not bucket or not info.chunks:
            return
        subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=info.nuid)
        state = (await js.stream_info(stream, subjects_filter=subject)).state
        have = int((state.subjects or {}).get(subject, 0))
        if have != info.chunks:
            raise GfaasError(
                ErrorCode.MODEL_UNAVAILABLE,
                f"model {name!r} is truncated in the store: {have} of {info.chunks} chunks",
            )

    async def _download(self, name: str, info: api.ObjectInfo, writer: _HashingWriter) -> None:
        """Stream the object's chunks into `writer`, giving up when nothing arrives for
        STALL_S.

        Batches of chunks are pulled, not pushed: the client's `get(writeinto=...)`
        reads through an ordered push consumer and hops to a thread for every chunk,
        about 50 MB/s here (2.0 s for 100 MB); pulling FETCH_BATCH chunks a request
        reads the same 100 MB in about 0.13 s."""
        js: Any = getattr(self._store, "_js", None)
        stream = getattr(self._store, "_stream", None)
        bucket = getattr(self._store, "_name", None)
        if js is None or not stream or not bucket:
            await self._download_pushed(name, info, writer)  # a client that hides them
            return
        chunks = int(info.chunks or 0)
        if chunks == 0:
            return
        subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=info.nuid)
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.ALL,
            inactive_threshold=STALL_S,  # the server forgets it if this fetch dies
        )
        sub = await js.pull_subscribe(subject, stream=stream, config=config)
        try:
            got = 0
            while got < chunks:
                try:
                    batch = await sub.fetch(min(FETCH_BATCH, chunks - got), timeout=STALL_S)
                except nats.errors.TimeoutError:
                    raise _stalled(name, info, writer) from None
                for msg in batch:
                    writer.write(msg.data)
                got += len(batch)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _download_pushed(
        self, name: str, info: api.ObjectInfo, writer: _HashingWriter
    ) -> None:
        task = asyncio.ensure_future(self._store.get(name, writeinto=writer))  # type: ignore[arg-type]
        seen = 0
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=STALL_S)
                if done:
                    task.result()
                    return
                if writer.size == seen:
                    raise _stalled(name, info, writer)
                seen = writer.size
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def size(self, name: str) -> int:
        """The stored size of a model's weights in bytes; 0 when it is not there."""
        try:
            info = await self._store.get_info(name)
        except (ObjectNotFoundError, ObjectDeletedError):
            return 0
        return int(info.size or 0)

    async def list(self) -> list[tuple[str, int]]:
        try:
            infos = await self._store.list()
        except Exception as exc:
            if "no objects" in str(exc).lower() or type(exc).__name__ == "NotFoundError":
                return []
            raise
        return sorted((i.name, int(i.size or 0)) for i in infos if not i.deleted)


def _stalled(name: str, info: api.ObjectInfo, writer: _HashingWriter) -> GfaasError:
    return GfaasError(
        ErrorCode.MODEL_UNAVAILABLE,
        f"model {name!r} is truncated in the store: no data for {STALL_S:g} s "
        f"after {writer.size} of {info.size} bytes",
    )


def _verify(name: str, info: api.ObjectInfo, writer: _HashingWriter) -> None:
    """The bytes received are the ones pushed: size and SHA-256 as recorded at push.

    Objects pushed without the headers (older clients) are checked for size only;
    the client has checked its own digest."""
    expected_size = _header(info, SIZE_HEADER)
    sizes = {writer.size, int(info.size or 0)}
    if expected_size is not None:
        sizes.add(int(expected_size))
    if len(sizes) > 1:
        raise GfaasError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"model {name!r} is truncated in the store: {writer.size} bytes received, "
            f"{expected_size or info.size} pushed",
        )
    recorded = (info.digest or "").removeprefix("SHA-256=").removeprefix("sha-256=")
    if recorded:
        try:
            matches = base64.urlsafe_b64decode(recorded) == writer.sha.digest()
        except ValueError:
            matches = False
        if not matches:  # the object's own digest, as the client would check it
            raise GfaasError(ErrorCode.MODEL_UNAVAILABLE, f"model {name!r} is corrupt in the store")
    expected = _header(info, SHA256_HEADER)
    got = writer.sha.hexdigest()
    if expected is not None and got != expected:
        raise GfaasError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"model {name!r} is corrupt in the store: sha256 {got[:16]}... "
            f"does not match {expected[:16]}... recorded at push",
        )

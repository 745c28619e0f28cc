"""Model weights in the JetStream object store, cached on the worker's disk.

`get()` without `writeinto` rebuilds large objects by concatenation (about 9 s for
64 MiB here), and with it reads at about 50 MB/s; fetches pull the object's chunks
in batches straight from its stream (7.6x faster for 100 MB: bench.weights_load).
Files are keyed by the object's digest, so a re-pushed model is re-fetched.

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
import mmap
import os
import secrets
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import anyio
import nats.errors
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import DigestMismatchError, ObjectDeletedError, ObjectNotFoundError
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, ObjectStore

from shared import jetstream
from shared.auth import may_delete_consumers
from shared.errors import GfaasError
from shared.logs import get_logger
from shared.names import check_name, is_valid_name, name_problem
from shared.schema import ErrorCode

if TYPE_CHECKING:  # the host tier imports torch: clients that only push need not
    from shared.modelswap.host_tier import HostModel, HostTier, Pending

log = get_logger("modelstore")

T = TypeVar("T")

SHA256_HEADER = "Gfaas-Sha256"
SIZE_HEADER = "Gfaas-Size"
# A loading-optimised copy (the host tier's layout) is stored beside each model under
# this suffix: a name no model can have (model names have no dot); its header says
# which original (by SHA-256) it was made from.
BLOB_SUFFIX = ".blob"
SOURCE_HEADER = "Gfaas-Source-Sha256"
# A fetch that receives nothing for this long is given up (chunks lost in the store).
STALL_S = 30.0
# A fetch's pull consumer is forgotten by the server once no pull of it has waited
# for this long: a fetch pulls again as soon as it has written its last batch (its
# waits are REPLACED_POLL_S long), so only a consumer whose fetch is done or died
# goes. That is how a service's fetch ends its consumer (no service may delete one:
# shared.auth); the admin's deletes it at once.
CONSUMER_IDLE_S = 5.0
# Pushes store chunks of this size, or of the server's max_payload where that is
# smaller: 100 MB is 100 messages instead of the client's default 800 of 128 KiB,
# and a fetch pays the per-message work (the server's, the parser's, a write) an
# eighth as often. bench.weights_load: pushes 1.4-2.0x faster, the receive alone
# 1.1-1.2x; a fill of the host tier gains within this machine's noise, since most
# of it is hashing and the first writes into a fresh segment, not the receive.
CHUNK_BYTES = 1024 * 1024
# Bytes of chunks asked for in one pull (256 of the old 128 KiB): in flight at once.
FETCH_BYTES = 32 * 1024 * 1024
# A process that only maps the host tier looks for its agent's copy this often, and
# for at most this long (the agent's fill of a large model from the store included).
MAPPED_POLL_S = 0.05
MAPPED_WAIT_S = 300.0
# A fetch waiting for chunks looks this often whether its object was replaced.
REPLACED_POLL_S = 1.0
# Fetches of a model a push replaced while it was fetched (the old chunks purged),
# before its error stands: each new try is for weights pushed since the last.
REPUSHED_TRIES = 3


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


class ModelChangedError(ValueError):
    """The file pushed changed while it was read."""


class _Pinned:
    """The file as the client reads it to put, refused (at its end) unless its bytes
    are the `size` bytes hashed to `digest`."""

    def __init__(self, f: IO[bytes], path: Path, digest: str, size: int) -> None:
        self._f = f
        self._path = path
        self._digest = digest
        self._size = size
        self._sha = hashlib.sha256()
        self._read = 0

    def readinto(self, buffer: bytearray) -> int:
        n = self._f.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            self._sha.update(memoryview(buffer)[:n])
            self._read += n
            if self._read <= self._size:
                return int(n)
        if self._read != self._size or self._sha.hexdigest() != self._digest:
            raise ModelChangedError(
                f"{self._path} changed while it was pushed ({self._read} bytes read, "
                f"{self._size} hashed): nothing was stored; push it again once it is complete"
            )
        return 0


class _PutSubjects:
    """A JetStream context that passes everything on to `js`, noting the subject a
    put of bucket `bucket` sends its chunks to, and whether it sent the record."""

    def __init__(self, js: Any, bucket: str) -> None:
        self._js = js
        self._chunk_prefix = f"$O.{bucket}.C."
        self._record_prefix = f"$O.{bucket}.M."
        self.chunks: str | None = None
        self.record_sent = False

    async def publish(self, subject: str, *args: Any, **kwargs: Any) -> Any:
        if subject.startswith(self._chunk_prefix):
            self.chunks = subject
        elif subject.startswith(self._record_prefix):
            self.record_sent = True  # before it is sent: it may land, unacknowledged
        return await self._js.publish(subject, *args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._js, attr)


class ModelStore:
    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        # One download per file at a time in this process: the prefetcher and a
        # cold load asking for the same model wait for one copy, not race two.
        self._fetching: dict[Path, asyncio.Lock] = {}

    @classmethod
    async def open(cls, js: JetStreamContext, *, replicas: int = 1) -> ModelStore:
        return cls(await jetstream.models_store(js, replicas=replicas))

    async def push(self, name: str, path: Path) -> int:
        """Store the weights file, and beside it the same tensors in the host tier's
        layout (when the file is a mapping of tensors), so that a node maps them
        without unpickling. The original is what `fetch` gives and what is sized."""
        check_name("model", name)  # an object name, and a file name in every cache
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest = await asyncio.to_thread(lambda: hashlib.file_digest(f, "sha256").hexdigest())
            f.seek(0)
            meta = api.ObjectMeta(
                name=name,
                headers={SHA256_HEADER: [digest], SIZE_HEADER: [str(size)]},
                options=self._chunking(),
            )
            # Its bytes as they are put must be the ones hashed: a file still being
            # written (a checkpoint a training run is saving) fails the put, whose new
            # chunks the client then purges, and the version stored before stays.
            pinned: Any = _Pinned(f, path, digest, size)  # read as the client reads a file
            info = await self._put(name, pinned, meta)
        await self._push_blob(name, path, digest)
        return int(info.size or 0)

    async def _push_blob(self, name: str, path: Path, source: str) -> None:
        blob = path.with_name(f".{path.name}.gfaas-blob{os.getpid()}")
        try:
            made = await asyncio.to_thread(_make_blob, path, blob)
            # Made from the file as it is now: from the weights just stored only if it
            # has not changed since (else nodes filled from it would serve other weights
            # than the original's, under its digest).
            changed = made and await asyncio.to_thread(file_sha256, path) != source
            if not made or changed:  # nodes load the original
                with contextlib.suppress(ObjectNotFoundError, ObjectDeletedError):
                    await self._store.delete(name + BLOB_SUFFIX)
                if changed:
                    raise ModelChangedError(
                        f"{path} changed while it was pushed: model {name!r} is stored as "
                        "it was first read, without its loading copy; push it again once "
                        "it is complete"
                    )
                return
            digest = await asyncio.to_thread(file_sha256, blob)
            headers = {
                SHA256_HEADER: [digest],
                SIZE_HEADER: [str(blob.stat().st_size)],
                SOURCE_HEADER: [source],
            }
            meta = api.ObjectMeta(
                name=name + BLOB_SUFFIX, headers=headers, options=self._chunking()
            )
            with blob.open("rb") as f:
                await self._put(name + BLOB_SUFFIX, f, meta)
        finally:
            blob.unlink(missing_ok=True)

    async def _put(self, name: str, data: Any, meta: api.ObjectMeta) -> api.ObjectInfo:
        """The client's put, whose chunks are purged however it ends before the object
        is stored: the client purges them on an error only, and a push cancelled
        midway (Ctrl-C) left them in the stream for good, never named by any object."""
        js: Any = getattr(self._store, "_js", None)
        stream = getattr(self._store, "_stream", None)
        bucket = getattr(self._store, "_name", None)
        if js is None or not stream or not bucket:
            return await self._store.put(name, data, meta=meta)
        seen = _PutSubjects(js, bucket)
        try:
            return await ObjectStore(bucket, stream, seen).put(name, data, meta=meta)  # type: ignore[arg-type]
        except BaseException:
            if seen.chunks is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    await self._purge_unstored(name, stream, seen)
            raise

    async def _purge_unstored(self, name: str, stream: str, seen: _PutSubjects) -> None:
        """Purge a put's chunks unless its object was stored (its record published:
        the object is the put's own, whose chunks must stay)."""
        assert seen.chunks is not None
        if seen.record_sent:
            try:
                info = await self._store.get_info(name)
            except (ObjectNotFoundError, ObjectDeletedError):
                pass
            except Exception:
                return  # not known whether it was stored: left, not risked
            else:
                if seen.chunks.endswith(f".{info.nuid}"):
                    return
        with contextlib.suppress(Exception):
            js: Any = getattr(self._store, "_js", None)
            await js.purge_stream(stream, subject=seen.chunks)
            log.info("model.push_chunks_purged", model=name)

    def _chunking(self) -> api.ObjectMetaOptions:
        """Chunks as large as the server lets one message be, up to CHUNK_BYTES (the
        object store's chunks carry no headers: the payload is the whole message)."""
        js: Any = getattr(self._store, "_js", None)
        limit = int(getattr(getattr(js, "_nc", None), "max_payload", 0) or 0)
        return api.ObjectMetaOptions(max_chunk_size=min(CHUNK_BYTES, limit or CHUNK_BYTES))

    async def fill_host_tier(self, name: str, tier: HostTier) -> HostModel | None:
        """The model in the node's host tier: there already, or streamed into it from
        its stored blob (no file, no unpickling). None where it has no usable blob
        (pushed by an older client, not a mapping of tensors, corrupt, or made from
        other weights than the current ones): the caller loads the original."""
        try:
            info = await self._store.get_info(name)
        except (ObjectNotFoundError, ObjectDeletedError):
            return None
        key = cache_stem(name, info)
        host = tier.cached(name, key)
        if host is not None:
            return host
        if tier.readonly:
            return await _mapped(name, key, tier)
        try:
            blob = await self._store.get_info(name + BLOB_SUFFIX)
        except (ObjectNotFoundError, ObjectDeletedError):
            return None
        source = _header(info, SHA256_HEADER)
        if source is None or _header(blob, SOURCE_HEADER) != source or not blob.size:
            return None
        # One process fills it; the others wait, then map what it wrote.
        lock = await _taken(lambda: tier.lock(name, key), tier.unlock)
        try:
            host = tier.cached(name, key)
            if host is None:
                host = await self._fill(name, key, blob, tier)
        finally:
            tier.unlock(lock)
        return host

    async def _fill(
        self, name: str, key: str, blob: api.ObjectInfo, tier: HostTier
    ) -> HostModel | None:
        pending = await _taken(lambda: tier.pending(name, key, int(blob.size or 0)), _abort)
        try:
            writer = _BufferWriter(pending.segment.mm)
            await self._check_chunks(name + BLOB_SUFFIX, blob)
            await self._download(name + BLOB_SUFFIX, blob, writer)
            _verify(name + BLOB_SUFFIX, blob, writer)
            await asyncio.to_thread(pending.commit)
            tier.loads += 1
            tier.blob_loads += 1
        except Exception as exc:
            # Off the event loop: it waits for the segment's populate thread.
            await asyncio.to_thread(pending.abort)
            log.warning("model.blob_unusable", model=name, error=str(exc))
            return None
        except BaseException:
            pending.abort()
            raise
        return tier.cached(name, key)

    async def fetch(self, name: str, cache_dir: Path) -> Path:
        """A local file holding the model's current weights (downloaded if needed)."""
        if not is_valid_name(name):  # `../x` would be a file outside `cache_dir`
            raise GfaasError(ErrorCode.MODEL_UNAVAILABLE, name_problem("model", name))
        info = await self._info(name)
        for _ in range(REPUSHED_TRIES - 1):
            try:
                return await self._fetch_current(name, info, cache_dir)
            except GfaasError as exc:
                if exc.code is not ErrorCode.MODEL_UNAVAILABLE:
                    raise
                # A push under the name since `info` was read purges that object's
                # chunks once its own are in: what looked truncated was replaced,
                # and the caller wants the new weights, not this error.
                newer = await self._info(name)
                if newer.nuid == info.nuid:
                    raise
                log.info("model.repushed_during_fetch", model=name)
                info = newer
        return await self._fetch_current(name, info, cache_dir)

    async def _info(self, name: str) -> api.ObjectInfo:
        try:
            return await self._store.get_info(name)
        except (ObjectNotFoundError, ObjectDeletedError):
            raise GfaasError(
                ErrorCode.MODEL_UNAVAILABLE, f"model {name!r} is not in the model store"
            ) from None

    async def _fetch_current(self, name: str, info: api.ObjectInfo, cache_dir: Path) -> Path:
        """The file of the object `info` describes, downloaded if it is not cached."""
        target = cache_dir / f"{cache_stem(name, info)}.bin"
        if target.exists():
            return target
        lock = self._fetching.setdefault(target, asyncio.Lock())
        try:
            async with lock:
                if not target.exists():  # the holder before us may have fetched it
                    await self._fetch_into(name, info, target)
        finally:
            if not lock.locked() and self._fetching.get(target) is lock:
                del self._fetching[target]
        return target

    async def _fetch_into(self, name: str, info: api.ObjectInfo, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own: another process (or a container with the same pid)
        # filling the same cache directory writes its own file, and the last
        # atomic rename wins with the same bytes.
        partial = target.with_suffix(f".part{os.getpid()}-{secrets.token_hex(4)}")
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

    async def _check_chunks(self, name: str, info: api.ObjectInfo, what: str = "model") -> None:
        """Refuse at once an object whose chunks are not all in the stream (the
        client would wait for them forever). Skipped where the client hides them.
        `what` the object is, for the refusal."""
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
                f"{what} {name!r} is truncated in the store: {have} of {info.chunks} chunks",
            )

    async def _download(
        self, name: str, info: api.ObjectInfo, writer: _HashingWriter, what: str = "model"
    ) -> None:
        """Stream the object's chunks into `writer`, giving up when nothing arrives for
        STALL_S.

        Batches of chunks are pulled, not pushed: the client's `get(writeinto=...)`
        reads through an ordered push consumer and hops to a thread for every chunk,
        2.0 s for 100 MB here; pulling FETCH_BYTES of chunks a request reads and writes
        the same 100 MB in about 0.27 s (bench.weights_load)."""
        js: Any = getattr(self._store, "_js", None)
        stream = getattr(self._store, "_stream", None)
        bucket = getattr(self._store, "_name", None)
        if js is None or not stream or not bucket:
            await self._download_pushed(name, info, writer, what)  # a client that hides them
            return
        chunks = int(info.chunks or 0)
        if chunks == 0:
            return
        # Objects keep the chunk size they were pushed with (older pushes: 128 KiB).
        batch_size = max(1, FETCH_BYTES // max(1, -(-int(info.size or 0) // chunks)))
        subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=info.nuid)
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.ALL,
            inactive_threshold=CONSUMER_IDLE_S,  # how a service's fetch ends it
        )
        sub = await js.pull_subscribe(subject, stream=stream, config=config)
        # Each batch is written and hashed in a thread while the next one arrives
        # (hashing lets go of the GIL): the two overlap instead of adding up.
        writing: asyncio.Future[None] | None = None
        try:
            got = 0
            while got < chunks:
                batch = await self._next_batch(
                    sub, min(batch_size, chunks - got), name, info, writer, what
                )
                if writing is not None:
                    await writing
                data = [msg.data for msg in batch]
                writing = asyncio.ensure_future(asyncio.to_thread(_write_all, writer, data))
                got += len(batch)
            if writing is not None:
                await writing
        finally:
            if writing is not None and not writing.done():
                await asyncio.gather(writing, return_exceptions=True)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            # Unsubscribing leaves the consumer on the server until its inactive
            # threshold (CONSUMER_IDLE_S). Under authentication no service may delete a
            # consumer (shared.auth): a refused delete is logged as a permissions
            # violation on the connection (and its reply waited 5 s for), so only an
            # identity that may delete one sends it; not waited for.
            consumer = getattr(sub, "_consumer", None)
            if consumer and may_delete_consumers(_user_of(js)):
                _in_background(_delete_consumer(js, stream, consumer))

    async def _next_batch(
        self,
        sub: Any,
        want: int,
        name: str,
        info: api.ObjectInfo,
        writer: _HashingWriter,
        what: str,
    ) -> list[Any]:
        """Up to `want` chunks. Waited for in slices of REPLACED_POLL_S, looking
        between them whether the object was pushed again or removed (its chunks are
        purged then, and would never come): that is said at once, where waiting for
        STALL_S held a load racing a push up for that long."""
        waited = 0.0
        while True:
            wait = min(REPLACED_POLL_S, STALL_S - waited)
            try:
                return list(await sub.fetch(want, timeout=wait))
            except nats.errors.TimeoutError:
                waited += wait
            if await self._replaced(name, info):
                raise GfaasError(
                    ErrorCode.MODEL_UNAVAILABLE,
                    f"{what} {name!r} was pushed again or removed while it was fetched "
                    f"(after {writer.size} of {info.size} bytes)",
                )
            if waited >= STALL_S:
                raise _stalled(name, info, writer, what)

    async def _replaced(self, name: str, info: api.ObjectInfo) -> bool:
        """Is the store's object `name` no longer the one `info` describes?"""
        try:
            now = await self._store.get_info(name)
        except (ObjectNotFoundError, ObjectDeletedError):
            return True
        except Exception:
            return False  # not known: the caller waits on
        return now.nuid != info.nuid

    async def _download_pushed(
        self, name: str, info: api.ObjectInfo, writer: _HashingWriter, what: str = "model"
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
                    raise _stalled(name, info, writer, what)
                seen = writer.size
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def current(self, name: str) -> tuple[str, int] | None:
        """What a node keys the model's current weights by (`cache_stem`) and their
        size; None when the store has no such model."""
        if not is_valid_name(name):
            return None
        try:
            info = await self._store.get_info(name)
        except (ObjectNotFoundError, ObjectDeletedError):
            return None
        return cache_stem(name, info), int(info.size or 0)

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
        return sorted(
            (i.name, int(i.size or 0))
            for i in infos
            if not i.deleted and not i.name.endswith(BLOB_SUFFIX)
        )


async def _mapped(name: str, key: str, tier: HostTier) -> HostModel:
    """The model as the node's agent puts it into the tier, for a process that only
    maps the tier (an instance as the handler user: a segment it made, a handler of
    that user could write into). It waits for the agent's fill (the node-wide lock
    on loading the model), and looks again while none has begun; the agent stops
    the instance if its fill fails."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MAPPED_WAIT_S
    while True:
        lock = await _taken(lambda: tier.lock(name, key), tier.unlock)
        try:
            host = tier.cached(name, key)
        finally:
            tier.unlock(lock)
        if host is not None:
            return host
        if loop.time() > deadline:
            raise GfaasError(
                ErrorCode.MODEL_UNAVAILABLE,
                f"model {name!r} did not reach the node's host tier within "
                f"{MAPPED_WAIT_S:g} s (this instance only maps it; its agent puts it there)",
            )
        await asyncio.sleep(MAPPED_POLL_S)


async def _taken(take: Callable[[], T], give_back: Callable[[T], None]) -> T:
    """`take()` in a thread (a blocking flock, a segment made). A thread cannot be
    cancelled: where the caller is (its load given up, its build failed), what the
    thread still takes is given back once it has it. Left to itself, a lock taken
    after the caller had gone stayed held by this process for good, and every later
    fill of that model, on the whole node, waited for it forever."""
    task = asyncio.ensure_future(asyncio.to_thread(take))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:

        def settle(done: asyncio.Future[T]) -> None:
            if not done.cancelled() and done.exception() is None:
                # In a thread: giving a segment back waits for its populate thread.
                loop.run_in_executor(None, give_back, done.result())

        loop = asyncio.get_running_loop()
        task.add_done_callback(settle)
        raise


# Tasks started and not waited for, held until they end (the loop holds them weakly).
_background: set[asyncio.Task[None]] = set()


def _in_background(work: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(work)
    _background.add(task)
    task.add_done_callback(_background.discard)


def _user_of(js: Any) -> str:
    """The NATS user a JetStream context's connection authenticated as ("" for none)."""
    options = getattr(getattr(js, "_nc", None), "options", None)
    user = options.get("user") if isinstance(options, dict) else None
    return user if isinstance(user, str) else ""


async def _delete_consumer(js: Any, stream: str, consumer: str) -> None:
    with contextlib.suppress(Exception):
        await js.delete_consumer(stream, consumer)


def _abort(pending: Pending) -> None:
    pending.abort()


def cache_stem(name: str, info: api.ObjectInfo) -> str:
    """What a node keys a model's current weights by (its cache file, its host-tier
    segment): the name and the stored object's digest, so a re-push is a new key."""
    digest = (info.digest or "none").replace("SHA-256=", "").replace("/", "_")
    return f"{name}-{digest.rstrip('=')}"


class _BufferWriter(_HashingWriter):
    """Streams into a mapped segment instead of a file (hashed and counted)."""

    def __init__(self, mm: mmap.mmap) -> None:
        self._mm = mm
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        end = self.size + len(data)
        if end > len(self._mm):
            raise GfaasError(ErrorCode.MODEL_UNAVAILABLE, "blob longer than recorded")
        self._mm[self.size : end] = data
        self.sha.update(data)
        self.size = end
        return len(data)


def _write_all(writer: _HashingWriter, data: list[bytes]) -> None:
    for chunk in data:
        writer.write(chunk)


def _make_blob(path: Path, blob: Path) -> bool:
    """Write `path`'s tensors in the host tier's layout to `blob`; False when the file
    is not a flat mapping of tensors (then there is no blob). torch is imported here
    only: clients that never push need not load it."""
    import torch

    from shared.modelswap.host_tier import write_blob

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        return False
    write_blob(state, blob)
    return True


def _stalled(
    name: str, info: api.ObjectInfo, writer: _HashingWriter, what: str = "model"
) -> GfaasError:
    return GfaasError(
        ErrorCode.MODEL_UNAVAILABLE,
        f"{what} {name!r} is truncated in the store: no data for {STALL_S:g} s "
        f"after {writer.size} of {info.size} bytes",
    )


def _verify(name: str, info: api.ObjectInfo, writer: _HashingWriter, what: str = "model") -> None:
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
            f"{what} {name!r} is truncated in the store: {writer.size} bytes received, "
            f"{expected_size or info.size} pushed",
        )
    recorded = (info.digest or "").removeprefix("SHA-256=").removeprefix("sha-256=")
    if recorded:
        try:
            matches = base64.urlsafe_b64decode(recorded) == writer.sha.digest()
        except ValueError:
            matches = False
        if not matches:  # the object's own digest, as the client would check it
            raise GfaasError(
                ErrorCode.MODEL_UNAVAILABLE, f"{what} {name!r} is corrupt in the store"
            )
    expected = _header(info, SHA256_HEADER)
    got = writer.sha.hexdigest()
    if expected is not None and got != expected:
        raise GfaasError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"{what} {name!r} is corrupt in the store: sha256 {got[:16]}... "
            f"does not match {expected[:16]}... recorded at push",
        )

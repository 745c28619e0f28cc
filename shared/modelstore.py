"""Model weights in the JetStream object store, cached on the worker's disk.

`get()` without `writeinto` rebuilds large objects by concatenation (about 9 s for
64 MiB here); streaming into a file takes a fraction of that, so fetches always
stream. Files are keyed by the object's digest, so a re-pushed model is re-fetched.
"""

from __future__ import annotations

import os
from pathlib import Path

from nats.js.client import JetStreamContext
from nats.js.errors import DigestMismatchError, ObjectDeletedError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from shared import jetstream
from shared.errors import GfaasError
from shared.schema import ErrorCode


class ModelStore:
    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    @classmethod
    async def open(cls, js: JetStreamContext, *, replicas: int = 1) -> ModelStore:
        return cls(await jetstream.models_store(js, replicas=replicas))

    async def push(self, name: str, path: Path) -> int:
        with path.open("rb") as f:
            info = await self._store.put(name, f)
        return int(info.size or 0)

    async def fetch(self, name: str, cache_dir: Path) -> Path:
        """A local file holding the model's current weights (downloaded if needed)."""
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
            with partial.open("wb") as f:
                await self._store.get(name, writeinto=f)
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
        partial.replace(target)
        return target

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

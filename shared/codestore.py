"""Code bundles in the JetStream object store (bucket gfaas_code, shared.jetstream).

Each version is an object of its own, named by its reference (`NAME@sha256:<hex>`),
so a spec pinning an older version still finds it after a newer one is pushed, and
pushing the same content again finds it there and writes nothing. Only the admin may
write the bucket (shared/auth.py `_JS_DENY`); a node still hashes what it fetches
(shared.codebundle.extract), so bytes replaced in the store are refused, not run.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import anyio
from nats.js.client import JetStreamContext
from nats.js.errors import (
    DigestMismatchError,
    NotFoundError,
    ObjectDeletedError,
    ObjectNotFoundError,
)
from nats.js.object_store import ObjectStore

from shared import jetstream
from shared.codebundle import BundleError, BundleRef, parse_ref, sha256_hex
from shared.errors import GfaasError
from shared.modelstore import ModelStore, _HashingWriter, _verify
from shared.names import is_valid_name, name_problem

# A fetch that has not finished by then is given up (chunks lost in the store).
FETCH_TIMEOUT_S = 60.0


def _stored_sha256(digest: str | None) -> str:
    """The hex SHA-256 an object's info records (`SHA-256=<base64>`), or ""."""
    recorded = (digest or "").removeprefix("SHA-256=").removeprefix("sha-256=")
    try:
        return base64.urlsafe_b64decode(recorded).hex() if recorded else ""
    except ValueError:
        return ""


class CodeStore:
    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    @classmethod
    async def open(cls, js: JetStreamContext, *, replicas: int = 1) -> CodeStore:
        """The store, created if need be: the admin's (a service may not create it)."""
        return cls(await jetstream.code_store(js, replicas=replicas))

    @classmethod
    async def existing(cls, js: JetStreamContext) -> CodeStore:
        """The store as the admin created it, for reading (a node's agent); a
        BundleError when nothing was ever pushed."""
        try:
            return cls(await js.object_store(jetstream.CODE_BUCKET))
        except NotFoundError:
            raise BundleError(
                "there is no code store: no bundle was ever pushed (gfaas code push)"
            ) from None

    async def push(self, name: str, data: bytes) -> tuple[BundleRef, bool]:
        """Store a packed bundle under `name`: its reference, and whether it was
        written (False: that version was there already, intact)."""
        if not is_valid_name(name):
            raise BundleError(name_problem("code bundle", name))
        ref = BundleRef(name, sha256_hex(data))
        try:
            info = await self._store.get_info(str(ref))
        except (ObjectNotFoundError, ObjectDeletedError):
            info = None
        if info is not None and _stored_sha256(info.digest) == ref.digest:
            return ref, False
        await self._store.put(str(ref), data)
        return ref, True

    async def problem(self, ref: BundleRef) -> str | None:
        """Why a deploy pinning `ref` would fail at its first instance (the version is
        not stored, or the object there is not those bytes), or None. What the store
        records, not the bytes: a node hashes those when it extracts them."""
        try:
            info = await self._store.get_info(str(ref))
        except (ObjectNotFoundError, ObjectDeletedError):
            others = await self.versions(ref.name)
            stored = ", ".join(f"sha256:{d[:12]}…" for d in others) or "none"
            return (
                f"code bundle {ref.short} is not in the code store (versions of "
                f"{ref.name!r} there: {stored}); push it with `gfaas code push {ref.name} DIR`"
            )
        stored_digest = _stored_sha256(info.digest)
        if stored_digest != ref.digest:
            return (
                f"code bundle {ref.short} in the code store does not match its digest "
                f"(it holds sha256:{stored_digest[:12]}…); push it again"
            )
        return None

    async def stored(self) -> list[tuple[str, int]]:
        """(reference, bytes) of every stored version, sorted."""
        return sorted(
            (i.name, int(i.size or 0))
            for i in await self._infos()
            if not i.deleted and parse_ref_or_none(i.name) is not None
        )

    async def delete(self, ref: BundleRef) -> bool:
        """Remove a stored version (nodes keep what they extracted); False when it is
        not there."""
        try:
            await self._store.delete(str(ref))
        except (ObjectNotFoundError, ObjectDeletedError, NotFoundError):
            return False
        return True

    async def _infos(self) -> list[Any]:
        try:
            return list(await self._store.list())
        except Exception as exc:  # an empty bucket is an error to the client
            if "no objects" in str(exc).lower() or type(exc).__name__ == "NotFoundError":
                return []
            raise

    async def versions(self, name: str) -> list[str]:
        """The digests stored under `name`, sorted."""
        infos = await self._infos()
        prefix = f"{name}@sha256:"
        return sorted(
            i.name.removeprefix(prefix)
            for i in infos
            if not i.deleted and i.name.startswith(prefix)
        )

    async def fetch(self, ref: BundleRef, *, max_bytes: int) -> bytes:
        """The stored bytes of `ref` (not yet verified: `extract` hashes them); a
        BundleError when they are not there, too large, or do not arrive.

        Pulled in batches of chunks as model weights are (shared.modelstore), never
        more than `max_bytes` of them whatever the object's record says its size is
        (the client's own `get` takes every chunk the stream holds under the object,
        into one buffer grown by concatenation), a truncated object refused at once."""
        name = str(ref)
        try:
            info = await self._store.get_info(name)
        except (ObjectNotFoundError, ObjectDeletedError):
            raise BundleError(f"code bundle {ref.short} is not in the code store") from None
        if int(info.size or 0) > max_bytes:
            raise BundleError(
                f"code bundle {ref.short} holds {info.size} bytes in the store, over "
                f"the {max_bytes} a node takes (GFAAS_CODE_BUNDLE_MAX_MB)"
            )
        writer = _CappedWriter(ref, max_bytes)
        chunks = ModelStore(self._store)  # its chunk reader: nothing of models
        what = "code bundle"
        try:
            with anyio.fail_after(FETCH_TIMEOUT_S):
                await chunks._check_chunks(name, info, what)
                await chunks._download(name, info, writer, what)
            _verify(name, info, writer, what)
        except (ObjectNotFoundError, ObjectDeletedError):
            raise BundleError(f"code bundle {ref.short} is not in the code store") from None
        except DigestMismatchError:
            raise BundleError(
                f"code bundle {ref.short} is corrupt in the code store: its chunks do not "
                "match what was stored"
            ) from None
        except GfaasError as exc:  # truncated, or corrupt: the store's record says so
            raise BundleError(exc.reason) from None
        except TimeoutError:
            raise BundleError(
                f"code bundle {ref.short} did not arrive from the code store within "
                f"{FETCH_TIMEOUT_S:g} s (truncated there?)"
            ) from None
        return bytes(writer.data)


class _CappedWriter(_HashingWriter):
    """A bundle's bytes as they arrive, refused past `max_bytes`."""

    def __init__(self, ref: BundleRef, max_bytes: int) -> None:
        self._ref = ref
        self._max = max_bytes
        self.data = bytearray()
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        if self.size + len(data) > self._max:
            raise BundleError(
                f"code bundle {self._ref.short} holds more than the {self._max} bytes a "
                "node takes (GFAAS_CODE_BUNDLE_MAX_MB), though the store records fewer"
            )
        self.data += data
        self.sha.update(data)
        self.size += len(data)
        return len(data)


def parse_ref_or_none(name: str) -> BundleRef | None:
    """The reference an object's name is, or None (not a bundle version's name)."""
    try:
        return parse_ref(name)
    except BundleError:
        return None

"""Code bundles on this node: fetched, verified and extracted by the agent, as root.

`Bundles.ready(ref)` is the directory `<state_dir>/code/<digest>` holding the bundle
(shared/codebundle.py): there already, or fetched from the code store now, hashed
against the digest the spec pins and extracted, once per digest however many starts
ask at once. The agent does it before an instance process is assigned, and a deploy's
sandbox check before its dry run; the instance, as the handler user, only reads it
(`Mounted`): the directory first on its import path, the bundle's packages allowed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import anyio
from nats.js.client import JetStreamContext

from shared.codebundle import (
    BundleError,
    BundleRef,
    Limits,
    extract,
    extracted_packages,
    parse_ref,
)
from shared.codestore import CodeStore
from shared.config import Settings
from shared.logs import get_logger

log = get_logger("gpu_worker")

MB = 1024 * 1024
# Under the state directory: one directory per bundle digest.
CODE_DIR = "code"


def limits_of(settings: Settings) -> Limits:
    return Limits(max_bytes=settings.code_bundle_max_mb * MB)


class Bundles:
    def __init__(self, js: JetStreamContext, settings: Settings) -> None:
        self._js = js
        self.root = settings.state_dir.resolve() / CODE_DIR
        self.limits = limits_of(settings)
        self._store: CodeStore | None = None
        self._locks: dict[str, anyio.Lock] = {}

    def directory(self, ref: BundleRef) -> Path:
        return self.root / ref.digest

    async def ready(self, text: str) -> Path:
        """The extracted bundle `text` ("NAME@sha256:<hex>") names; a BundleError
        saying why it cannot be had (not stored, replaced, unsafe, over a cap)."""
        ref = parse_ref(text)
        final = self.directory(ref)
        if final.is_dir():
            return final
        lock = self._locks.setdefault(ref.digest, anyio.Lock())
        async with lock:
            if final.is_dir():  # another start extracted it meanwhile
                return final
            if self._store is None:  # opened, never created: only the admin may
                self._store = await CodeStore.existing(self._js)
            data = await self._store.fetch(ref, max_bytes=self.limits.max_stored_bytes)
            path = await anyio.to_thread.run_sync(extract, data, ref, self.root, self.limits)
            log.info("code.extracted", bundle=str(ref), bytes=len(data), path=str(path))
            return path


@dataclass(frozen=True)
class Mounted:
    """The one bundle an instance process runs: its reference and top-level packages."""

    ref: str
    directory: Path
    packages: tuple[str, ...]

    @classmethod
    def of(cls, settings: Settings) -> Mounted | None:
        """The bundle the agent assigned this instance (None: none), put first on
        `sys.path` so that its handler's module is found there before anywhere else."""
        if not settings.instance_code:
            return None
        directory = Path(settings.instance_code_dir)
        if not directory.is_dir():
            raise BundleError(
                f"code bundle {settings.instance_code} was not extracted at {directory}"
            )
        if str(directory) not in sys.path:
            sys.path.insert(0, str(directory))
        return cls(settings.instance_code, directory, extracted_packages(directory))

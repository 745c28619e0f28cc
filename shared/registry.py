"""The registry: FunctionSpecs and WorkflowSpecs in JetStream KV buckets, watched
into a cache.

Services read specs from the in-memory cache on the hot path (a dict lookup), and
the watch keeps it current; deploy/rm write the bucket. Functions and workflows
share one namespace of names (both are invoked on `gfaas.v1.invoke.<name>`); the
client's deploy refuses a name the other kind already has.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Generic, Literal, TypeVar

import anyio
import msgspec
import nats.errors
from anyio.abc import TaskStatus
from nats.js.client import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NoKeysError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from shared import jetstream
from shared.logs import get_logger
from shared.names import check_name, is_valid_name
from shared.schema import FunctionSpec, WorkflowSpec, decode, encode

log = get_logger("registry")

S = TypeVar("S", FunctionSpec, WorkflowSpec)


class RegistryWatchError(RuntimeError):
    """The registry's watch cannot go on: its connection is closed."""


class Registry(Generic[S]):
    # Back-off between watches of the bucket (doubling from min to max), and how long a
    # watch may go without a single entry before its initial values are all in.
    rewatch_min_s = 0.1
    rewatch_max_s = 5.0
    sync_idle_s = 10.0
    # How long `watch` tries before it has started, before it gives up.
    start_retry_s = 60.0

    def __init__(self, kv: KeyValue, kind: type[S]) -> None:
        self._kv = kv
        self._kind: type[S] = kind
        # What its keys name, for refusals: "function" or "workflow".
        self._what: Literal["function", "workflow"] = (
            "workflow" if kind is WorkflowSpec else "function"
        )
        self._specs: dict[str, S] = {}
        # The bucket's revision of each spec: its version (every deploy makes one);
        # of a removed one, its removal's.
        self._revisions: dict[str, int] = {}
        self._synced = anyio.Event()
        # Set (and replaced) whenever the watch changes `specs`: `changed` waits on it.
        self._changed = anyio.Event()
        # The watch's current round: has it delivered the bucket's contents, and which
        # keys has it delivered.
        self._round_synced = False
        self._round_seen: set[str] = set()

    @staticmethod
    async def open(js: JetStreamContext, *, replicas: int = 1) -> Registry[FunctionSpec]:
        return Registry(await jetstream.functions_kv(js, replicas=replicas), FunctionSpec)

    @staticmethod
    async def open_workflows(js: JetStreamContext, *, replicas: int = 1) -> Registry[WorkflowSpec]:
        return Registry(await jetstream.workflows_kv(js, replicas=replicas), WorkflowSpec)

    async def put(self, spec: S) -> None:
        check_name(self._what, spec.name)  # the key: one token, no wildcard, no path
        await self._kv.put(spec.name, encode(spec))

    async def delete(self, name: str) -> bool:
        if not is_valid_name(name):
            return False  # never put, so not there
        try:
            await self._kv.get(name)
        except (KeyNotFoundError, KeyDeletedError):
            return False
        await self._kv.delete(name)
        return True

    async def fetch(self, name: str) -> S | None:
        return (await self._fetch(name))[0]

    async def fetch_revision(self, name: str) -> int:
        """The bucket's revision of `name`'s spec: its version (0: not deployed)."""
        return (await self._fetch(name))[1]

    async def _fetch(self, name: str) -> tuple[S | None, int]:
        """The bucket's spec of `name` and its revision ((None, 0): none there)."""
        if not is_valid_name(name):
            return None, 0
        try:
            entry = await self._kv.get(name)
        except (KeyNotFoundError, KeyDeletedError):
            return None, 0
        if not entry.value:
            return None, 0
        return self._valid(name, decode(entry.value, self._kind)), entry.revision or 0

    async def fetch_all(self) -> list[S]:
        try:
            keys = await self._kv.keys()
        except NoKeysError:
            return []
        specs = [await self.fetch(key) for key in keys]
        return sorted((s for s in specs if s is not None), key=lambda s: s.name)

    def get(self, name: str) -> S | None:
        """The cached spec (kept current by `watch`)."""
        return self._specs.get(name)

    async def lookup(self, name: str) -> S | None:
        """The cached spec, or the bucket's when the watch has not caught up yet
        (ingress may admit a function a moment before this service hears of it)."""
        spec = self._specs.get(name)
        if spec is None:
            spec, revision = await self._fetch(name)
            # Cached unless the watch heard a later change of it meanwhile (a removal
            # above all: cached after it, the removed spec would stay).
            if spec is not None and revision > self._revisions.get(name, 0):
                self._specs[name] = spec
                self._revisions[name] = revision
                self._round_seen.add(name)  # current: not one removed unwatched
        return spec

    @property
    def specs(self) -> dict[str, S]:
        """The cache itself (read-only by convention): name -> spec."""
        return self._specs

    def all(self) -> list[S]:
        return sorted(self._specs.values(), key=lambda s: s.name)

    def version(self, name: str) -> int:
        """The watched revision of `name`'s spec (0: not heard yet; a removed one: its
        removal's)."""
        return self._revisions.get(name, 0)

    @property
    def synced(self) -> bool:
        """Has the watch delivered the bucket's contents (is `specs` the whole of it)?"""
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        await self._synced.wait()

    async def changed(self) -> None:
        """Until the watch next adds, replaces or removes a spec."""
        await self._changed.wait()

    def _note_change(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def watch(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the cache current until cancelled; started once the bucket's contents
        are in it.

        A watch that could not start (a timeout, the server unavailable) or that ended
        (its subscription closed) is watched again, after a back-off, and logged: a
        fault of the bus or the bucket is not the caller's. A watch whose initial
        values stop coming before they are all in is restarted. It ends with
        RegistryWatchError, saying why, when its connection is closed (there is
        nothing to watch on), or when it has not started within `start_retry_s` (a
        fault that lasts, such as credentials that may not watch the bucket, fails
        the caller's start instead of holding it up for good)."""
        started = False
        give_up = anyio.current_time() + self.start_retry_s
        last: str = "its initial values never came"

        def synced() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        delay = self.rewatch_min_s
        while True:
            try:
                await self._watch_round(synced)
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError) as exc:
                raise RegistryWatchError(
                    f"{self._what} registry watch: the connection is closed ({exc!r})"
                ) from exc
            except (nats.errors.Error, OSError) as exc:
                last = repr(exc)
                log.warning("registry.watch_failed", what=self._what, error=last, retry_s=delay)
            else:
                last = "its watch ended before its initial values were in"
                log.warning("registry.watch_ended", what=self._what, retry_s=delay)
            if not started and anyio.current_time() + delay > give_up:
                raise RegistryWatchError(
                    f"the {self._what} registry could not be watched within "
                    f"{self.start_retry_s:g} s: {last}"
                )
            if self._round_synced:
                delay = self.rewatch_min_s  # it had worked: back off afresh
            await anyio.sleep(delay)
            delay = min(delay * 2, self.rewatch_max_s)

    async def _watch_round(self, synced: Callable[[], None]) -> None:
        """One watch of the bucket: its contents, then its changes, until it ends."""
        self._round_synced = False
        watcher = await self._kv.watchall()
        # The keys this round has delivered (or a lookup read meanwhile): at the end of
        # its initial values, a cached spec none of them names was removed while no
        # watch was listening.
        self._round_seen = set()
        try:
            while True:
                if self._round_synced:
                    entry = await watcher.__anext__()
                else:
                    try:
                        with anyio.fail_after(self.sync_idle_s):
                            entry = await watcher.__anext__()
                    except TimeoutError:
                        log.warning(
                            "registry.watch_stalled", what=self._what, idle_s=self.sync_idle_s
                        )
                        return
                if entry is None:  # end of the initial values
                    if not self._round_synced:
                        self._end_of_initial_values()
                        synced()
                    continue
                self._round_seen.add(entry.key)
                self._apply(entry)
        except StopAsyncIteration:
            return
        finally:
            with anyio.CancelScope(shield=True):
                # Its subscription may be gone already (closed, unsubscribed).
                with contextlib.suppress(nats.errors.Error):
                    await watcher.stop()

    def _end_of_initial_values(self) -> None:
        self._round_synced = True
        gone = [name for name in self._specs if name not in self._round_seen]
        for name in gone:
            del self._specs[name]
        if gone:
            log.info("registry.removed_unwatched", what=self._what, names=gone)
            self._note_change()
        self._synced.set()

    def _apply(self, entry: KeyValue.Entry) -> None:
        if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
            self._specs.pop(entry.key, None)
            # Kept: a lookup's read from before the removal is not cached.
            self._revisions[entry.key] = entry.revision or 0
            self._note_change()
            return
        if entry.key in self._specs and entry.revision == self._revisions.get(entry.key):
            return  # a watch again delivering what the cache has: no change
        try:
            spec = self._valid(entry.key, decode(entry.value, self._kind))
        except msgspec.MsgspecError as exc:
            log.warning("registry.bad_entry", key=entry.key, error=str(exc))
            return
        if spec is None:
            self._specs.pop(entry.key, None)
        else:
            self._specs[entry.key] = spec
            self._revisions[entry.key] = entry.revision or 0
        self._note_change()

    def _valid(self, key: str, spec: S) -> S | None:
        """`spec` as stored under `key`, or None (logged) when the entry is not one a
        deploy writes: a bad name, or a spec filed under another name than its own
        (written into the bucket by hand)."""
        if not is_valid_name(key) or spec.name != key:
            log.warning("registry.bad_entry", key=key, error=f"{self._what} {spec.name!r}")
            return None
        return spec

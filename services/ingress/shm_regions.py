"""System shared-memory regions that HTTP clients register (OIP shared-memory extension).

A client creates a POSIX shared-memory object, registers it once by key, then names
region + offset + size in each request instead of sending bytes. Ingress maps each
region once, keeping a file descriptor, not a mapping. Inputs are copied from the
region into a pooled buffer (one copy on the node, never through the bus) and reach
the worker by handle; outputs come back by handle and are copied into the client's
region.

The client owns its segment and may shrink it at any time (ftruncate). Touching a
mapping past the file's new end raises SIGBUS, which would kill ingress and every
request in it, and no size check before the copy closes that race. So the bytes move
with pread/pwrite on the descriptor: the kernel copies them straight between the file
and the pooled buffer (still one copy) and a read of a shrunk file comes back short,
which is answered as the caller's error.

A copy of `THREAD_COPY_MIN` bytes or more runs in a worker thread: done on the event
loop, one caller's GB tensor stalled every other call on this ingress (HTTP, gRPC,
NATS) for the copy's length. Such a copy pins its region (`_Region.pin`): an
unregister meanwhile takes the name away at once, but the descriptor is closed by
the last copy using it, never under one (whose next pread or pwrite would otherwise
find it closed, or its number reused by another open: another client's file, a
socket). The pooled buffer stays mapped for the thread too: it holds a view of the
mapping, and the caller waits for the thread even when cancelled, so the lease is
released only after the last byte moved.

CUDA regions (services/ingress/cuda_regions.py) live in `ShmRegions.cuda`: the
extensions give both kinds one namespace, and `device`, `copy_in` and `copy_out`
serve a reference from whichever kind holds its name.

Region names belong to a tenant (issue 10): the fronts and the staging reach the
regions only through `ShmRegions.of(tenant)`, which files every name under the
caller's authenticated tenant, so a tenant can neither name, list nor unregister
another's region, and two tenants may each have a region "input".
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import threading
from collections.abc import AsyncGenerator, Callable, Collection, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import anyio.to_thread
import msgspec
import numpy as np

from services.ingress.cuda_regions import CudaRegions, check_fits
from services.ingress.oip import ShmRef
from services.ingress.oip_shm import CudaRegionStatus, RegionStatus
from shared.config import DEFAULT_TENANT_MAX_SHM_REGIONS
from shared.dataplane.backend import BackendError
from shared.dataplane.client import read_bytes, write_bytes
from shared.dataplane.shm import _path as segment_path
from shared.dataplane.shm import is_platform_segment
from shared.errors import GfaasError, bad_request
from shared.names import is_valid_name, name_problem
from shared.schema import ErrorCode, Handle

# Region copies of at least this many bytes run in a worker thread (see the module's
# doc); smaller ones stay on the event loop, where they cost less than a thread hop.
THREAD_COPY_MIN = 1 << 20


def _fd_room() -> int:
    """How many system regions ingress may hold: each keeps its segment's descriptor
    open, and half the process's open-file limit stays for everything else (client
    connections, NATS, the pool's slabs)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (1 << 20) if soft == resource.RLIM_INFINITY else max(1, soft // 2)


@dataclass
class _Region:
    key: str
    offset: int
    byte_size: int
    # The segment's file, opened at registration: the name may be unlinked or replaced
    # afterwards, the bytes are read and written through this descriptor only.
    fd: int
    # Copies using `fd` now, and whether the region was unregistered meanwhile: the
    # last of them closes it then (see `pin`).
    users: int = 0
    gone: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pin(self) -> None:
        """One more copy uses the descriptor: it stays open until `unpin`. Called on
        the event loop, where unregister runs, so a region found registered is pinned
        before anything can close it."""
        with self.lock:
            self.users += 1

    def unpin(self) -> None:
        """A copy is done with the descriptor (from any thread)."""
        with self.lock:
            self.users -= 1
            last = self.gone and self.users == 0
        if last:
            os.close(self.fd)

    def retire(self) -> None:
        """Unregistered: the descriptor is closed now, or by the last copy using it."""
        with self.lock:
            self.gone = True
            idle = self.users == 0
        if idle:
            os.close(self.fd)


class ShmRegions:
    def __init__(
        self,
        *,
        namespace: str = "gfaas",
        owners: Collection[int] | None = None,
        tenant_max: int = DEFAULT_TENANT_MAX_SHM_REGIONS,
        max_open: int | None = None,
    ) -> None:
        """`namespace`: the platform's shared-memory namespace, whose segments (pool
        slabs, lease board, model tier) no client may register; `owners`: the uids a
        registered segment may belong to (None: this process's own); `tenant_max`:
        the most regions of both kinds one tenant may hold (0: no cap); `max_open`:
        the most system regions in all, each an open descriptor (None: half the
        open-file limit). Registration was otherwise unbounded: a client looping
        over register took every descriptor ingress had, and with them its
        connections, for every tenant."""
        self.namespace = namespace
        self.owners = frozenset([os.geteuid()] if owners is None else owners)
        self.tenant_max = tenant_max
        self.max_open = _fd_room() if max_open is None else max_open
        self._regions: dict[str, _Region] = {}
        self.cuda = CudaRegions(taken=self._regions.__contains__)

    def __contains__(self, name: object) -> bool:
        return name in self._regions

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if name in self._regions or name in self.cuda:
            raise bad_request(f"shared-memory region {name!r} is already registered")
        if len(self._regions) >= self.max_open:
            raise GfaasError(
                ErrorCode.UNAVAILABLE,
                f"this ingress holds {len(self._regions)} system shared-memory regions, "
                "as many descriptors as its open-file limit leaves room for; try again "
                "once some are unregistered",
            )
        segment_name = key.removeprefix("/")
        if is_platform_segment(segment_name, self.namespace):
            raise bad_request(
                f"shared-memory key {key!r} is one of gfaas's own segments (pool slabs, "
                "lease board, model tier): register a region you created"
            )
        try:
            fd, info = _open_segment(segment_name)
        except BackendError as exc:
            raise bad_request(f"cannot open shared-memory key {key!r}: {exc}") from None
        if info.st_uid not in self.owners:
            os.close(fd)
            raise bad_request(
                f"shared-memory key {key!r} belongs to uid {info.st_uid}, not to one this "
                f"ingress serves ({', '.join(map(str, sorted(self.owners)))})"
            )
        if offset + byte_size > info.st_size:
            os.close(fd)
            raise bad_request(
                f"region {name!r}: bytes [{offset}, {offset + byte_size}) are outside "
                f"{key!r} of {info.st_size} bytes"
            )
        self._regions[name] = _Region(key, offset, byte_size, fd)

    def unregister(self, name: str | None = None) -> None:
        """One region, or every region when `name` is None (unknown names are fine)."""
        names = list(self._regions) if name is None else [name]
        for n in names:
            region = self._regions.pop(n, None)
            if region is not None:
                region.retire()  # a copy still under way keeps its descriptor

    def status(self, name: str | None = None) -> list[RegionStatus]:
        if name is not None and name not in self._regions:
            raise bad_request(f"no shared-memory region {name!r} is registered")
        return [
            RegionStatus(name=n, key=r.key, offset=r.offset, byte_size=r.byte_size)
            for n, r in sorted(self._regions.items())
            if name is None or n == name
        ]

    def _place(self, ref: ShmRef, nbytes: int) -> tuple[_Region, int]:
        """The region and the file position of `nbytes` at the reference's offset,
        bounds-checked against the region as registered."""
        region = self._regions.get(ref.region)
        if region is None:
            raise bad_request(f"no shared-memory region {ref.region!r} is registered")
        check_fits(ref, nbytes, region.byte_size)
        return region, region.offset + ref.offset

    def read_into(self, ref: ShmRef, target: memoryview) -> None:
        """The region's bytes at the reference into `target` (its whole length)."""
        region, start = self._place(ref, len(target))
        _read(region, ref, start, target)

    def write_from(self, ref: ShmRef, source: memoryview) -> None:
        """`source` into the region at the reference."""
        region, start = self._place(ref, len(source))
        _write(region, ref, start, source)

    # -- either kind, by the name a request gives -----------------------------------------

    def device(self, ref: ShmRef) -> str:
        """The pool device to stage the region's bytes on: host memory for a system
        region, the region's GPU for a CUDA one (so that copy stays on the device)."""
        return "cpu" if ref.region in self._regions else self.cuda.device(ref)

    def check(self, ref: ShmRef) -> None:
        """Refuse a reference whose shared_memory_byte_size does not fit its region (of
        either kind), before anything is leased for it."""
        if ref.region in self._regions:
            self._place(ref, ref.byte_size)
        else:
            check_fits(ref, ref.byte_size, self.cuda.byte_size(ref.region))

    async def copy_in(self, ref: ShmRef, handle: Handle) -> None:
        """The bytes the reference names into a leased buffer of `handle.nbytes`."""
        if ref.region not in self._regions:
            self.cuda.copy_in(ref, handle)
            return
        region, start = self._place(ref, handle.nbytes)
        if handle.backend == "shm":
            # Straight from the file into the pooled buffer: the one copy. The view
            # holds the buffer's mapping until the copy is done with it.
            target = _bytes(read_bytes(handle))

            def copy() -> None:
                _read(region, ref, start, target)

        else:  # device() stages system regions in host memory; kept for any other pool

            def copy() -> None:
                staged = bytearray(handle.nbytes)
                _read(region, ref, start, memoryview(staged))
                write_bytes(handle, staged)

        await _pinned(region, handle.nbytes, copy)

    async def copy_out(self, handle: Handle, ref: ShmRef) -> None:
        """A leased buffer's bytes into the region the reference names."""
        if ref.region not in self._regions:
            self.cuda.copy_out(handle, ref)
            return
        region, start = self._place(ref, handle.nbytes)
        # A host buffer is mapped here, on the loop (the mapping cache is the loop's),
        # and the view holds it until the copy is done; one on a GPU is copied off it
        # in the thread too.
        pooled = _bytes(read_bytes(handle)) if handle.backend == "shm" else None

        def copy() -> None:
            source = pooled if pooled is not None else _bytes(read_bytes(handle))
            _write(region, ref, start, source)

        await _pinned(region, handle.nbytes, copy)

    async def copy_out_chunks(
        self, chunks: AsyncGenerator[bytes, None], nbytes: int, ref: ShmRef
    ) -> None:
        """`nbytes` coming in `chunks` (a lease in another node's pool, read through its
        broker: it cannot be mapped here) into the region the reference names, each
        chunk written as it comes into a system region. The region is checked, and
        pinned, before the first is asked for."""
        async with aclosing(chunks):
            if ref.region not in self._regions:
                check_fits(ref, nbytes, self.cuda.byte_size(ref.region))
                data = b"".join([chunk async for chunk in chunks])
                _check_length(ref, len(data), nbytes)
                self.cuda.write(ref, data)
                return
            region, start = self._place(ref, nbytes)
            region.pin()  # an unregister meanwhile leaves the descriptor to this copy
            try:
                done = 0
                async for chunk in chunks:
                    _check_length(ref, done + len(chunk), nbytes, at_most=True)
                    # A chunk is at most a bus message: under THREAD_COPY_MIN, inline.
                    _write(region, ref, start + done, memoryview(chunk))
                    done += len(chunk)
                _check_length(ref, done, nbytes)
            finally:
                region.unpin()

    def check_room(self, prefix: str, name: str) -> None:
        """Refuse a tenant (its names under `prefix`) one more region, of either kind,
        once it holds `tenant_max` (`name` names the new one, for the reason)."""
        if not self.tenant_max:
            return
        held = sum(n.startswith(prefix) for n in self._regions)
        held += sum(r.name.startswith(prefix) for r in self.cuda.status())
        if held >= self.tenant_max:
            raise GfaasError(
                ErrorCode.QUOTA_EXCEEDED,
                f"cannot register shared-memory region {name!r}: the tenant holds "
                f"{held} regions, system and CUDA, the most one may "
                "(GFAAS_TENANT_MAX_SHM_REGIONS); unregister some first",
            )

    def of(self, tenant: str) -> TenantRegions:
        """The regions as `tenant` sees them: its own, by the names it gave. A tenant
        name must be one (as admission wants): "a/b", from an unauthenticated
        caller's header, filed its regions among tenant "a"'s, who then listed,
        shadowed and unregistered them as "b/..."."""
        if not is_valid_name(tenant):
            raise bad_request(name_problem("tenant", tenant))
        return TenantRegions(self, tenant)

    def close(self) -> None:
        self.unregister()
        self.cuda.close()


class TenantRegions:
    """One tenant's view of an ingress's regions: names are filed as "tenant/name"
    underneath (a tenant name has no "/"), and only the tenant's are ever listed,
    looked up or unregistered."""

    def __init__(self, regions: ShmRegions, tenant: str) -> None:
        self._regions = regions
        self._prefix = f"{tenant}/"
        self.cuda = _TenantCuda(regions, self._prefix)

    def _ref(self, ref: ShmRef) -> ShmRef:
        return replace(ref, region=self._prefix + ref.region)

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        _named_region(name)
        with _named(self._prefix):
            if self._prefix + name not in self._regions:  # else: "already registered"
                self._regions.check_room(self._prefix, name)
            self._regions.register(self._prefix + name, key, offset, byte_size)

    def unregister(self, name: str | None = None) -> None:
        if name is not None:
            with _named(self._prefix):
                self._regions.unregister(self._prefix + name)
            return
        for region in self.status():
            with _named(self._prefix):
                self._regions.unregister(self._prefix + region.name)

    def status(self, name: str | None = None) -> list[RegionStatus]:
        if name is not None and self._prefix + name not in self._regions:
            raise bad_request(f"no shared-memory region {name!r} is registered")
        return [
            msgspec.structs.replace(r, name=r.name.removeprefix(self._prefix))
            for r in self._regions.status()
            if r.name.startswith(self._prefix) and (name is None or r.name == self._prefix + name)
        ]

    def device(self, ref: ShmRef) -> str:
        with _named(self._prefix):
            return self._regions.device(self._ref(ref))

    def check(self, ref: ShmRef) -> None:
        with _named(self._prefix):
            self._regions.check(self._ref(ref))

    async def copy_in(self, ref: ShmRef, handle: Handle) -> None:
        with _named(self._prefix):
            await self._regions.copy_in(self._ref(ref), handle)

    async def copy_out(self, handle: Handle, ref: ShmRef) -> None:
        with _named(self._prefix):
            await self._regions.copy_out(handle, self._ref(ref))

    async def copy_out_chunks(
        self, chunks: AsyncGenerator[bytes, None], nbytes: int, ref: ShmRef
    ) -> None:
        with _named(self._prefix):
            await self._regions.copy_out_chunks(chunks, nbytes, self._ref(ref))


class _TenantCuda:
    """A tenant's CUDA regions (see TenantRegions)."""

    def __init__(self, regions: ShmRegions, prefix: str) -> None:
        self._regions = regions
        self._cuda = regions.cuda
        self._prefix = prefix

    def available(self) -> bool:
        return self._cuda.available()

    def register(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        _named_region(name)
        with _named(self._prefix):
            if self._prefix + name not in self._cuda:  # else: "already registered"
                self._regions.check_room(self._prefix, name)
            self._cuda.register(self._prefix + name, raw_handle, device_id, byte_size)

    def unregister(self, name: str | None = None) -> None:
        if name is not None:
            with _named(self._prefix):
                self._cuda.unregister(self._prefix + name)
            return
        for region in self.status():
            with _named(self._prefix):
                self._cuda.unregister(self._prefix + region.name)

    def status(self, name: str | None = None) -> list[CudaRegionStatus]:
        if name is not None and self._prefix + name not in self._cuda:
            raise bad_request(f"no CUDA shared-memory region {name!r} is registered")
        return [
            msgspec.structs.replace(r, name=r.name.removeprefix(self._prefix))
            for r in self._cuda.status()
            if r.name.startswith(self._prefix) and (name is None or r.name == self._prefix + name)
        ]


def _open_segment(name: str) -> tuple[int, os.stat_result]:
    """A client's segment opened read-write, as shm.open_segment checks it (a regular
    file under /dev/shm, never through a symlink, not empty), but kept as a descriptor."""
    path = segment_path(name)  # refuses names with slashes, dots-only names, ...
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise BackendError(f"shared-memory segment {name!r} does not exist") from None
    except OSError as exc:  # ELOOP: a symlink; EACCES, ENXIO (a FIFO's other end), ...
        why = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be opened: {exc}"
        raise BackendError(f"shared-memory segment {name!r} {why}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BackendError(f"shared-memory segment {name!r} is not a regular file")
        if info.st_size <= 0:
            raise BackendError(f"shared-memory segment {name!r} is empty")
    except BaseException:
        os.close(fd)
        raise
    return fd, info


async def _pinned(region: _Region, nbytes: int, copy: Callable[[], None]) -> None:
    """`copy()` with the region pinned: inline when small, else in a worker thread.
    The thread unpins it itself, however the copy ends. The wait is not abandoned
    when the caller is cancelled (a gRPC cancel, an HTTP client gone): the pooled
    buffer the thread reads or writes is released only once the thread is done."""
    region.pin()
    if nbytes < THREAD_COPY_MIN:
        try:
            copy()
        finally:
            region.unpin()
        return

    started = False

    def run() -> None:
        nonlocal started
        started = True
        try:
            copy()
        finally:
            region.unpin()

    try:
        await anyio.to_thread.run_sync(run, abandon_on_cancel=False)
    finally:
        # Once started, the thread is waited for and unpins; one that never started
        # (the caller cancelled while it waited for a free thread) leaves it to us.
        if not started:
            region.unpin()


def _read(region: _Region, ref: ShmRef, start: int, target: memoryview) -> None:
    try:
        got = _pread(region.fd, target, start)
    except OSError as exc:
        raise _io_error(ref, "read", exc) from None
    if got < len(target):
        raise _shrunk(ref, region, start + len(target))


def _write(region: _Region, ref: ShmRef, start: int, source: memoryview) -> None:
    end = start + len(source)
    # pwrite past the end of a shrunk file cannot fault, it grows the file again;
    # the client shrank it, so it is told rather than silently given bytes back.
    # A shrink between this check and the write only re-grows the client's own
    # file within the bytes it registered: never a fault, never outside them.
    if os.fstat(region.fd).st_size < end:
        raise _shrunk(ref, region, end)
    try:
        _pwrite(region.fd, source, start)
    except OSError as exc:
        raise _io_error(ref, "write", exc) from None


def _check_length(ref: ShmRef, got: int, nbytes: int, *, at_most: bool = False) -> None:
    """Refuse (internal) a lease read through another node's broker that came to
    other than its `nbytes`: the region would be left part old, part new."""
    if got > nbytes or (got < nbytes and not at_most):
        raise GfaasError(
            ErrorCode.INTERNAL,
            f"region {ref.region!r}: the output's {nbytes} bytes came as {got} from "
            "its node's broker; the region was not fully written",
        )


def _bytes(array: np.ndarray[Any, Any]) -> memoryview:
    return array.data.cast("B")


def _pread(fd: int, target: memoryview, position: int) -> int:
    """Fill `target` from the file at `position`; how many bytes there were. One call
    moves at most about 2 GiB (Linux's MAX_RW_COUNT), hence the loop; 0 is the end."""
    done = 0
    while done < len(target):
        got = os.preadv(fd, [target[done:]], position + done)
        if got == 0:
            break
        done += got
    return done


def _pwrite(fd: int, source: memoryview, position: int) -> None:
    done = 0
    while done < len(source):
        done += os.pwrite(fd, source[done:], position + done)


def _shrunk(ref: ShmRef, region: _Region, needed: int) -> GfaasError:
    size = os.fstat(region.fd).st_size
    return bad_request(
        f"shared-memory region {ref.region!r} is shorter than registered: its segment "
        f"{region.key!r} is {size} bytes now, the request needs bytes up to {needed}; "
        "register it again after resizing it"
    )


def _io_error(ref: ShmRef, what: str, exc: OSError) -> GfaasError:
    return GfaasError(
        ErrorCode.INTERNAL, f"shared-memory region {ref.region!r}: {what} failed: {exc.strerror}"
    )


def _named_region(name: str) -> None:
    """A region needs a name: no request could name an unnamed one (shm_ref refuses
    ""), and to unregister, "" means every region. The HTTP route always has one; a
    gRPC register request may leave it empty."""
    if not name:
        raise bad_request("a shared-memory region to register needs a name")


@contextmanager
def _named(prefix: str) -> Iterator[None]:
    """Errors name a region as its tenant gave it, not as it is filed."""
    try:
        yield
    except GfaasError as exc:
        raise GfaasError(exc.code, exc.reason.replace(f"'{prefix}", "'")) from None

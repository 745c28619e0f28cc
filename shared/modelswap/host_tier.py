"""The host tier: model weights in POSIX shared memory, one copy per node.

A segment holds a small MessagePack index (tensor names, dtypes, shapes, offsets)
then the tensors' bytes, each aligned. The first worker that needs a model writes
the segment under a temporary name and renames it into place, so others either see
a complete segment or none; an flock keeps two workers from loading the same model
at once. Eviction from a device never touches this tier; `evict` here is explicit.

Where instances run as the node's handler user (shared.dataplane.access), segments a
root process writes are 0640 to the handler group, lock files too, and the lock
directory lets that group add its own (`share_with`); instance processes map the
tier read-only (`HostTier(readonly=True)`): they cannot open root's segments for
writing.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import mmap
import os
import re
import stat
import struct
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import torch

from shared.dataplane import access
from shared.dataplane.backend import BackendError
from shared.dataplane.shm import (
    SHM_DIR,
    Segment,
    create_segment,
    list_segments,
    open_segment,
    trusted_owners,
    unlink_segment,
)
from shared.logs import get_logger


def tier_prefix(namespace: str) -> str:
    """The host tier's segment prefix for a platform's shared-memory namespace."""
    return f"{namespace}-model-"


log = get_logger("host_tier")

PREFIX = tier_prefix("gfaas")
ALIGN = 256
_HEADER = struct.Struct("<Q")
_SAFE = re.compile(r"[^A-Za-z0-9_-]")


class _Entry(msgspec.Struct, array_like=True):
    name: str
    dtype: str
    shape: list[int]
    offset: int
    nbytes: int


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def segment_name(model: str, digest: str, prefix: str = PREFIX) -> str:
    tag = hashlib.sha256(f"{model}\0{digest}".encode()).hexdigest()[:16]
    return f"{prefix}{_SAFE.sub('_', model)[:48]}-{tag}"


@dataclass
class HostModel:
    """A model's tensors as zero-copy views into its shared-memory segment."""

    name: str
    segment: Segment
    tensors: dict[str, torch.Tensor]
    _readonly: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    # Undoes the page-locking of the segment for a device's copies (shared.modelswap
    # .cuda.pin): called before the tier lets go of the mapping.
    unpin: Callable[[], None] | None = field(default=None, repr=False)

    def _let_go(self) -> None:
        """The tier is done with this mapping (evicted, or the tier closed)."""
        if self.unpin is not None:
            unpin, self.unpin = self.unpin, None
            unpin()
        self.tensors.clear()
        self.segment.close()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def segment_bytes(self) -> int:
        """The whole segment, index and alignment included: what a device copy holds."""
        return len(self.segment.mm)

    def views_of_copy(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors as views of `flat`, a byte-for-byte copy of the whole segment
        (on a device: shared.modelswap.device_share)."""
        if flat.numel() != self.segment_bytes or flat.dtype != torch.uint8:
            raise BackendError(
                f"a copy of {self.name!r} holds {flat.numel()} {flat.dtype} elements, "
                f"not the segment's {self.segment_bytes} bytes"
            )
        return views_in(flat, *_index(self.segment.mm))

    def readonly_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors again, as views of a read-only mapping of the segment: what a
        model that shares the node's one copy of its weights is built from. A write
        into them faults (the process dies) instead of changing what every other
        instance reads. The mapping lives as long as any view of it, even after the
        tier unlinks the segment."""
        if self._readonly is None:
            segment = open_trusted(self.segment.name, readonly=True)
            with warnings.catch_warnings():
                # torch warns that it cannot refuse writes to such a buffer: the
                # mapping's page protection does.
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                self._readonly = _views(segment)
            _populate_soon(segment)
        return self._readonly


def open_trusted(name: str, *, readonly: bool = False) -> Segment:
    """The segment under `name`, when it is one the tier's writer made: /dev/shm is
    open to every user, and a file a handler (the handler user) left under a model's
    name before the agent filled it would otherwise be mapped as that model, by the
    agent and every instance, with its weights for them all, which its maker could
    go on writing. A BackendError for any other (the writer's fill replaces it)."""
    segment = open_segment(name, readonly=readonly)
    if segment.uid not in trusted_owners():
        segment.close()
        log.warning("host_tier.untrusted_segment", segment=name, uid=segment.uid)
        raise BackendError(
            f"shared-memory segment {name!r} belongs to uid {segment.uid}, "
            "not to the host tier's writer"
        )
    return segment


def _layout(state: Mapping[str, torch.Tensor]) -> tuple[list[_Entry], bytes, int]:
    entries: list[_Entry] = []
    offset = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        entries.append(
            _Entry(
                name=name,
                dtype=str(tensor.dtype).removeprefix("torch."),
                shape=list(tensor.shape),
                offset=offset,
                nbytes=nbytes,
            )
        )
        offset = _align(offset + nbytes)
    index = msgspec.msgpack.encode(entries)
    data_start = _align(_HEADER.size + len(index))
    return entries, index, data_start + offset


def _index(mm: mmap.mmap) -> tuple[list[_Entry], int]:
    """A segment's tensor entries, and where their bytes begin."""
    (index_len,) = _HEADER.unpack_from(mm, 0)
    entries = msgspec.msgpack.decode(mm[_HEADER.size : _HEADER.size + index_len], type=list[_Entry])
    return entries, _align(_HEADER.size + index_len)


def views_in(flat: torch.Tensor, entries: list[_Entry], base: int) -> dict[str, torch.Tensor]:
    """The tensors of a segment's layout as views of `flat`, one byte tensor holding
    the whole segment: its shared-memory mapping, or a copy of it on a device (the
    one copy instances of a model share there: shared.modelswap.device_share)."""
    views: dict[str, torch.Tensor] = {}
    for e in entries:
        dtype = getattr(torch, e.dtype)
        if e.nbytes == 0:
            views[e.name] = torch.empty(e.shape, dtype=dtype, device=flat.device)
            continue
        start = base + e.offset
        views[e.name] = flat[start : start + e.nbytes].view(dtype).view(e.shape)
    return views


def _views(segment: Segment) -> dict[str, torch.Tensor]:
    entries, base = _index(segment.mm)
    return views_in(torch.frombuffer(segment.mm, dtype=torch.uint8), entries, base)


# Linux 5.14+; Python's mmap module does not name them yet.
_MADV_POPULATE_READ = 22
_MADV_POPULATE_WRITE = 23


def _populate_soon(segment: Segment) -> None:
    """Map every page of a fresh read-only mapping in a thread, while the model is
    being built, instead of taking a page fault per 4 KiB in its first forward (a
    100 MB model's first forward: 21 ms with the faults, 11 ms without, in
    bench.weights_load)."""
    _madvise_soon(segment, _MADV_POPULATE_READ)


def _madvise_soon(segment: Segment, advice: int) -> threading.Thread | None:
    """`advice` for the whole segment, in a thread (the thread, None if it could not
    be given). Through libc by ctypes, which lets go of the GIL for the call; where
    either is missing the pages fault in as they are touched, as before."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        whole = torch.frombuffer(segment.mm, dtype=torch.uint8)
    start, size = whole.data_ptr(), whole.numel()

    def populate() -> None:
        madvise(start, size, advice)  # an old kernel says EINVAL: fine
        del whole_ref[:]

    whole_ref = [whole]  # keeps the mapping alive until the pages are in
    thread = threading.Thread(target=populate, name="populate-weights", daemon=True)
    thread.start()
    return thread


class HostTier:
    """Maps models' segments once per process and keeps them mapped. `readonly`: map
    them without write permission (an instance running as the handler user, which
    may only read the segments root made)."""

    def __init__(self, prefix: str = PREFIX, *, readonly: bool = False) -> None:
        self.prefix = prefix
        self.readonly = readonly
        self._open: dict[str, HostModel] = {}
        self._opening = threading.Lock()
        self.loads = 0  # models this process put into the tier (from either source)
        self.blob_loads = 0  # of them, streamed in from a stored blob (no unpickling)

    def cached(self, model: str, digest: str) -> HostModel | None:
        name = segment_name(model, digest, self.prefix)
        host = self._open.get(name)
        if host is not None:
            return host
        # Loads run in threads (and the event loop asks too): two that found it absent
        # together each mapped it, and the mapping the tier did not keep was never let
        # go of by its eviction (nor unpinned).
        with self._opening:
            host = self._open.get(name)
            if host is not None:
                return host
            try:
                segment = open_trusted(name, readonly=self.readonly)
            except BackendError:
                return None
            with warnings.catch_warnings():
                # Read-only views of a read-only mapping: its page protection refuses
                # writes.
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                tensors = _views(segment)
            host = HostModel(name=model, segment=segment, tensors=tensors)
            self._open[name] = host
            return host

    def get_or_load(self, model: str, digest: str, load: Callable[[], Path]) -> HostModel:
        """The model from the host tier, loading it from `load()`'s file if absent."""
        host = self.cached(model, digest)
        if host is not None:
            return host
        name = segment_name(model, digest, self.prefix)
        with _locked(name):
            host = self.cached(model, digest)  # another worker may have won the race
            if host is not None:
                return host
            state = torch.load(load(), map_location="cpu", weights_only=True, mmap=True)
            self._publish(name, state)
            self.loads += 1
        host = self.cached(model, digest)
        assert host is not None
        return host

    def _publish(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        entries, index, size = _layout(state)
        pending = self._pending(name, size)
        try:
            _write(pending.segment.mm, entries, index, state)
            pending.commit()
        except BaseException:
            pending.abort()
            raise

    def pending(self, model: str, digest: str, size: int) -> Pending:
        """A segment for the model to be written into (a blob in `write_blob`'s layout,
        streamed from the object store), under a temporary name until `commit`.
        Hold `lock(model, digest)` meanwhile: two processes filling one model at once
        would each map their own copy (the last rename wins), and instances meant to
        share one would hold two; and the temporary segments of the model found here
        are taken for ones a killed fill left, and removed."""
        return self._pending(segment_name(model, digest, self.prefix), size)

    def lock(self, model: str, digest: str) -> int:
        """Take the node-wide lock on loading `model` (blocking: from a thread); the
        fd to give `unlock`."""
        return _acquire(segment_name(model, digest, self.prefix))

    @staticmethod
    def unlock(fd: int) -> None:
        _release(fd)

    def _pending(self, name: str, size: int) -> Pending:
        tmp = f"{name}.tmp{os.getpid()}-{threading.get_ident()}"
        # The caller holds the model's lock: a temporary segment of it there now is no
        # fill's under way but one a process killed mid-fill left (that model's bytes
        # so far, in /dev/shm until the node stops). Gone before this fill takes room.
        stale = [t for t in list_segments(f"{name}.tmp") if unlink_segment(t)]
        if stale:
            log.warning("host_tier.stale_fill_removed", segment=name, removed=stale)
        # Every instance of the node reads it; none writes it after the commit. Its
        # memory reserved first: a model larger than what /dev/shm has left is refused
        # here, where writing it killed the process (SIGBUS) and left the segment.
        segment = create_segment(tmp, max(size, 1), group_access=access.GROUP_READ, reserve=True)
        # Its pages allocated in a thread ahead of the writer, which would otherwise
        # take a fault per 4 KiB as the bytes arrive (71 ms per 100 MB here).
        return Pending(name, tmp, segment, _madvise_soon(segment, _MADV_POPULATE_WRITE))

    def evict(self, model: str, digest: str) -> bool:
        name = segment_name(model, digest, self.prefix)
        host = self._open.pop(name, None)
        if host is not None:
            host._let_go()
        return unlink_segment(name)

    def resident(self) -> list[str]:
        return list_segments(self.prefix)

    def share_with(self, gid: int) -> None:
        """Open the tier to the handler group `gid` (as root, before instances run as
        it): the lock directory takes that group's lock files, and the segments and
        locks root left from before (0600) become readable to it, so that an instance
        neither fails to lock nor tries to replace a segment it cannot open."""
        _share_lock_dir(gid)
        for name in self.resident():
            _share_file(SHM_DIR / name, gid)
        for lock in LOCK_DIR.glob(f"{self.prefix}*.lock"):
            _share_file(lock, gid)

    def purge(self) -> int:
        """Unlink every segment of this tier and its lock files (the node is shutting
        down). Mappings that processes still hold stay valid until they close them."""
        names = self.resident()
        self.close()
        for lock in LOCK_DIR.glob(f"{self.prefix}*.lock"):
            lock.unlink(missing_ok=True)
        return sum(unlink_segment(n) for n in names)

    def close(self) -> None:
        for host in self._open.values():
            host._let_go()
        self._open.clear()


@dataclass
class Pending:
    """A host-tier segment being written, not yet visible under its name."""

    name: str
    tmp: str
    segment: Segment
    populating: threading.Thread | None = None

    def _populated(self) -> None:
        if self.populating is not None:
            self.populating.join()  # it holds a view of the mapping until done

    def commit(self) -> None:
        """Check that it parses as a model, then make it visible (atomically)."""
        self._populated()
        try:
            _views(self.segment)
        except Exception as exc:
            raise BackendError(f"not a host-tier blob: {type(exc).__name__}: {exc}") from exc
        os.rename(SHM_DIR / self.tmp, SHM_DIR / self.name)
        self.segment.close()

    def abort(self) -> None:
        self._populated()
        self.segment.close()
        unlink_segment(self.tmp)


def write_blob(state: Mapping[str, torch.Tensor], path: Path) -> int:
    """`state` in the host tier's layout, as a file (what a push stores beside the
    original so that a node maps it without unpickling): its size in bytes."""
    entries, index, size = _layout(state)
    with path.open("w+b") as f:
        f.truncate(max(size, 1))
        with mmap.mmap(f.fileno(), max(size, 1)) as mm:
            _write(mm, entries, index, state)
    return size


def _write(
    mm: mmap.mmap, entries: list[_Entry], index: bytes, state: Mapping[str, torch.Tensor]
) -> None:
    _HEADER.pack_into(mm, 0, len(index))
    mm[_HEADER.size : _HEADER.size + len(index)] = index
    base = _align(_HEADER.size + len(index))
    for entry, tensor in zip(entries, state.values(), strict=True):
        if entry.nbytes:
            dst = torch.frombuffer(
                mm, dtype=torch.uint8, count=entry.nbytes, offset=base + entry.offset
            )
            dst.copy_(tensor.contiguous().view(-1).view(torch.uint8))


LOCK_DIR = SHM_DIR / ".gfaas-locks"


@contextmanager
def _locked(name: str) -> Iterator[None]:
    fd = _acquire(name)
    try:
        yield
    finally:
        _release(fd)


def _acquire(name: str) -> int:
    # Lock files stay: unlinking one while another process waits on it would let a
    # third lock a fresh file and load the same model concurrently. Read-only (flock
    # needs no more), so the handler group can lock root's files; never through a
    # link planted under the name.
    LOCK_DIR.mkdir(exist_ok=True)
    flags = os.O_CREAT | os.O_RDONLY | os.O_NOFOLLOW
    # Group-readable from the start: an instance with a uid of its own may make it (the
    # shared lock directory gives it the handler group), and the others must open it.
    fd = os.open(LOCK_DIR / f"{name}.lock", flags, 0o640)
    try:
        gid = access.segment_group()
        if gid is not None and os.fstat(fd).st_uid == os.geteuid():
            os.fchown(fd, -1, gid)
            os.fchmod(fd, 0o640)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _release(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _share_lock_dir(gid: int) -> None:
    """The lock directory, root's, writable by group `gid` and sticky (a member removes
    only its own lock files). Changed through an fd of the directory itself, never of
    a link planted in /dev/shm under its name."""
    LOCK_DIR.mkdir(exist_ok=True)
    fd = os.open(LOCK_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise BackendError(f"{LOCK_DIR} belongs to uid {info.st_uid}, not to this process")
        os.fchown(fd, -1, gid)
        os.fchmod(fd, stat.S_IMODE(info.st_mode) | 0o1070)
    finally:
        os.close(fd)


def _share_file(path: Path, gid: int) -> None:
    """A regular file of this process's user made 0640 to group `gid` (anything else
    under that name, a link or another user's file, is left alone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return  # gone meanwhile, or a link
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
            os.fchown(fd, -1, gid)
            os.fchmod(fd, 0o640)
    finally:
        os.close(fd)


def state_nbytes(state: Mapping[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())

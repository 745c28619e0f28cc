"""The CPU backend: slabs as POSIX shared memory, mapped once per process.

Segments are files under /dev/shm opened with os.open and mapped with mmap, not
multiprocessing.shared_memory: on Python 3.11 a process that merely attaches to a
SharedMemory registers it with the resource tracker, which unlinks it when that
process exits, pulling the slab from under everyone else. Here only `destroy_slab`
unlinks.

Mappings are cached: re-mapping a 64 MiB segment per request costs about 10 ms on
these machines against 4 ms for the whole hand-over with a kept mapping.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.dataplane import access
from shared.dataplane.backend import BackendError, SlabRef, numpy_dtype, torch_dtype
from shared.schema import DType

if TYPE_CHECKING:
    import torch

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "gfaas-"
# Segment names arrive in handles from the wire: no slashes, no dots-only names.
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,200}$")
_PAGE = mmap.PAGESIZE


def new_segment_name(pool: str, prefix: str = SEGMENT_PREFIX) -> str:
    return f"{prefix}{pool}-{os.getpid()}-{secrets.token_hex(4)}"


# The kinds of segment gfaas makes, after its namespace: pool slabs (`<ns>-pool-...`),
# the lease board (`<ns>-board-<node>`) and the host tier of weights (`<ns>-model-...`).
PLATFORM_KINDS = ("pool", "board", "model")


def is_platform_segment(name: str, namespace: str) -> bool:
    """Whether `name` is (or could be) a segment gfaas itself made: anything in this
    platform's namespace, or of a gfaas kind in another platform's on this host.
    Such segments hold every tenant's bytes: no client may register one as its own."""
    if name.startswith(f"{namespace}-") or name == namespace:
        return True
    return name.startswith(SEGMENT_PREFIX) and any(f"-{kind}-" in name for kind in PLATFORM_KINDS)


def list_segments(prefix: str = SEGMENT_PREFIX) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"{prefix}*"))


def remove_leftovers(pool: str, prefix: str = SEGMENT_PREFIX) -> list[str]:
    """Unlink every segment `new_segment_name(pool, prefix)` could have named, whatever
    process made it: what a killed owner of the pool left, which would otherwise stay
    in /dev/shm until reboot. The exact shape is matched, so a pool whose name merely
    starts the same (node "a" and node "a-cpu") keeps its segments."""
    shape = re.compile(re.escape(f"{prefix}{pool}-") + r"[0-9]+-[0-9a-f]{8}")
    gone = [name for name in list_segments(f"{prefix}{pool}-") if shape.fullmatch(name)]
    return [name for name in gone if unlink_segment(name)]


def _path(name: str) -> Path:
    if not _NAME.match(name):
        raise BackendError(f"invalid shared-memory segment name {name!r}")
    return SHM_DIR / name


@dataclass(slots=True)
class Segment:
    name: str
    size: int
    mm: mmap.mmap
    # The file's owner as `open_segment` found it (-1: created here).
    uid: int = -1
    # The file's identity as `open_segment` found it (-1: created here): whether its
    # name still names it (a segment unlinked and made anew has another inode).
    dev: int = -1
    ino: int = -1

    def close(self) -> None:
        # Views still pointing into it keep the mapping alive until the last one goes.
        with contextlib.suppress(BufferError):
            self.mm.close()


def trusted_owners() -> frozenset[int]:
    """Whose segments this process takes for the platform's own (the lease board, the
    host tier's models): its own user's (a service, or instances running as it) and
    root's (the services, where instances run as the handler user). /dev/shm is open
    to every user: a file a handler left under such a name is no one's to trust."""
    return frozenset({0, os.geteuid()})


def create_segment(
    name: str,
    size: int,
    *,
    prefault: bool = False,
    group_access: int = 0,
    reserve: bool = False,
) -> Segment:
    """A new segment, 0600 to this process's user. `group_access` (access.GROUP_READ
    or GROUP_RW): the bits the node's handler group gets when it has one (see
    shared.dataplane.access), so that instance processes can map it too.

    `reserve`: its memory taken from /dev/shm now (a BackendError when there is not
    that much room), not page by page as it is written: a write into a page /dev/shm
    has no room for is a SIGBUS, which kills the process."""
    if size <= 0:
        raise BackendError(f"segment size must be positive, got {size}")
    fd = os.open(_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        _share(fd, group_access)
        os.ftruncate(fd, size)
        if reserve:
            _reserve(fd, name, size)
        mm = mmap.mmap(fd, size)
    except BaseException:
        os.unlink(_path(name))
        raise
    finally:
        os.close(fd)
    if prefault:
        # Touch every page now so the first copy into the slab runs at memcpy speed.
        np.frombuffer(mm, dtype=np.uint8)[::_PAGE] = 0
    return Segment(name, size, mm)


def _reserve(fd: int, name: str, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
            return  # not tmpfs: its pages come as they are written, as before
        raise BackendError(
            f"no room in {SHM_DIR} for shared-memory segment {name!r} of {size} bytes: "
            f"{exc.strerror}"
        ) from None


def _share(fd: int, group_access: int) -> None:
    """Give the handler group `group_access` on the file `fd` (through the fd: nothing
    planted under its name meanwhile is changed instead)."""
    gid = access.segment_group() if group_access else None
    if gid is not None:
        os.fchown(fd, -1, gid)
        os.fchmod(fd, 0o600 | (group_access & 0o060))


def open_segment(name: str, *, readonly: bool = False) -> Segment:
    """Map an existing segment: a regular file under /dev/shm, never a symlink (a
    link planted there would have us map whatever it points to). `readonly`: the
    pages are mapped without write permission, so a write through the mapping
    faults instead of changing what other processes read."""
    mode = os.O_RDONLY if readonly else os.O_RDWR
    try:
        fd = os.open(_path(name), mode | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise BackendError(f"shared-memory segment {name!r} does not exist") from None
    except OSError as exc:  # ELOOP: a symlink; EACCES, ENXIO (a FIFO's other end), ...
        why = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be opened: {exc}"
        raise BackendError(f"shared-memory segment {name!r} {why}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BackendError(f"shared-memory segment {name!r} is not a regular file")
        size = info.st_size
        if size <= 0:
            raise BackendError(f"shared-memory segment {name!r} is empty")
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ if readonly else mmap.ACCESS_WRITE)
    finally:
        os.close(fd)
    return Segment(name, size, mm, info.st_uid, info.st_dev, info.st_ino)


def unlink_segment(name: str) -> bool:
    try:
        os.unlink(_path(name))
    except FileNotFoundError:
        return False
    return True


class ShmBackend:
    """One per process (see `default_backend`): it owns the process's mapping cache."""

    kind = "shm"

    def __init__(self, device: str = "cpu", *, prefix: str = SEGMENT_PREFIX) -> None:
        self.device = device
        self.prefix = prefix
        self._open: dict[str, Segment] = {}

    def create_slab(self, size: int, pool: str, *, prefault: bool = False) -> SlabRef:
        # Instances read inputs from and write outputs into the pool's slabs.
        seg = create_segment(
            new_segment_name(pool, self.prefix),
            size,
            prefault=prefault,
            group_access=access.GROUP_RW,
        )
        self._open[seg.name] = seg
        return SlabRef(backend=self.kind, segment=seg.name, size=size, device=self.device)

    def destroy_slab(self, segment: str) -> None:
        self.close(segment)
        unlink_segment(segment)

    def remove_leftovers(self, pool: str) -> list[str]:
        """Unlink the slabs of `pool` an earlier owner left (see `remove_leftovers`)."""
        return remove_leftovers(pool, self.prefix)

    def open(self, segment: str) -> Segment:
        seg = self._open.get(segment)
        if seg is None:
            seg = self._open[segment] = open_segment(segment)
        return seg

    def is_open(self, segment: str) -> bool:
        return segment in self._open

    def buffer(self, segment: str, offset: int, nbytes: int) -> memoryview:
        seg = self.open(segment)
        _check_bounds(seg, offset, nbytes)
        return memoryview(seg.mm)[offset : offset + nbytes]

    def as_numpy(
        self, segment: str, offset: int, nbytes: int, dtype: DType | str, shape: Sequence[int]
    ) -> np.ndarray[Any, Any]:
        seg = self.open(segment)
        dt = numpy_dtype(dtype)
        _check_view(seg, offset, nbytes, dt.itemsize, shape)
        count = nbytes // dt.itemsize
        return np.frombuffer(seg.mm, dtype=dt, count=count, offset=offset).reshape(shape)

    def as_torch(
        self, segment: str, offset: int, nbytes: int, dtype: DType | str, shape: Sequence[int]
    ) -> torch.Tensor:
        import torch

        seg = self.open(segment)
        tdt = torch_dtype(dtype)
        _check_view(seg, offset, nbytes, tdt.itemsize, shape)
        if nbytes == 0:
            return torch.empty(list(shape), dtype=tdt)
        flat = torch.frombuffer(seg.mm, dtype=tdt, count=nbytes // tdt.itemsize, offset=offset)
        return flat.view(list(shape))

    def close(self, segment: str) -> None:
        seg = self._open.pop(segment, None)
        if seg is not None:
            seg.close()

    def close_all(self) -> None:
        for name in list(self._open):
            self.close(name)

    def prune(self) -> int:
        """Drop mappings of segments that were unlinked (a slab the broker gave back):
        the memory returns once the last view of it is gone."""
        gone = [name for name in self._open if not (SHM_DIR / name).exists()]
        for name in gone:
            self.close(name)
        return len(gone)


def _check_bounds(seg: Segment, offset: int, nbytes: int) -> None:
    if offset < 0 or nbytes < 0 or offset + nbytes > seg.size:
        raise BackendError(
            f"bytes [{offset}, {offset + nbytes}) are outside segment {seg.name} of {seg.size}"
        )


def _check_view(
    seg: Segment, offset: int, nbytes: int, itemsize: int, shape: Sequence[int]
) -> None:
    _check_bounds(seg, offset, nbytes)
    expected = itemsize * int(np.prod(shape, dtype=np.int64))
    if expected != nbytes:
        raise BackendError(f"shape {list(shape)} needs {expected} bytes, the view has {nbytes}")

"""The CUDA backend: device slabs exported once by IPC handle, opened once per process.

The only module that touches cupy or torch.cuda. Slabs are raw cudaMalloc
allocations (cupy.cuda.Memory, not the caching pool: an IPC handle names a whole
allocation, so a pooled sub-block would open at the wrong base). Exporting costs
up to 45 ms per block and opening about 1.3 ms, hence one export per slab and a
per-process cache of opened handles. cupy imports without a GPU and fails on first
use, so availability is probed once and every failure reads as "not available".
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.dataplane.backend import BackendError, BackendUnavailable, SlabRef, numpy_dtype
from shared.dataplane.shm import SEGMENT_PREFIX, ShmBackend
from shared.schema import DType

if TYPE_CHECKING:
    import torch


@functools.cache
def cuda_available() -> bool:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:
        return False


def cuda_device_count() -> int:
    """GPUs CUDA can see from this process; 0 without a usable driver."""
    if not cuda_available():
        return 0
    import cupy

    return int(cupy.cuda.runtime.getDeviceCount())


def _cupy() -> Any:
    if not cuda_available():
        raise BackendUnavailable("CUDA is not usable in this process")
    import cupy

    return cupy


def device_index(device: str) -> int:
    _, _, index = device.partition(":")
    return int(index) if index else 0


class CudaBackend:
    kind = "cuda"

    def __init__(self, device: str = "cuda:0") -> None:
        self.device = device
        self.index = device_index(device)
        self._cp = _cupy()
        self._owned: dict[str, Any] = {}  # segment -> cupy.cuda.Memory we allocated
        self._sizes: dict[str, int] = {}
        self._opened: dict[str, int] = {}  # segment -> device pointer from ipcOpenMemHandle
        self._staging: dict[int, torch.Tensor] = {}

    def create_slab(self, size: int, pool: str, *, prefault: bool = False) -> SlabRef:
        cp = self._cp
        with cp.cuda.Device(self.index):
            mem = cp.cuda.Memory(size)
            if prefault:
                cp.cuda.runtime.memset(mem.ptr, 0, size)
            segment = bytes(cp.cuda.runtime.ipcGetMemHandle(mem.ptr)).hex()
        self._owned[segment] = mem
        self._sizes[segment] = size
        return SlabRef(backend=self.kind, segment=segment, size=size, device=self.device)

    def destroy_slab(self, segment: str) -> None:
        self.close(segment)
        self._owned.pop(segment, None)
        self._sizes.pop(segment, None)

    def is_open(self, segment: str) -> bool:
        return segment in self._owned or segment in self._opened

    def pointer(self, segment: str) -> int:
        mem = self._owned.get(segment)
        if mem is not None:
            return int(mem.ptr)
        ptr = self._opened.get(segment)
        if ptr is None:
            cp = self._cp
            try:
                raw = bytes.fromhex(segment)
            except ValueError:
                raise BackendError(f"not a CUDA IPC handle: {segment[:32]!r}") from None
            with cp.cuda.Device(self.index):
                ptr = int(
                    cp.cuda.runtime.ipcOpenMemHandle(
                        raw, cp.cuda.runtime.cudaIpcMemLazyEnablePeerAccess
                    )
                )
            self._opened[segment] = ptr
        return ptr

    def as_torch(
        self, segment: str, offset: int, nbytes: int, dtype: DType | str, shape: Sequence[int]
    ) -> torch.Tensor:
        import torch

        size = self._sizes.get(segment)
        if offset < 0 or nbytes < 0 or (size is not None and offset + nbytes > size):
            raise BackendError(f"bytes [{offset}, {offset + nbytes}) are outside segment of {size}")
        cp = self._cp
        ptr = self.pointer(segment) + offset
        with cp.cuda.Device(self.index):
            # The backend owns the mapping; the view must not free it.
            mem = cp.cuda.UnownedMemory(ptr, nbytes, self)
            array = cp.ndarray(
                tuple(shape), dtype=numpy_dtype(dtype), memptr=cp.cuda.MemoryPointer(mem, 0)
            )
        return torch.from_dlpack(array)

    def staging(self, nbytes: int, slot: int = 0) -> torch.Tensor:
        """A pinned host buffer per slot (two slots double-buffer a host<->device copy)."""
        import torch

        buf = self._staging.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = self._staging[slot] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return buf[:nbytes]

    def close(self, segment: str) -> None:
        ptr = self._opened.pop(segment, None)
        if ptr is not None:
            self._cp.cuda.runtime.ipcCloseMemHandle(ptr)

    def close_all(self) -> None:
        for segment in list(self._opened):
            self.close(segment)


class CudaCopyEngine:
    """Chunk copies on a dedicated stream; each chunk is waited for by its event."""

    def __init__(self, device: str = "cuda:0") -> None:
        import torch

        if not cuda_available():
            raise BackendUnavailable("CUDA is not usable in this process")
        self._torch = torch
        self._stream = torch.cuda.Stream(device=device)

    def copy(self, dst: Any, src: Any, offset: int, nbytes: int) -> None:
        torch = self._torch
        with torch.cuda.stream(self._stream):
            dst[offset : offset + nbytes].copy_(src[offset : offset + nbytes], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        done.synchronize()


# cudaHostRegisterPortable: pinned for every CUDA context, not only the current one.
_HOST_REGISTER_PORTABLE = 1


class PinnedShmBackend(ShmBackend):
    """Host-memory slabs pinned for the GPUs (cudaHostRegister) in the process that
    registers them, the broker: its host<->device copies then run asynchronously at
    full link speed instead of through a pageable bounce buffer."""

    def __init__(self, device: str = "cpu", *, prefix: str = SEGMENT_PREFIX) -> None:
        super().__init__(device, prefix=prefix)
        self._pinned: dict[str, int] = {}

    def create_slab(self, size: int, pool: str, *, prefault: bool = False) -> SlabRef:
        ref = super().create_slab(size, pool, prefault=prefault)
        ptr = int(np.frombuffer(self.open(ref.segment).mm, dtype=np.uint8).ctypes.data)
        try:
            _cupy().cuda.runtime.hostRegister(ptr, size, _HOST_REGISTER_PORTABLE)
        except Exception:  # still a working slab, only pageable
            return ref
        self._pinned[ref.segment] = ptr
        return ref

    def destroy_slab(self, segment: str) -> None:
        ptr = self._pinned.pop(segment, None)
        if ptr is not None:
            _cupy().cuda.runtime.hostUnregister(ptr)
        super().destroy_slab(segment)

    def is_pinned(self, segment: str) -> bool:
        return segment in self._pinned

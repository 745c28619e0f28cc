"""What every memory backend offers, and which one serves a device.

The broker creates and destroys slabs; workers open them (once per process, cached)
and view leased bytes as tensors without copying. `select_backend` hands out one
backend per device per process, so the mapping caches are shared by everyone in
the process. The CUDA module is imported only when a CUDA device is asked for.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from shared.schema import DType, Handle

if TYPE_CHECKING:
    import torch


class BackendError(Exception):
    """A segment that cannot be created, opened or viewed as asked."""


class BackendUnavailable(BackendError):
    """The device's backend cannot run here (no CUDA driver, no GPU)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SlabRef:
    backend: str
    # shm: the segment name; cuda: the slab's IPC handle in hex.
    segment: str
    size: int
    device: str


class Backend(Protocol):
    kind: str
    device: str

    def create_slab(self, size: int, pool: str, *, prefault: bool = False) -> SlabRef: ...
    def destroy_slab(self, segment: str) -> None: ...
    def is_open(self, segment: str) -> bool: ...
    def as_torch(
        self, segment: str, offset: int, nbytes: int, dtype: DType | str, shape: Sequence[int]
    ) -> torch.Tensor: ...
    def close(self, segment: str) -> None: ...
    def close_all(self) -> None: ...


def numpy_dtype(dtype: DType | str) -> np.dtype[Any]:
    return np.dtype(str(dtype)).newbyteorder("<")


def torch_dtype(dtype: DType | str) -> torch.dtype:
    import torch

    result = getattr(torch, DType(str(dtype)).value)
    assert isinstance(result, torch.dtype)
    return result


def is_cuda_device(device: str) -> bool:
    return device == "cuda" or device.startswith("cuda:")


def select_backend(device: str, *, fallback: bool = True) -> Backend:
    """The process's backend for `device`; without CUDA, shm when `fallback` allows."""
    if not is_cuda_device(device):
        return _shm_backend()
    from shared.dataplane import cuda

    if cuda.cuda_available():
        return _cuda_backend(device)
    if fallback:
        return _shm_backend()
    raise BackendUnavailable(f"{device} asked for, but CUDA is not usable here")


def tensor_from_handle(handle: Handle, dtype: DType | str, shape: Sequence[int]) -> torch.Tensor:
    """A zero-copy tensor over leased bytes; the broker has checked the lease already."""
    expected = numpy_dtype(dtype).itemsize * math.prod(shape)
    if expected != handle.nbytes:
        raise BackendError(
            f"{dtype}{list(shape)} needs {expected} bytes, handle has {handle.nbytes}"
        )
    if handle.backend == "cuda":
        backend = select_backend(handle.device, fallback=False)
    elif handle.backend == "shm":
        backend = _shm_backend()
    else:
        raise BackendError(f"unknown backend {handle.backend!r}")
    return backend.as_torch(handle.segment, handle.offset, handle.nbytes, dtype, shape)


def prune_mappings() -> int:
    """Close this process's mappings of slabs that no longer exist; call it now and then
    in long-lived consumers (workers, ingress)."""
    from shared.dataplane.shm import ShmBackend

    backend = _shm_backend()
    return backend.prune() if isinstance(backend, ShmBackend) else 0


def close_mapping(segment: str) -> None:
    """Drop this process's shared mapping of a shm segment whose slab is destroyed
    here (the broker's own reads and copies go through it, not the pool's backend):
    tmpfs keeps an unlinked segment's pages while any mapping of it lives."""
    _shm_backend().close(segment)


@functools.cache
def _shm_backend() -> Backend:
    from shared.dataplane.shm import ShmBackend

    return ShmBackend()


@functools.cache
def _cuda_backend(device: str) -> Backend:
    from shared.dataplane.cuda import CudaBackend

    return CudaBackend(device)

"""CUDA shared-memory regions that HTTP clients register (OIP CUDA shared-memory extension).

A client allocates GPU memory, exports it as a cudaIpcMemHandle_t and registers it
once by that handle; requests then name region + offset + size instead of sending
bytes. Ingress opens each handle once, through the CUDA pool backend's own cache
of opened handles (shared.dataplane.cuda), so there is one place in the process
that maps IPC handles. Inputs are copied device to device into a pooled buffer on
the region's GPU; outputs come back by handle and are copied into the region.

Without a usable GPU the routes still answer: status is empty and register is a
400 that says why, never a crash.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.ingress.oip import ShmRef
from services.ingress.oip_shm import CudaRegionStatus
from shared.dataplane.backend import BackendUnavailable, select_backend, tensor_from_handle
from shared.dataplane.cuda import CudaBackend, cuda_device_count
from shared.errors import bad_request
from shared.logs import get_logger
from shared.schema import Handle

if TYPE_CHECKING:
    import torch

log = get_logger("ingress.cuda_regions")


@dataclass
class _Region:
    device_id: int
    byte_size: int
    # The raw handle in hex: the CUDA backend's name for an allocation opened by IPC.
    segment: str
    backend: CudaBackend
    # Whether registering mapped the handle. One that was already open in this
    # process (a pool slab, another region with the same handle) is not ours to
    # close while someone else uses it.
    owns_mapping: bool


def _open(device_id: int, segment: str) -> tuple[CudaBackend, bool]:
    """The process's backend for the GPU with `segment` mapped in it, and whether this
    call mapped it. Raises whatever CUDA raises for a handle it cannot open."""
    backend = select_backend(f"cuda:{device_id}", fallback=False)
    if not isinstance(backend, CudaBackend):
        raise BackendUnavailable(f"cuda:{device_id} is not served by the CUDA backend")
    fresh = not backend.is_open(segment)
    backend.pointer(segment)
    return backend, fresh


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    import torch

    dst.copy_(src)
    # The bytes are read next by another process (the worker, or the client once the
    # reply is sent) and the pooled buffer may be released right after: the copy has
    # to have landed, not merely been queued.
    for device in {t.device for t in (dst, src) if t.device.type == "cuda"}:
        torch.cuda.synchronize(device)


class CudaRegions:
    def __init__(self, taken: Callable[[str], bool] = lambda name: False) -> None:
        """`taken`: whether a name is held by a region of another kind (system shared
        memory); the extensions give both kinds one namespace."""
        self._regions: dict[str, _Region] = {}
        self._taken = taken

    def __contains__(self, name: object) -> bool:
        return name in self._regions

    @staticmethod
    def available() -> bool:
        """Whether this process can open CUDA IPC handles at all."""
        return cuda_device_count() > 0

    def register(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        """Open `raw_handle` (a cudaIpcMemHandle_t, already checked by the request parser)."""
        if name in self._regions or self._taken(name):
            raise bad_request(f"shared-memory region {name!r} is already registered")
        devices = cuda_device_count()
        if devices == 0:
            raise bad_request("CUDA shared memory is not available on this node: no CUDA device")
        if not 0 <= device_id < devices:
            raise bad_request(
                f"region {name!r}: device_id {device_id} is not a CUDA device on this node "
                f"(it has {devices}: 0..{devices - 1})"
            )
        segment = raw_handle.hex()
        try:
            backend, fresh = _open(device_id, segment)
        except Exception as exc:  # cupy's CUDARuntimeError, BackendError, a driver fault
            raise bad_request(
                f"region {name!r}: cannot open the CUDA IPC handle on cuda:{device_id}: {exc}"
            ) from None
        if not fresh and not any(r.segment == segment for r in self._regions.values()):
            # Open here, and by no region: one of the node's pool slabs this ingress
            # stages through, holding every tenant's bytes. Not the client's to name.
            raise bad_request(
                f"region {name!r}: the CUDA IPC handle is one of gfaas's own pool slabs: "
                "register memory you allocated"
            )
        self._regions[name] = _Region(device_id, byte_size, segment, backend, fresh)

    def unregister(self, name: str | None = None) -> None:
        """One region, or every region when `name` is None (unknown names are fine)."""
        names = list(self._regions) if name is None else [name]
        for n in names:
            region = self._regions.pop(n, None)
            if region is None or not region.owns_mapping:
                continue
            heir = next((r for r in self._regions.values() if r.segment == region.segment), None)
            if heir is not None:
                heir.owns_mapping = True  # still in use under another name
                continue
            try:
                region.backend.close(region.segment)
            except Exception as exc:  # a dead context must not stop the others closing
                log.warning("cuda_region.close_failed", region=n, error=repr(exc))

    def status(self, name: str | None = None) -> list[CudaRegionStatus]:
        if name is not None and name not in self._regions:
            raise bad_request(f"no CUDA shared-memory region {name!r} is registered")
        return [
            CudaRegionStatus(name=n, device_id=r.device_id, byte_size=r.byte_size)
            for n, r in sorted(self._regions.items())
            if name is None or n == name
        ]

    def device(self, ref: ShmRef) -> str:
        """The GPU holding the region the reference names, as a pool device."""
        return f"cuda:{self._region(ref.region).device_id}"

    def view(self, ref: ShmRef, nbytes: int) -> torch.Tensor:
        """`nbytes` of the region at the reference's offset as a uint8 GPU tensor,
        bounds-checked."""
        region = self._region(ref.region)
        check_fits(ref, nbytes, region.byte_size)
        return region.backend.as_torch(region.segment, ref.offset, nbytes, "uint8", [nbytes])

    def byte_size(self, name: str) -> int:
        return self._region(name).byte_size

    def copy_in(self, ref: ShmRef, handle: Handle) -> None:
        """The region's bytes into a leased buffer (device to device when the lease is
        on the region's GPU)."""
        source = self.view(ref, handle.nbytes)
        _copy(tensor_from_handle(handle, "uint8", [handle.nbytes]), source)

    def copy_out(self, handle: Handle, ref: ShmRef) -> None:
        """A leased buffer's bytes into the region, from whichever device holds them."""
        target = self.view(ref, handle.nbytes)
        _copy(target, tensor_from_handle(handle, "uint8", [handle.nbytes]))

    def write(self, ref: ShmRef, data: bytes) -> None:
        """Host bytes (another node's lease, read through its broker) into the region."""
        import torch

        target = self.view(ref, len(data))
        _copy(target, torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def _region(self, name: str) -> _Region:
        region = self._regions.get(name)
        if region is None:
            raise bad_request(f"no shared-memory region {name!r} is registered")
        return region

    def close(self) -> None:
        self.unregister()


def check_fits(ref: ShmRef, nbytes: int, region_size: int) -> None:
    """Refuse `nbytes` at the reference's offset unless they fit both the request's
    shared_memory_byte_size and the region (`region_size` bytes), of either kind."""
    if nbytes > ref.byte_size or ref.offset + nbytes > region_size:
        raise bad_request(
            f"region {ref.region!r}: {nbytes} bytes at offset {ref.offset} do not fit "
            f"(shared_memory_byte_size {ref.byte_size}, region {region_size} bytes)"
        )

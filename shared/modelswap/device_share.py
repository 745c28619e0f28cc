"""One device copy of a model's weights for all its instances on a device (SAGE's
shared read-only weights, the CUDA backend).

On a CPU the host tier's shared-memory segment is that copy: instances build their
model on read-only views of it (pipeline.instantiate with `shared`). On a GPU each
instance would otherwise copy the weights into its own device memory. Here the node's
agent, which lives as long as the device's instances, copies the segment once onto
the device, byte for byte, and exports the copy over CUDA IPC; an instance opens it
and builds its model on views of it laid out by the segment's own index
(`HostModel.views_of_copy`). The copy lives while any instance holds it: the agent
releases an instance's hold when its process has exited, and frees the copy with
the last one.

The export is torch's own (`torch.multiprocessing.reductions`): one export per
holder, so each importer has its reference counter and the caching allocator does
not reuse the block while any importer maps it. The fields travel as a schema
message, never a pickle: instances share one NATS identity, and a pickle another
instance forged would run in the receiver.

Unlike the CPU mapping, an IPC mapping cannot be made read-only: a handler that
writes into its weights changes its peers'. Never measured on a GPU here (no device
was lent): tests/test_shared_weights_gpu.py checks it where one is.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from shared.modelswap.host_tier import HostModel
from shared.schema import DeviceWeights


class ShareError(RuntimeError):
    """A device copy that cannot be made, or an export that does not fit the model."""


@dataclass
class _Copy:
    model: str
    segment: str
    flat: torch.Tensor
    holders: set[str] = field(default_factory=set)


class DeviceCopies:
    """The agent's device copies of host-tier segments, by (segment, device). Its
    methods block (a copy of a large model takes a while): call them from a thread."""

    def __init__(self) -> None:
        self._copies: dict[tuple[str, str], _Copy] = {}
        self._held: dict[str, tuple[str, str]] = {}  # holder -> its copy's key
        self._lock = threading.Lock()
        self.made = 0  # copies made (one per model and device, however many hold it)

    def hold(self, holder: str, host: HostModel, device: str) -> DeviceWeights:
        """`host`'s copy on `device` (made now if there is none), held for `holder`
        until `release(holder)`; its export for that holder to open."""
        if not device.startswith("cuda"):
            raise ShareError(f"device copies are for CUDA devices, not {device}")
        key = (host.segment.name, device)
        if self._held.get(holder, key) != key:
            # Weights pushed again since it first asked: it holds the new copy now.
            # If it still maps the old one, torch's counter for that export keeps
            # the block from being reused until it lets go.
            self.release(holder)
        with self._lock:
            copy = self._copies.get(key)
            if copy is None:
                copy = _Copy(host.name, host.segment.name, _device_copy(host, device))
                self._copies[key] = copy
                self.made += 1
            copy.holders.add(holder)
            self._held[holder] = key
            return export(copy.flat, copy.segment)

    def release(self, holder: str) -> None:
        """`holder` holds its copy no more (its process has exited); the copy goes
        with its last holder."""
        with self._lock:
            key = self._held.pop(holder, None)
            if key is None or key not in self._copies:
                return
            copy = self._copies[key]
            copy.holders.discard(holder)
            if copy.holders:
                return
            del self._copies[key]
        del copy
        # Blocks an exit left referenced (an importer that died without releasing
        # its counter) are freed once their counters say no one maps them.
        torch.cuda.ipc_collect()

    def release_all(self) -> None:
        for holder in list(self._held):
            self.release(holder)

    def report(self) -> dict[str, dict[str, int]]:
        """Per model: the bytes of its copies here, how many copies (one per
        device) and how many instances hold them. Density, visible."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for copy in self._copies.values():
                row = out.setdefault(copy.model, {"bytes": 0, "copies": 0, "holders": 0})
                row["bytes"] += copy.flat.numel()
                row["copies"] += 1
                row["holders"] += len(copy.holders)
        return out


def _device_copy(host: HostModel, device: str) -> torch.Tensor:
    """The whole segment on `device`. A synchronous copy from pageable memory: it is
    made once per model and device, and pinning the segment here would keep it
    registered for as long as the agent runs."""
    whole = torch.frombuffer(host.segment.mm, dtype=torch.uint8)
    flat = torch.empty(whole.numel(), dtype=torch.uint8, device=device)
    flat.copy_(whole)
    torch.cuda.synchronize(flat.device)
    return flat


def export(flat: torch.Tensor, segment: str) -> DeviceWeights:
    """`flat`'s CUDA IPC export for one importer, as a schema message."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

    rebuild, args = reduce_tensor(flat)
    if rebuild is not rebuild_cuda_tensor:
        raise ShareError(f"{flat.device} memory is not exported over CUDA IPC")
    (
        _cls,
        _size,
        _stride,
        offset,
        _storage_cls,
        _dtype,
        device,
        handle,
        storage_bytes,
        storage_offset,
        _requires_grad,
        ref_counter_handle,
        ref_counter_offset,
        event_handle,
        event_sync_required,
    ) = args
    if offset != 0:
        raise ShareError("a device copy must begin its storage")
    return DeviceWeights(
        segment=segment,
        nbytes=flat.numel(),
        device=int(device),
        handle=bytes(handle),
        storage_bytes=int(storage_bytes),
        storage_offset=int(storage_offset),
        ref_counter_handle=bytes(ref_counter_handle),
        ref_counter_offset=int(ref_counter_offset),
        event_handle=None if event_handle is None else bytes(event_handle),
        event_sync_required=bool(event_sync_required),
    )


def open_copy(weights: DeviceWeights) -> torch.Tensor:
    """The exported copy as a byte tensor on its device (this process maps it)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    flat: torch.Tensor = rebuild_cuda_tensor(
        torch.Tensor,
        torch.Size([weights.nbytes]),
        (1,),
        0,
        torch.storage.TypedStorage,
        torch.uint8,
        weights.device,
        weights.handle,
        weights.storage_bytes,
        weights.storage_offset,
        False,
        weights.ref_counter_handle,
        weights.ref_counter_offset,
        weights.event_handle,
        weights.event_sync_required,
    )
    return flat


def shared_views(host: HostModel, weights: DeviceWeights) -> dict[str, torch.Tensor]:
    """`host`'s tensors as views of the device copy `weights` exports."""
    if weights.segment != host.segment.name:
        raise ShareError(
            f"the device copy is of {weights.segment}, not of {host.segment.name} "
            "(the model's weights changed meanwhile)"
        )
    return host.views_of_copy(open_copy(weights))

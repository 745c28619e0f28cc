"""CUDA half of swap-in: pinned host tier, a copy stream, an event per group."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from shared.modelswap.host_tier import HostModel

if TYPE_CHECKING:
    from shared.modelswap.pipeline import SwapIn

_registered: set[int] = set()


def pin(host: HostModel) -> None:
    """Page-lock a host-tier segment once per mapping, so copies from it are async.

    Undone when the tier lets go of the mapping (`host.unpin`): left registered, the
    segment's pages stayed locked in this process after its eviction (the model's
    size in host memory, for each version evicted), and a later segment mapped at
    the same address was taken for pinned already, while the driver still held the
    old one's pages for that range."""
    whole = torch.frombuffer(host.segment.mm, dtype=torch.uint8)
    ptr = whole.data_ptr()
    if ptr in _registered:
        return
    cudart = torch.cuda.cudart()
    cudart.cudaHostRegister(ptr, whole.numel(), 0)
    _registered.add(ptr)

    def unpin() -> None:
        _registered.discard(ptr)
        cudart.cudaHostUnregister(ptr)

    host.unpin = unpin


def copy_groups_cuda(
    swap: SwapIn, pairs: list[list[tuple[torch.Tensor, torch.Tensor]]], device: str
) -> None:
    dev = torch.device(device)
    stream = torch.cuda.Stream(device=dev)
    swap._device_events = [torch.cuda.Event() for _ in pairs]
    with torch.no_grad(), torch.cuda.stream(stream):
        for event, cuda_event, group in zip(swap.ready, swap._device_events, pairs, strict=True):
            for dst, src in group:
                dst.copy_(src, non_blocking=True)
            cuda_event.record(stream)
            # The host-side flag says "recorded": waiting on an unrecorded CUDA event
            # would return at once.
            event.set()
    stream.synchronize()

"""CUDA half of swap-in: pinned host tier, a copy stream, an event per group."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from shared.modelswap.host_tier import HostModel

if TYPE_CHECKING:
    from shared.modelswap.pipeline import SwapIn

_registered: set[int] = set()


def pin(host: HostModel) -> None:
    """Page-lock a host-tier segment once per process, so copies from it are async."""
    whole = torch.frombuffer(host.segment.mm, dtype=torch.uint8)
    ptr = whole.data_ptr()
    if ptr in _registered:
        return
    torch.cuda.cudart().cudaHostRegister(ptr, whole.numel(), 0)
    _registered.add(ptr)


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

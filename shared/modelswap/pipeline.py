"""Pipelined swap-in: copy a model's weights group by group while it already runs.

The model is built on the meta device (no random initialisation), given empty
storage on the target device, and its parameters and buffers are copied from the
host tier in groups of about `group_bytes`, in registration order, on a copy
thread. Every module that owns tensors gets a forward pre-hook that waits for its
group, so layer i computes while the groups after it are still copying, and the
first request pays little more than the transfer. On CUDA the copies run on their
own stream from pinned memory and modules wait on CUDA events (see cuda.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shared.modelswap.host_tier import HostModel

DEFAULT_GROUP_BYTES = 2 * 1024 * 1024  # FaaSwap's throughput elbow; bench/swap.py measures it


class SwapError(RuntimeError):
    pass


def group_parameters(tensors: list[tuple[str, torch.Tensor]], group_bytes: int) -> list[list[str]]:
    """Consecutive tensors packed into groups of about `group_bytes` (at least one each)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return [g for g in groups if g]


@dataclass
class SwapIn:
    """A swap-in in progress (or done): wait on it, or let forward hooks wait."""

    model: nn.Module
    groups: list[list[str]]
    ready: list[threading.Event]
    started_at: float = field(default_factory=time.perf_counter)
    finished_at: float = 0.0
    error: BaseException | None = None
    _hooks: list[Any] = field(default_factory=list)
    _device_events: list[Any] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return all(e.is_set() for e in self.ready)

    def wait_group(self, index: int) -> None:
        self.ready[index].wait()
        if self.error is not None:
            raise SwapError(f"swap-in failed: {self.error!r}") from self.error
        if self._device_events:
            torch.cuda.current_stream().wait_event(self._device_events[index])

    def wait(self) -> None:
        for i in range(len(self.ready)):
            self.wait_group(i)

    def detach_hooks(self) -> None:
        """Call between requests once done: later forwards skip the checks entirely."""
        if not self.done:
            raise SwapError("swap-in still running")
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    @property
    def seconds(self) -> float:
        return (self.finished_at or time.perf_counter()) - self.started_at


def _copy_groups(
    swap: SwapIn, pairs: list[list[tuple[torch.Tensor, torch.Tensor]]], device: str
) -> None:
    try:
        if device.startswith("cuda"):
            from shared.modelswap.cuda import copy_groups_cuda

            copy_groups_cuda(swap, pairs, device)
        else:
            with torch.no_grad():
                for event, group in zip(swap.ready, pairs, strict=True):
                    for dst, src in group:
                        dst.copy_(src)
                    event.set()
    except BaseException as exc:
        swap.error = exc
        for event in swap.ready:
            event.set()
        raise
    finally:
        swap.finished_at = time.perf_counter()


def instantiate(
    factory: Callable[[], nn.Module],
    host: HostModel,
    device: str,
    *,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    pipelined: bool = True,
) -> tuple[nn.Module, SwapIn]:
    """Build `factory()`'s model on `device` with weights from the host tier.

    With `pipelined`, returns at once and the model may be called immediately;
    otherwise returns after every weight has been copied.
    """
    with torch.device("meta"):
        model = factory()
    model = model.to_empty(device=device).eval()
    named = list(model.state_dict(keep_vars=True).items())
    own = {name for name, _ in named}
    missing = sorted(own - host.tensors.keys())
    unexpected = sorted(host.tensors.keys() - own)
    if missing or unexpected:
        raise SwapError(
            f"weights of {host.name!r} do not fit the model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    groups = group_parameters([(n, host.tensors[n]) for n, _ in named], group_bytes)
    tensors = dict(named)
    pairs = [[(tensors[n].data, host.tensors[n]) for n in group] for group in groups]
    swap = SwapIn(model=model, groups=groups, ready=[threading.Event() for _ in groups])
    if device.startswith("cuda"):
        from shared.modelswap.cuda import pin

        pin(host)
    if pipelined:
        _install_hooks(model, swap)
        thread = threading.Thread(
            target=_copy_groups, args=(swap, pairs, device), name="swap-in", daemon=True
        )
        thread.start()
    else:
        _copy_groups(swap, pairs, device)
        swap.wait()
    return model, swap


def _install_hooks(model: nn.Module, swap: SwapIn) -> None:
    group_of = {name: i for i, group in enumerate(swap.groups) for name in group}
    for prefix, module in model.named_modules():
        local = [
            f"{prefix}.{n}" if prefix else n
            for n, _ in [
                *module.named_parameters(recurse=False),
                *module.named_buffers(recurse=False),
            ]
        ]
        indices = [group_of[n] for n in local if n in group_of]
        if not indices:
            continue
        last = max(indices)

        def hook(_module: nn.Module, _args: Any, index: int = last) -> None:
            if not swap.ready[index].is_set() or swap._device_events:
                swap.wait_group(index)

        swap._hooks.append(module.register_forward_pre_hook(hook))

"""Handlers of bench.live_sharing (importable by instance processes)."""

from __future__ import annotations

import time

import torch


def spin(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Burns `ms` of this thread's CPU time: a device-bound batch, on a CPU."""
    return {"spins": torch.tensor([_burn(float(inputs["ms"].item()))])}


def _burn(ms: float) -> int:
    until = time.thread_time() + ms / 1000.0
    n = 0
    while time.thread_time() < until:
        n += 1
    return n


# Fixed costs, whatever the input (a profile's sample input then costs what calls do).
def spin2(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"spins": torch.tensor([_burn(2.0)])}


def spin5(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"spins": torch.tensor([_burn(5.0)])}


def spin10(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"spins": torch.tensor([_burn(10.0)])}


def _matmuls(n: int) -> int:
    """n products of two 2048x2048 float32 matrices on the GPU: compute-bound, so an
    SM share shows in its time."""
    a = torch.ones(2048, 2048, device="cuda")
    for _ in range(n):
        a = torch.mm(a, a) * (1.0 / 2048)
    torch.cuda.synchronize()
    return n


def gpu_small(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"spins": torch.tensor([_matmuls(2)])}


def gpu_mid(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"spins": torch.tensor([_matmuls(5)])}


def gpu_big(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"spins": torch.tensor([_matmuls(10)])}

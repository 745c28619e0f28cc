"""Which device this worker drives, and how much memory it has.

CUDA specifics (pynvml) live in device_cuda; this module never imports them on a
CPU-only machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch


@dataclass(frozen=True)
class MemoryInfo:
    total: int
    used: int
    free: int


def pick_device(requested: str) -> str:
    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {requested} requested but CUDA is not available")
        return requested
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def memory_info(device: str) -> MemoryInfo:
    if device.startswith("cuda"):
        from services.gpu_worker.device_cuda import cuda_memory_info

        return cuda_memory_info(device)
    vm = psutil.virtual_memory()
    return MemoryInfo(total=vm.total, used=vm.total - vm.available, free=vm.available)


def device_cache_bytes(configured_mb: int, device: str) -> int:
    """The device tier's size: configured, or most of the device's memory."""
    if configured_mb:
        return configured_mb * 1024 * 1024
    return int(memory_info(device).total * (0.8 if device.startswith("cuda") else 0.25))

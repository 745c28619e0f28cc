"""CUDA memory figures: NVML when it initialises, else torch's own view."""

from __future__ import annotations

import torch

from services.gpu_worker.device import MemoryInfo

_nvml_ok: bool | None = None


def _nvml() -> bool:
    global _nvml_ok
    if _nvml_ok is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml_ok = True
        except Exception:  # no driver / library: fall back rather than crash
            _nvml_ok = False
    return _nvml_ok


def cuda_memory_info(device: str) -> MemoryInfo:
    index = torch.device(device).index or 0
    if _nvml():
        import pynvml

        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return MemoryInfo(total=int(info.total), used=int(info.used), free=int(info.free))
    free, total = torch.cuda.mem_get_info(index)
    return MemoryInfo(total=total, used=total - free, free=free)

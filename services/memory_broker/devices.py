"""Which devices a node pools, the backend each pool's slabs come from, and what
kind of link joins two of them.

Backends that need CUDA are imported only when a GPU is there (or named), so a
CPU-only node never loads cupy.
"""

from __future__ import annotations

from collections.abc import Iterator

from shared.config import Settings
from shared.dataplane.backend import Backend, BackendUnavailable, is_cuda_device, select_backend
from shared.dataplane.copier import CopyEngine
from shared.dataplane.cuda import cuda_device_count
from shared.dataplane.elastic import ElasticConfig
from shared.dataplane.shm import ShmBackend

MB = 1024 * 1024

# A device pool kept in host shared memory, standing in for a GPU's: lets a CPU-only
# node (CI) run what a GPU node does with device pools, spilling included.
EMULATED = "emu:"


def pool_devices(configured: str = "") -> list[str]:
    """The devices this node pools: host memory, and every GPU CUDA can see, unless
    `configured` (GFAAS_POOL_DEVICES, comma-separated) names them."""
    if configured:
        named = [d.strip() for d in configured.split(",") if d.strip()]
        return ["cpu", *(d for d in dict.fromkeys(named) if d != "cpu")]
    return ["cpu", *(f"cuda:{i}" for i in range(cuda_device_count()))]


def pool_configs(settings: Settings) -> Iterator[tuple[str, Backend, ElasticConfig]]:
    """Each pooled device with its backend and sizing, as the settings give them."""
    for device in pool_devices(settings.pool_devices):
        backend = device_backend(device, f"{settings.shm_namespace}-pool-")
        cap_mb = settings.pool_cap_mb
        if device == "cpu" and settings.host_pool_cap_mb:
            cap_mb = settings.host_pool_cap_mb
        config = ElasticConfig(
            slab_size=settings.slab_mb * MB,
            max_bytes=cap_mb * MB,
            cooldown_s=settings.pool_cooldown_s,
        )
        yield device, backend, config


def device_backend(device: str, prefix: str) -> Backend:
    if device == "cpu":
        return host_backend(prefix)
    if device.startswith(EMULATED):
        return ShmBackend(device, prefix=prefix)
    if not is_cuda_device(device):
        # select_backend would give any other name the process's own shm backend, whose
        # mappings everyone in the process shares: a typo is refused instead.
        raise BackendUnavailable(
            f"no backend for pool device {device!r} (GFAAS_POOL_DEVICES): "
            f"cpu, {EMULATED}<n> or cuda:<n>"
        )
    return select_backend(device, fallback=False)


def host_backend(prefix: str) -> ShmBackend:
    """Host-memory slabs; pinned for the GPUs when this node has any."""
    if cuda_device_count() > 0:
        from shared.dataplane.cuda import PinnedShmBackend

        return PinnedShmBackend("cpu", prefix=prefix)
    return ShmBackend("cpu", prefix=prefix)


def gpu_engine(src: str, dst: str) -> CopyEngine:
    """Chunks on a dedicated stream of the GPU end of the link, an event per chunk."""
    from shared.dataplane.cuda import CudaCopyEngine

    return CudaCopyEngine(dst if dst.startswith("cuda") else src)


def link_kind(src: str, dst: str) -> str:
    if src == "cpu" and dst == "cpu":
        return "host"
    if src.startswith("cuda") and dst.startswith("cuda"):
        return "nvlink"
    return "pcie"

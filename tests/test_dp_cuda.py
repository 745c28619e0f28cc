"""The CUDA backend; skipped cleanly on machines without CUDA (and without cupy)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from shared.dataplane.bandwidth import LinkScheduler
from shared.dataplane.copier import Copier
from shared.schema import DType

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cuda_backend() -> Iterator[Any]:
    pytest.importorskip("cupy")
    from shared.dataplane.cuda import CudaBackend, cuda_available

    if not cuda_available():
        pytest.skip("cupy cannot reach a GPU")
    backend = CudaBackend("cuda:0")
    yield backend
    backend.close_all()


def test_a_device_slab_views_as_a_zero_copy_tensor(cuda_backend: Any) -> None:
    slab = cuda_backend.create_slab(MiB, "pool", prefault=True)
    a = cuda_backend.as_torch(slab.segment, 256, 16, DType.FLOAT32, [4])
    b = cuda_backend.as_torch(slab.segment, 256, 16, DType.FLOAT32, [4])
    a.fill_(3.0)
    assert a.device.type == "cuda"
    assert b.data_ptr() == a.data_ptr()
    assert b.sum().item() == 12.0
    del a, b
    cuda_backend.destroy_slab(slab.segment)


def test_another_process_opens_the_slab_by_its_ipc_handle(cuda_backend: Any) -> None:
    slab = cuda_backend.create_slab(MiB, "pool", prefault=True)
    view = cuda_backend.as_torch(slab.segment, 0, 4, DType.INT32, [1])
    view.fill_(41)
    torch.cuda.synchronize()
    child = (
        "import sys, torch\n"
        "from shared.dataplane.cuda import CudaBackend\n"
        "b = CudaBackend('cuda:0')\n"
        "v = b.as_torch(sys.argv[1], 0, 4, 'int32', [1])\n"
        "assert b.pointer(sys.argv[1]) == b.pointer(sys.argv[1])\n"
        "v += 1\n"
        "torch.cuda.synchronize()\n"
        "del v\n"
        "b.close_all()\n"
    )
    subprocess.run([sys.executable, "-c", child, slab.segment], check=True, cwd=REPO, timeout=120)
    assert view.item() == 42
    del view
    cuda_backend.destroy_slab(slab.segment)


def test_the_copier_moves_chunks_host_to_device_on_a_stream() -> None:
    from shared.dataplane.cuda import CudaCopyEngine, cuda_available

    if not cuda_available():
        pytest.skip("cupy cannot reach a GPU")
    src = torch.arange(8 * MiB, dtype=torch.uint8).pin_memory()
    dst = torch.empty(8 * MiB, dtype=torch.uint8, device="cuda:0")
    sched = LinkScheduler("pcie0", capacity=20e9, chunk_bytes=MiB)
    with Copier(sched, CudaCopyEngine("cuda:0")) as copier:
        copier.submit("t", dst, src, 8 * MiB).result(timeout=30)
    assert torch.equal(dst.cpu(), src)


def test_host_slabs_are_pinned_for_the_gpu_and_copy_to_it(cuda_backend: Any) -> None:
    from shared.dataplane.cuda import CudaCopyEngine, PinnedShmBackend

    host = PinnedShmBackend(prefix=f"gfaas-test-pinned-{os.getpid()}-")
    slab = host.create_slab(4 * MiB, "pool", prefault=True)
    try:
        assert host.is_pinned(slab.segment)
        src = host.as_torch(slab.segment, 0, 4 * MiB, DType.UINT8, [4 * MiB])
        assert src.is_pinned()
        src.fill_(7)
        gpu = cuda_backend.create_slab(4 * MiB, "pool")
        dst = cuda_backend.as_torch(gpu.segment, 0, 4 * MiB, DType.UINT8, [4 * MiB])
        with Copier(LinkScheduler("cpu->cuda:0", capacity=25e9), CudaCopyEngine("cuda:0")) as c:
            c.submit("t", dst, src, 4 * MiB).result(timeout=30)
        assert int(dst.sum().item()) == 7 * 4 * MiB
    finally:
        host.destroy_slab(slab.segment)

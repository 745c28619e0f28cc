from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import msgspec
import numpy as np
import pytest
import torch

from shared.dataplane.backend import BackendError, select_backend, tensor_from_handle
from shared.dataplane.leases import LeaseTable
from shared.dataplane.shm import SHM_DIR, ShmBackend, list_segments
from shared.schema import DType, Handle

pytestmark = pytest.mark.unit

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def prefix() -> Iterator[str]:
    # A prefix per test, so parallel runs by others cannot mask or cause a leak here.
    prefix = f"gfaas-test-{uuid.uuid4().hex[:8]}-"
    yield prefix
    leaked = list_segments(prefix)
    for name in leaked:
        os.unlink(SHM_DIR / name)
    assert leaked == []


@pytest.fixture
def shm(prefix: str) -> Iterator[ShmBackend]:
    backend = ShmBackend(prefix=prefix)
    yield backend
    backend.close_all()


def test_a_slab_is_a_named_segment_under_dev_shm_until_destroyed(
    shm: ShmBackend, prefix: str
) -> None:
    slab = shm.create_slab(MiB, "pool")
    assert slab.segment.startswith(prefix)
    assert list_segments(prefix) == [slab.segment]
    assert (SHM_DIR / slab.segment).stat().st_size == MiB
    shm.destroy_slab(slab.segment)
    assert list_segments(prefix) == []


def test_views_are_zero_copy_across_numpy_torch_and_another_mapping(
    shm: ShmBackend, prefix: str
) -> None:
    slab = shm.create_slab(MiB, "pool")
    array = shm.as_numpy(slab.segment, 4096, 4 * 6, DType.FLOAT32, [2, 3])
    tensor = shm.as_torch(slab.segment, 4096, 4 * 6, DType.FLOAT32, [2, 3])
    other = ShmBackend(prefix=prefix)  # a second, independent mapping of the same segment
    try:
        remote = other.as_torch(slab.segment, 4096, 4 * 6, "float32", [2, 3])
        array[1, 2] = 7.5
        assert tensor[1, 2].item() == 7.5
        assert remote[1, 2].item() == 7.5
        remote[0, 0] = -1.0
        assert array[0, 0] == -1.0
        assert tensor.data_ptr() == array.ctypes.data
        del remote
    finally:
        other.close_all()
    del array, tensor
    shm.destroy_slab(slab.segment)


def test_a_segment_is_mapped_once_per_process(shm: ShmBackend) -> None:
    slab = shm.create_slab(MiB, "pool")
    first = shm.open(slab.segment)
    assert shm.open(slab.segment) is first
    shm.destroy_slab(slab.segment)


def test_an_attaching_process_that_exits_leaves_the_segment_in_place(shm: ShmBackend) -> None:
    slab = shm.create_slab(MiB, "pool")
    view = shm.as_numpy(slab.segment, 0, 8, DType.INT64, [1])
    view[0] = 41
    child = (
        "import sys\n"
        "from shared.dataplane.shm import ShmBackend\n"
        "b = ShmBackend()\n"
        "v = b.as_numpy(sys.argv[1], 0, 8, 'int64', [1])\n"
        "v[0] += 1\n"
    )
    subprocess.run([sys.executable, "-c", child, slab.segment], check=True, cwd=REPO, timeout=30)
    assert (SHM_DIR / slab.segment).exists()
    assert view[0] == 42
    del view
    shm.destroy_slab(slab.segment)


def test_a_view_outside_the_segment_or_of_the_wrong_size_is_refused(shm: ShmBackend) -> None:
    slab = shm.create_slab(MiB, "pool")
    with pytest.raises(BackendError, match="outside"):
        shm.as_numpy(slab.segment, MiB - 4, 8, DType.UINT8, [8])
    with pytest.raises(BackendError, match="needs 12 bytes"):
        shm.as_torch(slab.segment, 0, 16, DType.FLOAT32, [3])
    shm.destroy_slab(slab.segment)


def test_a_segment_name_from_the_wire_cannot_escape_dev_shm(shm: ShmBackend) -> None:
    with pytest.raises(BackendError, match="invalid"):
        shm.open("../etc/passwd")
    with pytest.raises(BackendError, match="does not exist"):
        shm.open("gfaas-test-nothing-here")


def test_a_leased_handle_opens_as_a_zero_copy_tensor(shm: ShmBackend) -> None:
    slab = shm.create_slab(MiB, "pool")
    table = LeaseTable()
    table.add_device("cpu", MiB)
    table.add_slab("cpu", slab.size, slab.segment)
    table.lease(100, "cpu", "w0", now=0.0)
    lease = table.lease(4 * 16, "cpu", "w1", tenant="acme", now=0.0)
    wire = msgspec.msgpack.encode(table.to_handle(lease, backend="shm", pool="pool"))
    handle = msgspec.msgpack.decode(wire, type=Handle)
    table.check(handle, "acme")
    produced = shm.as_torch(handle.segment, handle.offset, handle.nbytes, DType.INT32, [4, 4])
    produced.copy_(torch.arange(16, dtype=torch.int32).view(4, 4))
    consumed = tensor_from_handle(handle, DType.INT32, [4, 4])
    assert torch.equal(consumed, produced)
    assert consumed.data_ptr() != 0
    select_backend("cpu").close(handle.segment)
    del produced, consumed
    shm.destroy_slab(slab.segment)


def test_without_cuda_a_cuda_device_falls_back_to_shm_or_says_why() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert select_backend("cuda:0").kind == "shm"
    with pytest.raises(BackendError, match="CUDA is not usable"):
        select_backend("cuda:0", fallback=False)


def test_prefaulted_slabs_read_as_zeros(shm: ShmBackend) -> None:
    slab = shm.create_slab(3 * MiB, "pool", prefault=True)
    assert not np.any(shm.as_numpy(slab.segment, 0, 3 * MiB, DType.UINT8, [3 * MiB]))
    shm.destroy_slab(slab.segment)


def test_the_broker_side_imports_neither_torch_nor_cupy() -> None:
    probe = (
        "import sys\n"
        "import shared.dataplane.leases, shared.dataplane.elastic, shared.dataplane.bandwidth\n"
        "import shared.dataplane.shm, shared.dataplane.copier\n"
        "from shared.dataplane.backend import select_backend\n"
        "select_backend('cpu')\n"
        "print(sorted(m for m in ('torch', 'cupy') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, cwd=REPO, capture_output=True, text=True
    )
    assert out.stdout.strip() == "[]"


def test_a_consumer_drops_its_mapping_once_the_broker_destroys_the_slab(shm: ShmBackend) -> None:
    slab = shm.create_slab(1 << 20, "prune")
    consumer = ShmBackend(prefix=shm.prefix)
    consumer.open(slab.segment)
    assert consumer.prune() == 0
    shm.destroy_slab(slab.segment)
    assert consumer.prune() == 1
    assert not consumer.is_open(slab.segment)

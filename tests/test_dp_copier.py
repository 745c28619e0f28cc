from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from shared.dataplane.bandwidth import LinkScheduler, Mode
from shared.dataplane.copier import Copier, TorchEngine
from shared.dataplane.shm import SHM_DIR, ShmBackend, list_segments
from shared.schema import DType

pytestmark = pytest.mark.unit

MiB = 1 << 20


@pytest.fixture
def shm() -> Iterator[ShmBackend]:
    prefix = f"gfaas-test-{uuid.uuid4().hex[:8]}-"
    backend = ShmBackend(prefix=prefix)
    yield backend
    backend.close_all()
    leaked = list_segments(prefix)
    for name in leaked:
        os.unlink(SHM_DIR / name)
    assert leaked == []


def test_a_chunked_copy_between_shm_slabs_moves_every_byte(shm: ShmBackend) -> None:
    a, b = shm.create_slab(9 * MiB, "src"), shm.create_slab(9 * MiB, "dst")
    src = shm.as_numpy(a.segment, 0, 9 * MiB, DType.UINT8, [9 * MiB])
    dst = shm.as_numpy(b.segment, 0, 9 * MiB, DType.UINT8, [9 * MiB])
    src[:] = np.random.default_rng(0).integers(0, 255, 9 * MiB, dtype=np.uint8)
    with Copier(LinkScheduler("mem", capacity=10e9, chunk_bytes=2 * MiB)) as copier:
        result = copier.submit("t", dst, src, 9 * MiB - 3).result(timeout=10)
    assert np.array_equal(dst[: 9 * MiB - 3], src[: 9 * MiB - 3])
    assert dst[-1] == 0
    assert result.nbytes == 9 * MiB - 3
    assert result.throughput > 0
    del src, dst
    shm.destroy_slab(a.segment)
    shm.destroy_slab(b.segment)


def test_a_small_copy_overtakes_a_big_one_in_fair_mode_but_not_in_fifo() -> None:
    big_src, big_dst = np.ones(128 * MiB, np.uint8), np.zeros(128 * MiB, np.uint8)
    small_src, small_dst = np.ones(MiB, np.uint8), np.zeros(MiB, np.uint8)
    order: dict[Mode, list[str]] = {}
    for mode in (Mode.FAIR, Mode.FIFO):
        sched = LinkScheduler("mem", capacity=10e9, chunk_bytes=MiB, mode=mode)
        with Copier(sched) as copier:
            big = copier.submit("big", big_dst, big_src, 128 * MiB)
            small = copier.submit("small", small_dst, small_src, MiB)
            results = [big.result(timeout=10), small.result(timeout=10)]
        order[mode] = [r.transfer_id for r in sorted(results, key=lambda r: r.finished_at)]
    assert order[Mode.FAIR] == ["small", "big"]
    assert order[Mode.FIFO] == ["big", "small"]


def test_the_torch_engine_copies_flat_byte_tensors() -> None:
    src = torch.arange(3 * MiB, dtype=torch.int64).view(torch.uint8)
    dst = torch.empty_like(src)
    with Copier(LinkScheduler("mem", capacity=10e9, chunk_bytes=4 * MiB), TorchEngine()) as c:
        c.submit("t", dst, src, src.numel()).result(timeout=10)
    assert torch.equal(dst, src)


def test_a_failing_copy_fails_its_future_and_the_copier_goes_on() -> None:
    class Broken:
        def copy(self, dst: Any, src: Any, offset: int, nbytes: int) -> None:
            if dst is None:
                raise OSError("device gone")
            np.copyto(dst[offset : offset + nbytes], src[offset : offset + nbytes])

    with Copier(LinkScheduler("mem", capacity=10e9), Broken()) as copier:
        bad = copier.submit("bad", None, None, MiB)
        good = copier.submit("good", np.zeros(MiB, np.uint8), np.ones(MiB, np.uint8), MiB)
        with pytest.raises(OSError, match="device gone"):
            bad.result(timeout=10)
        assert good.result(timeout=10).nbytes == MiB


def test_a_closed_copier_refuses_new_work() -> None:
    copier = Copier(LinkScheduler("mem", capacity=10e9))
    copier.close()
    with pytest.raises(RuntimeError, match="closed"):
        copier.submit("t", np.zeros(1, np.uint8), np.zeros(1, np.uint8), 1)


def test_a_copy_whose_waiter_gave_up_does_not_stop_the_copier() -> None:
    # What asyncio.wrap_future does when the awaiting task is cancelled: cancel().
    started = threading.Event()
    go_on = threading.Event()

    class Gated:
        def copy(self, dst: Any, src: Any, offset: int, nbytes: int) -> None:
            started.set()
            go_on.wait(10)
            np.copyto(dst[offset : offset + nbytes], src[offset : offset + nbytes])

    src, dst = np.ones(MiB, np.uint8), np.zeros(MiB, np.uint8)
    with Copier(LinkScheduler("mem", capacity=10e9, chunk_bytes=MiB // 2), Gated()) as copier:
        running = copier.submit("running", dst, src, MiB)
        queued = copier.submit("queued", dst.copy(), src, MiB)
        assert started.wait(10)
        # The copier is using both jobs' buffers: neither can be called off under it.
        assert not running.cancel()
        assert not queued.cancel()
        go_on.set()
        assert running.result(timeout=10).nbytes == MiB
        assert queued.result(timeout=10).nbytes == MiB
        later = copier.submit("later", np.zeros(MiB, np.uint8), src, MiB)
        assert later.result(timeout=10).nbytes == MiB

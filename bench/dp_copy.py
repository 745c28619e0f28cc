"""Copier throughput as a fraction of a plain memcpy of the same size.

Both copy between the same two prefaulted shared-memory slabs, so page faults do
not enter either figure. The copier's time runs from submit to the future's
result: scheduling, chunking and the thread hand-over are all in it. The two alternate,
so both see the same noise from other work on the machine. Goal: >= 80%.

    .venv/bin/python -m bench.dp_copy
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bench.dp_common import GiB, MiB, machine, percentile, table
from shared.dataplane.bandwidth import LinkScheduler
from shared.dataplane.copier import Copier, CopyEngine, NumpyEngine, TorchEngine
from shared.dataplane.shm import ShmBackend
from shared.schema import DType

SIZES = (16 * MiB, 256 * MiB, GiB)
CHUNKS = (MiB, 2 * MiB, 4 * MiB)
_ids = itertools.count()


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def plain_numpy(dst: Any, src: Any, n: int) -> None:
    np.copyto(dst[:n], src[:n])


def plain_torch(dst: Any, src: Any, n: int) -> None:
    dst[:n].copy_(src[:n])


def through_copier(copier: Copier, dst: Any, src: Any, n: int) -> None:
    copier.submit(f"t{next(_ids)}", dst, src, n).result()


def measure(
    engine: CopyEngine, plain: Callable[[Any, Any, int], None], dst: Any, src: Any
) -> list[list[object]]:
    """Plain copies and copier runs alternate, so both see the same machine noise."""
    rows: list[list[object]] = []
    for size in SIZES:
        reps = 40 if size <= 256 * MiB else 8
        for chunk in CHUNKS:
            sched = LinkScheduler("mem0", capacity=20e9, chunk_bytes=chunk)
            base: list[float] = []
            took: list[float] = []
            with Copier(sched, engine) as copier:
                for rep in range(reps + 1):
                    b = timed(lambda: plain(dst, src, size))  # noqa: B023
                    c = timed(lambda: through_copier(copier, dst, src, size))  # noqa: B023
                    if rep:  # the first round warms caches and the thread
                        base.append(b)
                        took.append(c)
            b50, c50 = percentile(base, 50), percentile(took, 50)
            rows.append([size // MiB, chunk // MiB, size / b50 / 1e9, size / c50 / 1e9, b50 / c50])
    return rows


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()  # --help; no options
    shm = ShmBackend(prefix="gfaas-bench-")
    a = shm.create_slab(GiB, "bench", prefault=True)
    b = shm.create_slab(GiB, "bench", prefault=True)
    try:
        src = shm.as_numpy(a.segment, 0, GiB, DType.UINT8, [GiB])
        dst = shm.as_numpy(b.segment, 0, GiB, DType.UINT8, [GiB])
        src[:] = 7
        rows = [["numpy", *r] for r in measure(NumpyEngine(), plain_numpy, dst, src)]
        tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
        rows += [["torch", *r] for r in measure(TorchEngine(), plain_torch, tdst, tsrc)]
        print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
        headers = ["engine", "size MiB", "chunk MiB", "plain copy GB/s", "copier GB/s"]
        print(table([*headers, "copier / plain"], rows))
        del src, dst, tsrc, tdst
    finally:
        shm.destroy_slab(a.segment)
        shm.destroy_slab(b.segment)


if __name__ == "__main__":
    main()

"""Spatial sharing of a CPU: each instance its own cores.

An instance's spatial share is a fraction of the node's cores: it gets that many,
disjoint from every other instance's, so CPU-bound instances run side by side
instead of time-slicing the same cores. `assign_cores` packs whole instances
(each share rounded up, at least one core); `cores_at` gives the cores of a slot the
2-D packer placed (its share to within one core, see there). Both are pure; `pin`
applies one to a thread or a process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping

from shared.sharing import ShareError

EPS = 1e-9


def node_cores() -> frozenset[int]:
    """The cores this process may run on (a container's cpuset, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def cores_for(share: float, total: int) -> int:
    """Cores for a share of `total`: rounded up (a share is a floor, not a ceiling),
    at least one."""
    if not 0.0 < share <= 1.0:
        raise ShareError(f"core share {share} must be above 0 and at most 1")
    # EPS: 0.7 * 10 is 7.000000000000001 in floats, and must stay 7.
    return max(1, math.ceil(share * total - EPS))


def assign_cores(
    cores: Iterable[int],
    shares: Mapping[str, float],
    current: Mapping[str, frozenset[int]] | None = None,
) -> dict[str, frozenset[int]]:
    """Disjoint core sets for the instances in `shares`, given in that order.

    An instance in `current` keeps its cores while they are still the right number
    and on offer (moving a running instance costs it its caches). ShareError names
    the first instance the cores run out for.
    """
    pool = sorted(set(cores))
    wanted = {name: cores_for(share, len(pool)) for name, share in shares.items()}
    kept = {
        name: held
        for name, held in (current or {}).items()
        if name in wanted and len(held) == wanted[name] and held <= set(pool)
    }
    taken = set().union(*kept.values()) if kept else set()
    assigned: dict[str, frozenset[int]] = {}
    for name, count in wanted.items():
        if name in kept:
            assigned[name] = kept[name]
            continue
        free = [c for c in pool if c not in taken]
        if len(free) < count:
            raise ShareError(
                f"{name} needs {count} of the node's {len(pool)} cores (share "
                f"{shares[name]:g}) and {len(free)} are left: the cores are exhausted"
            )
        assigned[name] = frozenset(free[:count])
        taken.update(free[:count])
    return {name: assigned[name] for name in shares}


# Slot edges are counted in billionths of the row: whole numbers, so the edge where
# one slot ends and the next begins (0.1 + 0.2 and 0.3 in floats) is the same edge.
_UNIT = 10**9
_SLACK = 1000


def cores_at(offset: float, share: float, cores: Iterable[int]) -> frozenset[int]:
    """The cores for a spatial slot that starts at `offset` (a fraction, as the 2-D
    packer places it) and spans `share` of the node's cores: instances the packer
    puts side by side get disjoint cores, and those it stacks in time (which never
    hold the device together) may reuse the same ones.

    The row of cores is laid over [0, 1): core k goes to the slot that covers its
    middle, (k + 1/2) / n. So slots that do not overlap never share a core, and a
    slot gets its share of the cores to within one (exactly, when the share is a
    whole number of cores, wherever the slot sits). A slot narrower than one core
    may cover no core's middle; it still gets one core, the one it lies in, which
    a neighbour may have too: slots at least one core wide (share >= 1/n) are
    always disjoint, narrower ones only where the rounding allows, and with fewer
    cores than slots some slots necessarily share cores.
    """
    pool = sorted(set(cores))
    if not pool:
        raise ShareError("no cores to give")
    if not 0.0 < share <= 1.0:
        raise ShareError(f"core share {share} must be above 0 and at most 1")
    if not 0.0 <= offset < 1.0:
        raise ShareError(f"offset {offset} must be in [0, 1)")
    start = round(offset * _UNIT)
    end = start + round(share * _UNIT)
    if end > _UNIT + _SLACK:
        raise ShareError(f"a slot at {offset} of share {share} runs past the end of the cores")
    end = min(end, _UNIT)  # within float noise of the end (packing.units allows 1e-8)
    n = len(pool)
    first, last = _first_core_at(start, n), _first_core_at(end, n)
    if first == last:  # narrower than a core, and covering no core's middle
        first = min((start + end) // 2 * n // _UNIT, n - 1)
        last = first + 1
    return frozenset(pool[first:last])


def _first_core_at(edge: int, n: int) -> int:
    """The first of `n` cores whose middle is at or after `edge`: ceil(edge*n - 1/2)."""
    return -((_UNIT - 2 * edge * n) // (2 * _UNIT))


def pin(cores: frozenset[int], *, pid: int = 0, torch_threads: bool = True) -> None:
    """Run `pid` (0: the calling thread; threads it starts inherit this) on `cores`
    only, and size torch's intra-op pool to match.

    The torch pool is process-wide and its threads keep the affinity they started
    with: pin an instance process before its first torch operation, and pass
    `torch_threads=False` when pinning one thread among others.
    """
    if not cores:
        raise ShareError("an instance needs at least one core")
    if not hasattr(os, "sched_setaffinity"):
        raise ShareError("this platform cannot pin threads to cores (no sched_setaffinity)")
    os.sched_setaffinity(pid, cores)
    if torch_threads:
        import torch  # here, not at the top: assigning cores needs no torch

        torch.set_num_threads(len(cores))

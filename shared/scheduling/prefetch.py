"""Which deployed models a node keeps in its host tier before any request asks
(FaaSwap: models live in host memory, and a cold start only moves them onto the
device). Pure: the node's prefetcher (services/gpu_worker/prefetch.py) calls it with
what the registry and the store say, and acts on the plan.

A cold start whose model is in the host tier skips the object store: 78 ms to the
first answer instead of 415 ms for a 100 MB model on the development machine
(docs/benchmarks.md, cold starts). The tier's budget decides how many fit: models
are taken smallest first, which keeps the most functions' starts off the store for
the bytes (a model larger than what is left is skipped, not waited for: smaller ones
behind it still fit). Models no deployed function uses any more, or replaced by a
new push, are dropped; a model a process here still serves is kept until it is not.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Stored:
    """A deployed function's model as the store holds it now."""

    model: str
    key: str  # what the host tier keys its current weights by (a re-push: a new key)
    nbytes: int


@dataclass(frozen=True, slots=True)
class PrefetchPlan:
    fetch: tuple[Stored, ...]  # smallest first
    drop: tuple[tuple[str, str], ...]  # (model, key) prefetched here and wanted no more
    skipped: tuple[str, ...]  # wanted, but past the budget (loaded on demand)


def plan(
    wanted: Collection[Stored],
    held: Mapping[tuple[str, str], int],
    budget: int,
    in_use: Collection[str] = (),
) -> PrefetchPlan:
    """What to fetch and drop so the tier holds the most wanted models within
    `budget` bytes. `held`: what this node prefetched, (model, key) -> bytes;
    `in_use`: models a process here serves (never dropped, whatever is wanted: a
    replaced copy goes once nothing here serves from it)."""
    current = {w.model: w for w in wanted}
    drop = []
    kept = 0
    for (model, key), nbytes in sorted(held.items()):
        stored = current.get(model)
        if (stored is None or stored.key != key) and model not in in_use:
            drop.append((model, key))
        else:
            kept += nbytes
    room = budget - kept
    fetch = []
    skipped = []
    for w in sorted(current.values(), key=lambda w: (w.nbytes, w.model)):
        if (w.model, w.key) in held:
            continue
        if w.nbytes <= room:
            fetch.append(w)
            room -= w.nbytes
        else:
            skipped.append(w.model)
    return PrefetchPlan(fetch=tuple(fetch), drop=tuple(drop), skipped=tuple(skipped))

"""Sharing one device among function instances, by time and by space (issue 8).

- `tokens`: temporal sharing, a per-device token arbiter (pure, injected clock).
- `runner`: the arbiter under anyio, for a worker's batch loop.
- `cpu`: spatial sharing of a CPU, disjoint core sets per instance.
- `mps`: spatial sharing of a GPU through CUDA MPS (an environment per instance
  process, and the control daemon); without MPS a GPU is shared by time only.

Nothing here imports GPU libraries: MPS is driven through its command-line tool.
"""

from __future__ import annotations


class ShareError(ValueError):
    """A share that cannot be given: the reason says which and why."""

"""Placement policies: pure decisions over a view of the cluster.

The live scheduler service and the simulator call the same code. Nothing here does
I/O or reads a clock: time comes in as an argument.
"""

from shared.scheduling.base import Policy, RequestView, WorkerView, make_policy

__all__ = ["Policy", "RequestView", "WorkerView", "make_policy"]

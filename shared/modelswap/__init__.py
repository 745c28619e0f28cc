"""Models that are always warm: a node-wide host tier and pipelined swap-in.

Weights live in the object store (cold), in a host tier of shared-memory segments
that every worker on the node maps (warm), and in a worker's device memory (hot).
A swap-in copies parameter groups from the host tier to the device in order while
the model already runs: each torch operation waits for the groups of the weights
it reads (see pipeline.py).
"""

from shared.modelswap.host_tier import HostModel, HostTier, tier_prefix
from shared.modelswap.pipeline import SwapIn, group_parameters, instantiate, skeleton

__all__ = [
    "HostModel",
    "HostTier",
    "SwapIn",
    "group_parameters",
    "instantiate",
    "skeleton",
    "tier_prefix",
]

"""gfaas: a GPU-efficient serverless platform for ML inference over NATS.

User-facing pieces: the `gfaas` command line, `Client`, and the handler contract
(`LoadContext`).
"""

from gfaas.client import Client
from shared.function import LoadContext

__all__ = ["Client", "LoadContext"]

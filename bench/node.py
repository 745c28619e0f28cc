"""A quiet single-node platform for the live benches: one worker, no fronts, no metrics."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from gfaas.supervisor import Supervisor
from shared.config import Settings


def start_node(url: str, state: Path, tag: str, env: Mapping[str, str] | None = None) -> Supervisor:
    """The platform's services on NATS at `url` (state under `state`), with their own
    shared-memory namespace (`gfaas-<tag>-...`) and `env`'s settings for the children."""
    os.environ.update(
        {
            "GFAAS_HEARTBEAT_S": "0.2",
            "GFAAS_HTTP_ENABLED": "0",
            "GFAAS_GRPC_ENABLED": "0",
            "GFAAS_METRICS_ENABLED": "0",
            "GFAAS_SHM_NAMESPACE": f"gfaas-{tag}-{secrets.token_hex(3)}",
            **(env or {}),
        }
    )
    # The children's environment is built from these (gfaas.supervisor.service_env), over
    # os.environ: the fronts and metrics stay off only if they are off here too.
    settings = Settings(
        nats_url=url,
        state_dir=state,
        log_level="warning",
        http_enabled=False,
        grpc_enabled=False,
        metrics_enabled=False,
    )
    sup = Supervisor(settings=settings, nats_url=url, workers=1)
    sup.start()
    return sup

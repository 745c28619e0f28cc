"""Service settings: one frozen dataclass, read from GFAAS_* environment variables.

Command-line flags override the environment (gfaas.cli does that through
`Settings.with_overrides`); compose.yaml sets the environment, and a test checks
that every variable it sets is one listed in ENV_VARS.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"
DEFAULT_HTTP_PORT: Final = 8000
# Triton's gRPC port.
DEFAULT_GRPC_PORT: Final = 8001
# Each service's Prometheus metrics port when `metrics_port` is -1 (ingress on Triton's
# 8002); `gfaas up` gives every child its own, from 8002 up.
DEFAULT_METRICS_PORTS: Final[Mapping[str, int]] = {
    "ingress": 8002,
    "scheduler": 8003,
    "memory-broker": 8004,
    "gpu-worker": 8005,
}
# Headroom under the server's max_payload for headers and envelope fields.
PAYLOAD_HEADROOM: Final = 16 * 1024
# The longest deadline a caller may set on an invocation (see Settings.max_deadline_s).
DEFAULT_MAX_DEADLINE_S: Final = 900.0
# How long a request body may go without a byte (Settings.http_body_idle_s).
DEFAULT_HTTP_BODY_IDLE_S: Final = 30.0
# Shared-memory regions one tenant may hold registered (Settings.tenant_max_shm_regions).
DEFAULT_TENANT_MAX_SHM_REGIONS: Final = 1024


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    # One server, or a cluster's servers comma-separated (see `nats_servers`).
    nats_url: str = DEFAULT_NATS_URL
    state_dir: Path = Path(".gfaas")
    log_level: str = "info"
    log_json: bool = False
    # Largest request or reply body gfaas accepts; capped by the server's max_payload.
    max_payload: int = 1024 * 1024
    # Every POSIX shared-memory name this platform creates starts with this, so two
    # platforms on one node never share segments and shutdown can find its own.
    shm_namespace: str = "gfaas"
    # The node this service runs on: workers use their node's memory broker.
    node: str = "local"
    # Replicas of every JetStream stream, KV bucket and object store gfaas creates:
    # 3 on a three-node cluster keeps them (and async invocations) through a node's loss.
    js_replicas: int = 1
    # NATS authentication (shared/auth.py, docs/security.md). `nats_auth` says the bus
    # and the HTTP/gRPC fronts authenticate: ingress then wants a bearer token (an API
    # key from `gfaas tenant add`) on every route but health. `gfaas up` turns it on
    # unless --insecure. This service's NATS identity: a gfaas credentials file
    # (`nats_creds`, JSON with user and password) or the user and password themselves.
    # `auth_dir`: where the generated credentials, API key hashes and the server's
    # accounts live ("": state_dir/auth).
    nats_auth: bool = False
    nats_creds: str = ""
    nats_user: str = ""
    nats_password: str = ""
    auth_dir: str = ""
    # TLS for NATS: the CA clients verify the server with; for the embedded server of
    # `gfaas up`, its certificate and key (set both and it serves tls:// only).
    nats_tls_ca: str = ""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""
    # TLS for ingress's HTTP and gRPC fronts: its certificate (chain) and key, PEM; set
    # both and HTTP serves https only and gRPC TLS only (services/ingress/tls.py).
    # `http_tls_ca`: the CA gfaas's own HTTP clients (the demo) verify them with.
    http_tls_cert: str = ""
    http_tls_key: str = ""
    http_tls_ca: str = ""
    # Metrics (shared.metrics): OpenTelemetry metrics served as Prometheus text on
    # http_host:metrics_port; -1 is the service's port in DEFAULT_METRICS_PORTS, 0 any
    # free port (each service's status says which). metrics_enabled False: none served.
    metrics_port: int = -1
    metrics_enabled: bool = True
    # ingress
    http_host: str = "0.0.0.0"
    http_port: int = DEFAULT_HTTP_PORT
    http_enabled: bool = True
    # How long an HTTP request's body may go without a byte arriving before it is
    # answered 408 and its connection closed (a client stalled midway, or gone unsaid).
    http_body_idle_s: float = DEFAULT_HTTP_BODY_IDLE_S
    # The gRPC Open Inference Protocol front, on http_host too.
    grpc_port: int = DEFAULT_GRPC_PORT
    grpc_enabled: bool = True
    # The most shared-memory regions (system and CUDA) one tenant may hold registered
    # with an ingress (0: no cap); past it, register is `quota_exceeded`.
    tenant_max_shm_regions: int = DEFAULT_TENANT_MAX_SHM_REGIONS
    async_concurrency: int = 16
    # The longest a caller may give an invocation (its `Gfaas-Deadline-Ms` header, its
    # request's `timeout_ms`, the OIP `timeout` parameter, a gRPC deadline): one set
    # further out is cut to this (or to the function's own timeout, when longer), so a
    # caller cannot hold queue slots, grants and leases for days. inf: no cap.
    max_deadline_s: float = DEFAULT_MAX_DEADLINE_S
    # Async invocations: a delivery not acknowledged (nor kept alive by in-progress
    # acks) within this long goes to another ingress; a fault that is not the
    # caller's is retried, waiting backoff_s, doubling up to backoff_max_s, until
    # max_attempts deliveries, after which it fails with the reason.
    async_ack_wait_s: float = 10.0
    async_max_attempts: int = 10
    async_backoff_s: float = 0.2
    async_backoff_max_s: float = 5.0
    # How long ingress waits to hear from the active scheduler before answering
    # `unavailable` (and how long a standby waits before taking over).
    scheduler_timeout_s: float = 1.5
    # scheduler
    # Locality-aware (GPU-FaaS's LALB with out-of-order dispatch): measured best with
    # slo, ahead of least_loaded by 3.2x mean and 3.6x p99 latency, and 100% of SLOs
    # met against 89.7% (docs/benchmarks.md, bench.live_policies); slo refused one call.
    policy: str = "locality"
    worker_timeout_s: float = 1.5
    pending_limit: int = 10_000
    # How long a grant of worker slots to an ingress lasts unless renewed
    # (shared.scheduling.grants); 0 turns direct sends off.
    grant_ttl_s: float = 2.0
    # Started by `gfaas up`, which runs the workers and restarts one that exits: a
    # caller told there is no worker is not told to start one.
    supervised: bool = False
    # Function instances: an instance beyond its function's burst floor (what a burst
    # of the rate left behind) goes after this many seconds idle while the function
    # still has a rate; the spec's idle_s stays the keep-alive of the last ones
    # (shared.scheduling.autoscale). Negative: idle_s for all (the default).
    surplus_idle_s: float = -1.0
    # gpu_worker
    # The user instance processes run as when the services run as root (issue 10,
    # services/gpu_worker/privileges.py): a name or uid ("" or "none": the agent's own
    # user; ignored when not root; "auto", the default: nobody where it can read what an
    # instance needs, shared.dataplane.access), and the group they share the node's
    # segments with (a name or gid; "": the user's primary group).
    handler_user: str = "auto"
    handler_group: str = ""
    # With a handler user: each instance its own uid from this range ("START-END", no
    # passwd entries needed), all in the handler group, so no handler can signal or
    # trace another instance; "": every instance the handler user's uid.
    handler_uids: str = ""
    # Packages handlers may come from ("module:attr" with the module one of these or
    # under one), comma-separated: a spec naming anything else (`subprocess:run`) is
    # refused at deploy and never imported by a worker.
    handler_packages: str = "examples,tests,bench"
    # A code bundle (a spec's `code`, shared/codebundle.py) a node extracts holds at
    # most this many MiB uncompressed (and at most 4096 files, 32 MiB each).
    code_bundle_max_mb: int = 64
    worker_id: str = ""
    device: str = "auto"
    threads: int = 1
    capacity: int = 64
    # Device tier (models on the worker's device), MiB; 0 = most of the device.
    device_cache_mb: int = 0
    # Parameter-group size for pipelined swap-in.
    swap_group_kb: int = 2048
    heartbeat_s: float = 0.5
    # Function instances (issue 8). The worker is also its device's agent: it starts
    # instances of functions that ask for them (spec keys min/max_instances,
    # sm_share, time_quota) as processes of their own, up to `agent_memory_mb` in
    # all (0: the device tier's size), sharing the device's time in windows of
    # `token_window_s` (below).
    agent_enabled: bool = True
    # Instance processes kept started (interpreter and torch loaded) while any
    # deployed function runs as instances: a start from zero takes one.
    agent_spares: int = 1
    agent_memory_mb: int = 0
    # An instance not ready this long after its start (a handler build or model load
    # that never returns) is stopped and fails with that reason: it would hold its
    # share of the device, and its callers, for ever.
    instance_start_timeout_s: float = 600.0
    # Each instance process: at most this many open files, and on a CPU at most its
    # memory budget plus this much private memory for the interpreter and torch
    # (-1: no memory cap). See services/gpu_worker/limits.py.
    instance_max_files: int = 1024
    instance_memory_slack_mb: int = 1024
    # 20 ms: a request that finds its instance's quota used waits for the next window,
    # and 100 ms windows cost SLOs of tens of ms up to 75 ms (bench.live_sharing).
    token_window_s: float = 0.02
    # Instances of one model on a CPU map one read-only copy of its weights (the
    # host tier's), instead of each copying them: a cold start copies nothing and a
    # device's memory holds each model's weights once. Off: each instance its copy.
    shared_weights: bool = True
    # Set by an agent for the instance processes it starts: the one function served,
    # the agent (whose token arbiter gates each run), and the cores ("0,1"; "": any).
    instance_function: str = ""
    instance_agent: str = ""
    instance_cores: str = ""
    # ... and whether its runs wait for the agent's token arbiter (StartInstance.gated).
    instance_gated: bool = True
    # ... and, when instances run as the handler user, the instance's own working
    # directory (its HOME): set, the process switches to that user before serving.
    instance_dir: str = ""
    # ... and the uid it switches to there, when the agent gives each its own
    # (`handler_uids`; 0: the handler user's).
    instance_uid: int = 0
    # ... and, for a function whose handler comes from a code bundle, that bundle
    # ("NAME@sha256:<hex>") and where the agent extracted it: first on the import path.
    instance_code: str = ""
    instance_code_dir: str = ""
    # ... and the spec (JSON) of the version it was started for (StartInstance.spec).
    instance_spec: str = ""
    # ... and, for a profile run in an instance process (the node isolates handlers,
    # or the function has a code bundle): the file the process writes its function's
    # profile into, then exits.
    instance_profile: str = ""
    # ... and, for a profile process that measures one spatial share (its agent
    # applied it as an instance's: an MPS share, or that part of the cores), the share
    # its rows stand for (0: it measures the grid over its own cores itself).
    instance_profile_share: float = 0.0
    # Deployed functions' models a node puts into its host tier before any request
    # (services/gpu_worker/prefetch.py), up to this many MiB: a cold start then
    # skips the object store. 0: none; below 0: a quarter of the node's memory.
    host_prefetch_mb: int = -1
    # Profile each spatial share in a process of its own, with the share applied as an
    # instance's is: "auto" where the device is a GPU under MPS (an SM share applies to
    # a whole process, so one process cannot measure several), "true" or "false".
    profile_per_share: str = "auto"
    # memory_broker: per-device pool cap, slab size, and the default lease TTL.
    pool_cap_mb: int = 4096
    # Host memory's own cap (0: pool_cap_mb): where parked data spills to.
    host_pool_cap_mb: int = 0
    # Pooled devices, comma-separated ("" = cpu and every CUDA device); "emu:N" is a
    # device pool kept in host shared memory (CPU-only nodes, tests).
    pool_devices: str = ""
    slab_mb: int = 64
    lease_ttl_s: float = 300.0
    # The longest TTL a lease may ask for (a longer one, or inf, is refused), and each
    # tenant's share of the node's pools: pooled bytes (MiB, over every device; 0: no
    # quota but the caps) and live leases (0: none). Over quota: `quota_exceeded`.
    max_lease_ttl_s: float = 3600.0
    tenant_pool_mb: int = 0
    tenant_max_leases: int = 16384
    # How long a slab stays empty before the pool gives it back.
    pool_cooldown_s: float = 30.0
    # Chunk size of broker copies (bandwidth arbitration), KiB, and how each link
    # orders them: "fair" (weighted fair sharing) or "fifo" (whole transfers in turn,
    # the baseline the benchmarks compare against).
    copy_chunk_kb: int = 2048
    link_mode: str = "fair"


# Environment variable -> field. compose.yaml may only use these.
ENV_VARS: Final[Mapping[str, str]] = {
    f"GFAAS_{field.name.upper()}": field.name for field in dataclasses.fields(Settings)
}


# What a boolean variable may say ("": unset, as compose writes `VAR: ""`).
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})


def _convert(field: dataclasses.Field[Any], raw: str) -> Any:
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    if kind == "bool":
        word = raw.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        # Not read as False: GFAAS_NATS_AUTH=ture turned authentication off unsaid.
        raise ValueError(f"not a boolean (one of {', '.join(sorted((_TRUE | _FALSE) - {''}))})")
    if kind == "int":
        return int(raw)
    if kind == "float":
        value = float(raw)
        if math.isnan(value):
            # Every comparison with it is false: GFAAS_HEARTBEAT_S=nan, say, and a
            # service would beat never, or always, while saying nothing of why.
            raise ValueError("not a number (NaN)")
        return value
    if kind == "Path":
        return Path(raw)
    return raw


def settings_from_env(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Environment first, then explicit overrides (None means 'not given')."""
    env = os.environ if env is None else env
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}
    for var, name in ENV_VARS.items():
        if var in env:
            try:
                values[name] = _convert(fields[name], env[var])
            except ValueError as exc:
                raise ValueError(f"{var}={env[var]!r}: {exc}") from exc
    for name, value in overrides.items():
        if name not in fields:
            raise TypeError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = value
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as the GFAAS_* environment `settings_from_env` reads back: for a
    child process that must run with this process's settings, flags included."""
    env: dict[str, str] = {}
    for var, name in ENV_VARS.items():
        value = getattr(settings, name)
        env[var] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def nats_servers(url: str) -> list[str]:
    """The server URLs in a `nats_url`: one, or a cluster's comma-separated, so a
    client fails over between them."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError(f"no NATS server in {url!r}")
    return servers


def effective_max_payload(settings: Settings, server_max_payload: int) -> int:
    return min(settings.max_payload, server_max_payload - PAYLOAD_HEADROOM)

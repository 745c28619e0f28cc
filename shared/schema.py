"""Every message gfaas puts on the bus, defined once.

MessagePack on the wire (msgspec Structs, validated on decode). Request-level
metadata (invocation id, tenant, deadline) travels in NATS headers
so that services which only route a message never decode its body.
See docs/protocol.md for the subjects each message travels on.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Final, TypeVar

import msgspec

SCHEMA_VERSION: Final = "v1"
DEFAULT_TENANT: Final = "default"

# NATS header names. Values are strings; numbers are decimal.
H_INVOCATION: Final = "Gfaas-Invocation-Id"
H_TENANT: Final = "Gfaas-Tenant"
H_FUNCTION: Final = "Gfaas-Function"
H_DEADLINE: Final = "Gfaas-Deadline-Ms"
H_CALLBACK: Final = "Gfaas-Callback"
H_STATUS: Final = "Gfaas-Status"
H_MSG_ID: Final = "Nats-Msg-Id"
# A workflow stage's preferred worker: the one whose pool holds its inputs.
H_AFFINITY: Final = "Gfaas-Affinity"
# The node whose memory pool holds an invocation's by-handle inputs (set by admission):
# workers there read them in place.
H_INPUT_NODE: Final = "Gfaas-Input-Node"
# The ingress instance an invocation entered through. The scheduler may lend that
# ingress slots for its function (a Grant); a worker sends the Done for an invocation
# the scheduler placed to `done.scheduler.<origin>`, so that ingress knows which of
# what it forwarded is finished (and answers the rest if the scheduler dies).
H_ORIGIN: Final = "Gfaas-Origin"
# On a message to a worker only: an ingress sent it directly under a grant, and the
# worker's Done goes back to that ingress (`done.<ingress>`).
H_DIRECT: Final = "Gfaas-Direct"
# An async invocation's attempt: the results-KV revision its record had when ingress
# sent it. The worker claims the record at that revision before running, so an
# attempt that another has superseded never runs (services/ingress/async_path.py).
H_CLAIM: Final = "Gfaas-Claim"
# Why a message went to the dead-letter stream, and its error code.
H_DEAD_REASON: Final = "Gfaas-Dead-Reason"
H_DEAD_CODE: Final = "Gfaas-Dead-Code"
# The caller's reply subject when it is one a client may not pass on as a reply:
# nats-server refuses a publish whose reply is a service import's (`_R_.`, a tenant's
# request through its account's import). Forwarders carry it here instead, and the
# worker publishes its answer to it (shared.bus `reply_of`), so a tenant's reply
# takes no more hops than any other caller's.
H_REPLY: Final = "Gfaas-Reply"
RESERVED_REPLY_PREFIX: Final = "_R_."

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FUNCTION_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_FUNCTION = "unknown_function"
    INVALID_INPUT = "invalid_input"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    HANDLER_ERROR = "handler_error"
    MODEL_UNAVAILABLE = "model_unavailable"
    NO_WORKER = "no_worker"
    OVERLOADED = "overloaded"
    WORKER_LOST = "worker_lost"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_FOUND = "not_found"
    PENDING = "pending"
    INTERNAL = "internal"
    # A service the invocation needs (the scheduler) is not running or stopped
    # answering: not the caller's fault, worth retrying.
    UNAVAILABLE = "unavailable"
    # Another attempt of this async invocation owns it; this one was not run.
    SUPERSEDED = "superseded"
    # The node's memory broker pools no memory on the device asked for (no cupy, say):
    # callers that can, lease in host memory instead.
    NO_POOL = "no_pool"
    QUOTA_EXCEEDED = "quota_exceeded"  # a tenant's share of the node's pools is used up
    # No configuration of the function meets its SLO on this node's devices, and its
    # spec says to refuse (`slo_unmeetable = "reject"`) rather than serve late.
    SLO_UNMEETABLE = "slo_unmeetable"


# Failures that are the caller's (or its function's) doing: retrying cannot help, so
# an async invocation stores them as its result. Every other code is a fault of the
# platform and is retried (DEADLINE_EXCEEDED only when no worker ran it).
CALLER_FAULTS: Final = frozenset(
    {
        ErrorCode.BAD_REQUEST,
        ErrorCode.UNKNOWN_FUNCTION,
        ErrorCode.INVALID_INPUT,
        ErrorCode.PAYLOAD_TOO_LARGE,
        ErrorCode.HANDLER_ERROR,
        ErrorCode.NOT_FOUND,
        # Final, as it was when the broker said it with bad_request: a node does not
        # gain a pool between attempts.
        ErrorCode.NO_POOL,
        # The function's spec asks for an SLO no configuration of it meets.
        ErrorCode.SLO_UNMEETABLE,
    }
)


class DType(StrEnum):
    BOOL = "bool"
    UINT8 = "uint8"
    UINT16 = "uint16"
    UINT32 = "uint32"
    UINT64 = "uint64"
    INT8 = "int8"
    INT16 = "int16"
    INT32 = "int32"
    INT64 = "int64"
    FLOAT16 = "float16"
    FLOAT32 = "float32"
    FLOAT64 = "float64"


class FunctionKind(StrEnum):
    CPU = "cpu"
    GPU = "gpu"


class OutputMode(StrEnum):
    """How a worker returns outputs: bytes in the reply, or handles to pooled buffers.

    `auto` sends by value unless the reply would exceed the bus's payload limit. Only
    callers on the node (sharing /dev/shm, or the GPU for CUDA handles) can open handles.
    """

    VALUE = "value"
    HANDLE = "handle"
    AUTO = "auto"


class _Msg(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every wire message: unknown fields are an error, not silently dropped."""


class ErrorInfo(_Msg):
    code: ErrorCode
    reason: str


class Tensor(_Msg):
    """A tensor by value: little-endian, C-order bytes."""

    name: str
    dtype: DType
    shape: list[int]
    data: bytes = b""
    # Set instead of `data` when the bytes live in a memory-broker pool.
    handle: Handle | None = None


class Handle(_Msg):
    """A reference to bytes in a memory-broker pool, sent instead of the bytes.

    backend "shm": `segment` is a POSIX shared-memory name; backend "cuda": `segment`
    is the slab's cudaIpcMemHandle (hex). Opening checks `generation` against the
    lease and `tenant` against the invocation's, so a stale or foreign handle is
    refused, never read.
    """

    backend: str
    pool: str
    segment: str
    device: str
    offset: int
    nbytes: int
    lease_id: str
    generation: int
    tenant: str = DEFAULT_TENANT
    slab_size: int = 0
    # The lease's slot on the node's lease board (shared.dataplane.board), so a
    # consumer can verify the handle without asking the broker; -1: ask.
    slot: int = -1


class TensorSpec(_Msg):
    name: str
    dtype: DType
    # -1 marks a variable dimension.
    shape: list[int]


class FunctionSpec(_Msg):
    name: str
    handler: str  # "module:attr"
    kind: FunctionKind = FunctionKind.CPU
    model: str = ""  # object-store name of the weights; empty for none
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    memory_mb: int = 256
    slo_ms: float = 1000.0
    timeout_ms: int = 30_000
    concurrency: int = 1
    description: str = ""
    # Instances, scaled from zero (issue 8): at least min_instances stay up, at most
    # max_instances run (0: no limit), and an instance idle for idle_s goes away.
    min_instances: int = 0
    max_instances: int = 0
    idle_s: float = 300.0
    # Fixed shares of one device, as fractions: its SMs (MPS thread percentage, or a
    # CPU's cores) and its time (a token window). 0: the autoscaler chooses.
    sm_share: float = 0.0
    time_quota: float = 0.0
    # When no configuration meets slo_ms: serve anyway ("best_effort") or answer
    # each request `slo_unmeetable` ("reject").
    slo_unmeetable: str = "best_effort"
    # The code bundle the handler comes from, pinned by digest: "NAME@sha256:<hex>",
    # what `gfaas code push` prints (shared/codebundle.py). Set, the function runs
    # only as instances, each with that bundle first on its import path.
    code: str = ""


class InvokeRequest(_Msg):
    inputs: list[Tensor] = []
    # Optional here: the header wins, and ingress assigns one when both are absent.
    invocation_id: str = ""
    timeout_ms: int = 0
    # Async invocations only: a subject to publish the InvokeReply to when done.
    callback: str = ""
    outputs_by: OutputMode = OutputMode.VALUE
    # Who holds output leases once the reply is sent (they release them, or the
    # lease's TTL does); empty: the invocation itself, so only the TTL frees them.
    holder: str = ""


class InvokeReply(_Msg):
    invocation_id: str
    outputs: list[Tensor] = []
    error: ErrorInfo | None = None
    worker: str = ""
    exec_ms: float = 0.0


class LeaseRequest(_Msg):
    """Ask the node's memory broker for pooled buffers, one per size."""

    sizes: list[int]
    # The first holder; a worker's leases are reclaimed when its heartbeats stop.
    owner: str
    device: str = "cpu"
    ttl_s: float = 0.0  # 0: the broker's default
    # Handles to check (as `check` does) before leasing: a worker's inputs and its
    # output buffers in one round trip.
    check: list[Handle] = []
    # If set, each checked handle also gets one reference of this holder (a worker's
    # own inputs while it runs): all or none, like the leases.
    retain: str = ""


class _HandlesOp(_Msg):
    """What every broker op on existing leases names: the handles, and whose
    references they concern."""

    handles: list[Handle]
    holder: str = ""


class CheckRequest(_HandlesOp):
    """May `tenant` read these? With `holder`, also one reference of it each (all or
    none), kept while it reads."""


class RetainRequest(_HandlesOp):
    """One reference of `holder` more per handle (a fan-out consumer)."""


class ReleaseRequest(_HandlesOp):
    """One reference of `holder` less per handle; the last one frees the lease."""


class TransferRequest(_HandlesOp):
    """Move `holder`'s reference on each handle to `to` (a worker hands its outputs
    to the caller)."""

    to: str = ""


class ParkRequest(_HandlesOp):
    """Nobody reads these until `holder` unparks them: the broker may spill them."""

    # Seconds until the next reader is due (-1: not known).
    next_use_s: float = -1.0


class UnparkRequest(_HandlesOp):
    """Readable again; answered with the current handles (the bytes may have moved)."""


class HandlesReply(_Msg):
    handles: list[Handle] = []
    error: ErrorInfo | None = None


class ReadRequest(_Msg):
    """Bytes of a leased buffer, for a consumer on another node (the cross-node
    fallback: chunked messages instead of a shared mapping)."""

    handle: Handle
    offset: int = 0  # within the handle's bytes
    nbytes: int = -1  # -1: to the end


class BytesReply(_Msg):
    data: bytes = b""
    error: ErrorInfo | None = None


class CopyRequest(_Msg):
    """Copy leased bytes to a new lease on `device`, through the link scheduler."""

    source: Handle
    device: str
    owner: str
    # Fair-share weight. With a budget, the copy gets a minimum rate of
    # size / (budget - compute): the function's remaining latency budget (0: none)
    # less the consumer's expected compute time (FaaSTube).
    weight: float = 1.0
    budget_ms: float = 0.0
    compute_ms: float = 0.0
    flow: str = ""


class StageSpec(_Msg):
    """One step of a workflow: `inputs` maps the function's input names to sources,
    `$in.<name>` for a workflow input or `<stage>.<output>` for another stage's."""

    name: str
    function: str
    inputs: dict[str, str] = {}


class WorkflowSpec(_Msg):
    name: str
    stages: list[StageSpec]
    inputs: list[TensorSpec] = []
    # Workflow output name -> `<stage>.<output>`.
    outputs: dict[str, str] = {}
    slo_ms: float = 1000.0
    timeout_ms: int = 30_000
    description: str = ""


class HandlerCheck(_Msg):
    """A deploy asks a worker to dry-run `spec.handler` in a sandbox: does it import,
    and does it take what a handler takes? Nothing is built or loaded."""

    spec: FunctionSpec


class HandlerCheckReply(_Msg):
    """None: the handler imports and fits the contract. `handler_error`: it does not,
    and the reason says why; any other code: the worker could not check it."""

    error: ErrorInfo | None = None


class WorkerHeartbeat(_Msg):
    worker_id: str
    device: str
    pid: int
    memory_total: int
    memory_used: int
    memory_free: int
    models: list[str] = []
    # This process's own id, random at its start: a worker restarted under the same
    # `worker_id` (a fixed GFAAS_WORKER_ID, a container's hostname and pid 1) beats
    # with another, and the scheduler counts what the last process ran as lost.
    # Empty from workers that do not send it.
    boot: str = ""
    # Invocations it runs now; the scheduler reads it to forget work it counted
    # busy after a refusal (`Refused`) once the worker no longer runs that much.
    inflight: int = 0
    capacity: int = 1
    sent_at: float = 0.0
    # The device tier, for cache-aware placement; 0 / empty from workers that
    # do not report it. Keys are cache keys: the model, or a function without one.
    cache_capacity: int = 0  # bytes the device tier may hold
    model_bytes: dict[str, int] = {}  # every key on the device, loading ones included
    model_load_s: dict[str, float] = {}  # what its last load took (0: still loading)
    model_score: dict[str, float] = {}  # decayed use count when this was sent
    loading: list[str] = []  # keys still being loaded (resident, not yet usable)
    # The worker's node (Settings.node): where its memory broker's pools are.
    node: str = ""
    # Async invocations it claimed and has not yet stored the result of: an ingress
    # waiting on one learns from this whether it still runs here.
    claimed: list[str] = []
    # A function instance (issue 8): it serves `function` alone, started by the
    # node agent `agent`. Empty for a worker that serves any function.
    function: str = ""
    agent: str = ""
    # An instance still loading its handler and model (SAGE's parallel setup): it
    # takes the invocations that wait for its function's first instance and stages
    # their inputs meanwhile. Not ready yet: its agent waits for a beat without it.
    starting: bool = False


# -- function instances (issue 8): the scheduler commands node agents ----------------


class InstanceState(StrEnum):
    STARTING = "starting"  # its process starts; not yet heartbeating
    READY = "ready"
    STOPPING = "stopping"  # draining what it runs, then it exits
    FAILED = "failed"  # it could not start (the error says why)


class StartInstance(_Msg):
    """Start an instance of `function` on the agent's device with these shares."""

    instance_id: str
    function: str
    sm_share: float
    time_quota: float
    memory_bytes: int
    # Where the packer put its SM share (a fraction from the left): on a CPU, which
    # of the node's cores it gets.
    sm_offset: float = 0.0
    # The function's version (its spec's registry revision) the instance serves,
    # and that version's spec: a redeploy may land before the instance reads the
    # registry, and one whose code bundle changed it cannot load (the new bundle is
    # not on its import path), so it serves this one until it is replaced.
    version: int = 0
    spec: FunctionSpec | None = None
    # Its model and the bytes of that model's weights within `memory_bytes`: where
    # the agent's device shares weights, instances of one model hold them once.
    model: str = ""
    weight_bytes: int = 0
    # The function's code bundle ("NAME@sha256:<hex>"; empty: none): the agent fetches,
    # verifies and extracts it before the instance process is assigned.
    code: str = ""
    # Its runs wait for the agent's token arbiter (its time share). False for a
    # function that asked for no shares, run as instances only because its node
    # isolates handler code: it uses the device's time as the workers' functions do,
    # with no round trip to the agent per batch (bench.isolation_overhead).
    gated: bool = True


class InstanceFailed(_Msg):
    """An instance process tells its agent why it could not start (then exits)."""

    instance_id: str
    error: ErrorInfo


class StopInstance(_Msg):
    instance_id: str


class AgentReply(_Msg):
    error: ErrorInfo | None = None


class InstanceInfo(_Msg):
    instance_id: str
    function: str
    sm_share: float
    time_quota: float
    memory_bytes: int
    state: InstanceState
    pid: int = 0
    cores: list[int] = []
    # Seconds from the start command to the instance's first heartbeat (0: not yet).
    ready_s: float = 0.0
    # FAILED: why it could not start (kept in beats for a while, then forgotten).
    error: ErrorInfo | None = None
    version: int = 0  # see StartInstance.version
    model: str = ""  # see StartInstance.model
    weight_bytes: int = 0
    gated: bool = True  # see StartInstance.gated


class AgentBeat(_Msg):
    """A node agent's device and the instances on it, every heartbeat."""

    agent_id: str
    node: str
    device: str
    memory_total: int  # bytes instances on this device may hold in all
    cores: int  # the cores instances are given from (CPU sharing)
    # How the spatial share is enforced: "mps", "cores", or why only time is shared.
    spatial: str
    instances: list[InstanceInfo] = []
    sent_at: float = 0.0
    # Instances of one model here map one read-only copy of its weights (a CPU's
    # host tier), so `memory_total` holds each model's weights once.
    shares_weights: bool = False
    # Handler code runs on this node only as the unprivileged handler user, in
    # instances: the agent's own worker runs none, so every function runs as
    # instances (issue 10, services/gpu_worker/privileges.py).
    isolated: bool = False
    # Deployed models whose current weights are in this node's host tier (prefetched
    # or left by an instance): the packer prefers such a node for a new instance.
    host_models: list[str] = []


class ProfileRow(_Msg):
    """One measured configuration of a function on a device, at batch 1."""

    sm_share: float
    time_quota: float
    p50_ms: float
    p99_ms: float
    throughput: float  # req/s, back to back


class Profile(_Msg):
    function: str
    device: str
    agent: str
    rows: list[ProfileRow]
    measured_at: float = 0.0
    # How the spatial share was applied while measuring ("cores", "mps", "time only: ...").
    spatial: str = ""


class ProfileRequest(_Msg):
    function: str


class ProfileReply(_Msg):
    profile: Profile | None = None
    error: ErrorInfo | None = None


class TokenAcquire(_Msg):
    """An instance asks its agent for time on the device (reply: TokenGrant)."""

    instance_id: str


class TokenGrant(_Msg):
    slice_s: float = 0.0
    error: ErrorInfo | None = None


class TokenRelease(_Msg):
    """The grant ends; `used_s` of device time is charged (-1: it was never used,
    or the request for it was given up)."""

    instance_id: str
    used_s: float = -1.0


class WeightsRequest(_Msg):
    """A CUDA instance asks its agent for the device's one copy of its model's
    weights (reply: WeightsReply): SAGE's shared read-only weights."""

    instance_id: str
    model: str


class DeviceWeights(_Msg):
    """A device copy of a host-tier segment, as CUDA IPC exports it (what torch's
    `reduce_tensor` gives for the copy's byte tensor, field by field: no pickle)."""

    segment: str  # the host-tier segment it copies, byte for byte
    nbytes: int
    device: int
    handle: bytes
    storage_bytes: int
    storage_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes | None = None
    event_sync_required: bool = False


class WeightsReply(_Msg):
    weights: DeviceWeights | None = None
    error: ErrorInfo | None = None


class Done(_Msg):
    """A worker's note to the scheduler that an invocation left its hands."""

    worker_id: str
    invocation_id: str
    function: str
    ok: bool
    # The handler's running time where it ran to its end: an ok run, or one that
    # returned past its deadline (ok false, answered deadline_exceeded); else 0.
    exec_ms: float = 0.0
    # The reply subject it came with: which of two invocations under one id (callers
    # may reuse one) left, where both ran on this worker.
    reply: str = ""


class Refused(_Msg):
    """A worker at capacity hands an invocation the scheduler placed back to it
    (request-reply on `gfaas.v1.refused`), saying how full it is: `inflight` of
    `capacity` running. The scheduler still holds the invocation (body, headers,
    reply subject), so it places it again or queues it."""

    worker_id: str
    invocation_id: str
    inflight: int
    capacity: int
    # Its reply subject, as in `Done`: which one it is of two under one id.
    reply: str = ""


class RefusedReply(_Msg):
    """The scheduler's answer to `Refused`: `taken`, it answers for the invocation
    now; otherwise (it does not hold it) the worker answers the caller `overloaded`."""

    taken: bool


class Grant(_Msg):
    """Worker slots the scheduler reserves for one function, lent to one ingress.

    While it holds a grant, ingress sends that function's invocations straight to
    the worker, up to `slots` at a time, skipping the scheduler's hop. The grant
    lapses after `ttl_s` unless renewed (same `grant_id`, sent again); `slots` 0
    revokes it at once.
    """

    grant_id: str
    function: str
    worker_id: str
    slots: int
    ttl_s: float


class WorkerLost(_Msg):
    """The scheduler stopped hearing from a worker: whoever sent it work answers for it."""

    worker_id: str
    reason: str


class SchedulerBeat(_Msg):
    """A scheduler says it is alive, and whether it is the active one (it holds the
    leadership lease): ingress forwards only while an active one is heard. A standby
    (or a leader that lost its lease and will try to retake it) may lead any moment;
    one that is `stopping` will not."""

    scheduler_id: str
    active: bool
    stopping: bool = False


class AsyncState(StrEnum):
    PENDING = "pending"  # accepted; no worker has it (queued, sent, or waiting to retry)
    RUNNING = "running"  # a worker claimed this attempt and runs it
    DONE = "done"  # `reply` is the result, stored once


class AsyncRecord(_Msg):
    """An async invocation's record in the results KV (revisions order its attempts).

    Ingress answers `gfaas.v1.result.<id>` from it with an InvokeReply."""

    state: AsyncState
    attempt: int = 1
    worker: str = ""
    # The last retryable failure, while it waits to be tried again.
    last_error: ErrorInfo | None = None
    reply: InvokeReply | None = None


class ServiceStatus(_Msg):
    service: str
    instance: str
    version: str
    uptime_s: float
    details: dict[str, Any] = {}


class InvocationMeta(msgspec.Struct, frozen=True, kw_only=True):
    """The routing facts of one invocation, carried in NATS headers.

    The caller's reply subject rides in the NATS message's own reply field, which
    ingress and the scheduler forward unchanged, so the worker answers the caller
    directly.
    """

    invocation_id: str
    function: str
    tenant: str = DEFAULT_TENANT
    deadline_ms: int = 0
    # The ingress it entered through (H_ORIGIN), and an async attempt's claim (H_CLAIM).
    origin: str = ""
    claim: int = 0
    # The node holding its by-handle inputs ("": none); the scheduler prefers workers there.
    node: str = ""

    def to_headers(self) -> dict[str, str]:
        headers = {
            H_INVOCATION: self.invocation_id,
            H_FUNCTION: self.function,
            H_TENANT: self.tenant,
        }
        if self.deadline_ms:
            headers[H_DEADLINE] = str(self.deadline_ms)
        if self.origin:
            headers[H_ORIGIN] = self.origin
        if self.claim:
            headers[H_CLAIM] = str(self.claim)
        if self.node:
            headers[H_INPUT_NODE] = self.node
        return headers

    @classmethod
    def from_headers(cls, headers: Mapping[str, str] | None) -> InvocationMeta:
        h = headers or {}
        numbers: dict[str, int] = {}
        for name in (H_DEADLINE, H_CLAIM):
            try:
                numbers[name] = int(h.get(name, "0") or 0)
            except ValueError as exc:
                raise ValueError(f"header {name} is not an integer") from exc
        return cls(
            invocation_id=h.get(H_INVOCATION, ""),
            function=h.get(H_FUNCTION, ""),
            tenant=h.get(H_TENANT, DEFAULT_TENANT) or DEFAULT_TENANT,
            deadline_ms=numbers[H_DEADLINE],
            origin=h.get(H_ORIGIN, ""),
            claim=numbers[H_CLAIM],
            node=h.get(H_INPUT_NODE, ""),
        )

    def routing_problem(self) -> str:
        """Why these headers cannot be routed (a function name, an invocation id), or
        '': services past ingress answer such a message `bad_request`."""
        if not is_valid_function_name(self.function):
            return f"header {H_FUNCTION} must name a function, not {self.function!r}"
        if not is_valid_token(self.invocation_id):
            return f"header {H_INVOCATION} must be an invocation id, not {self.invocation_id!r}"
        if not is_valid_token(self.tenant):
            return f"header {H_TENANT} must be a tenant name, not {self.tenant!r}"
        return ""

    def remaining_s(self, now_ms: int | None = None) -> float:
        if not self.deadline_ms:
            return float("inf")
        now = now_ms if now_ms is not None else now_millis()
        return (self.deadline_ms - now) / 1000.0


def now_millis() -> int:
    return time.time_ns() // 1_000_000


def new_invocation_id() -> str:
    """128 random bits as 32 hex digits, uuid4().hex's shape without its version
    bits: made for every invocation, and uuid4 took 4.7 us a call here, this 0.6."""
    return os.urandom(16).hex()


def is_valid_token(value: str) -> bool:
    """Ids that end up in subjects and KV keys must be single NATS tokens."""
    return bool(_TOKEN.match(value))


def is_valid_function_name(name: str) -> bool:
    return bool(_FUNCTION_NAME.match(name))


_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {}

T = TypeVar("T")


def encode(msg: Any) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes | memoryview, kind: type[T]) -> T:
    """Decode and validate; raises msgspec.ValidationError or DecodeError."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    result: T = decoder.decode(data)
    return result


def error_reply(invocation_id: str, code: ErrorCode, reason: str) -> InvokeReply:
    return InvokeReply(invocation_id=invocation_id, error=ErrorInfo(code=code, reason=reason))


class FailureRecord(_Msg):
    """A failed invocation, logged once by whoever decided its outcome (the worker for
    what it ran, with the handler's traceback; ingress for what it refused or gave up
    on) and published on `gfaas.v1.logs.<function>` (kept in stream GFAAS_LOGS) for
    `gfaas logs`."""

    function: str
    invocation_id: str
    tenant: str
    code: ErrorCode
    reason: str
    trace_id: str = ""
    traceback: str = ""
    # Who logged it: "gpu-worker" or "ingress", and which instance.
    service: str = ""
    instance: str = ""
    at_ms: int = 0


# A Done note's outcome for ingress's metrics: "ok", or the error code the caller got.
H_OUTCOME: Final = "Gfaas-Outcome"

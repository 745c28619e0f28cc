"""The gRPC Open Inference Protocol front of ingress (KServe v2
`inference.GRPCInferenceService`, as Triton serves it on port 8001).

A `grpc.aio` server over the same InferenceBackend as the HTTP front (http.py), so
`tritonclient.grpc` works against gfaas. Message conversions live in grpc_codec.py;
this module looks models up, runs the calls and maps gfaas error codes to gRPC
status codes, the reason as the status details.

Not served (the server answers UNIMPLEMENTED): ModelStreamInfer (decoupled
streaming), TraceSetting and LogSettings.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import grpc
from anyio.abc import TaskStatus
from google.protobuf.message import DecodeError

from services.ingress import grpc_codec, oip, proto
from services.ingress.http import (
    _PASSED_HEADERS,
    InferenceBackend,
    _server_version,
    infer_parsed,
)
from services.ingress.shm_regions import TenantRegions
from services.ingress.stats import InferenceStats
from services.ingress.statuses import statuses_for
from services.ingress.tls import FrontTLS
from shared.auth import UNAUTHENTICATED_REASON, TokenBook
from shared.errors import GfaasError, bad_request
from shared.logs import get_logger
from shared.schema import DEFAULT_TENANT, H_TENANT, ErrorCode, FunctionSpec

log = get_logger("ingress.grpc")

# How long in-flight calls may run on once ingress is told to stop.
GRACE_S: Final = 10.0
# Protobuf framing around the tensors: the payload limit is on the tensors.
_FRAMING_BYTES: Final = 64 * 1024
# The most bytes a status's details take in its `grpc-message` trailer, percent-encoded.
# Clients refuse trailers over their metadata limit (gRPC's default: 8 KiB soft, 16 KiB
# hard) and report RESOURCE_EXHAUSTED "Stream removed" instead of the status: a reason
# quoting a long model or input name, or a function's long exception, must be cut.
DETAILS_BUDGET: Final = 4096

_Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def status_for(code: ErrorCode) -> grpc.StatusCode:
    return statuses_for(code).grpc


def clipped(details: str, budget: int = DETAILS_BUDGET) -> str:
    """`details` cut to fit `budget` bytes once percent-encoded as gRPC sends them
    (printable ASCII but "%" as itself, any other byte as "%XX")."""
    used = 0
    for i, ch in enumerate(details):
        used += 1 if " " <= ch <= "~" and ch != "%" else 3 * len(ch.encode("utf-8", "replace"))
        if used > budget:
            cut = details[: max(0, i - 64)]
            return f"{cut} ... ({len(details) - len(cut)} more characters cut)"
    return details


# The tenant of the call being handled, from its API key (with `tokens`).
_TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("gfaas_grpc_tenant", default="")
# Open without a key, as Triton leaves them.
OPEN_RPCS: Final = frozenset({"ServerLive", "ServerReady"})


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    # gRPC metadata keys arrive lower-cased, as the HTTP front reads its headers.
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


def _passed_headers(context: grpc.aio.ServicerContext) -> dict[str, str]:
    metadata = _metadata(context)
    passed = {name: metadata[key] for key, name in _PASSED_HEADERS.items() if key in metadata}
    tenant = _TENANT.get()
    if tenant:
        # Authenticated: the key's tenant, whatever gfaas-tenant the caller sent.
        passed[H_TENANT] = tenant
    return passed


class _Undecodable:
    """A request protobuf could not parse (not the message, invalid UTF-8 in a string,
    nesting too deep). grpc answers a deserializer that raises with UNKNOWN
    "Unexpected DecodeError", a caller's mistake reported as the server's: the
    deserializer returns this instead and the handler refuses it, INVALID_ARGUMENT."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _deserializer(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    return deserialize


def _guarded(method: str, fn: _Handler, tokens: TokenBook | None = None) -> _Handler:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if tokens is not None and method not in OPEN_RPCS:
            given = _metadata(context).get("authorization", "")
            tenant = tokens.tenant(given)
            if tenant is None:
                reason = UNAUTHENTICATED_REASON if not given else "unknown API key"
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
            _TENANT.set(tenant or "")
        try:
            if isinstance(request, _Undecodable):
                raise bad_request(f"{method}: malformed request message: {request.reason}")
            return await fn(request, context)
        except GfaasError as exc:
            code, details = status_for(exc.code), clipped(f"{exc.code}: {exc.reason}")
        except Exception:
            # A broken backend must still answer with a status, not a dropped stream.
            log.exception("grpc call failed", method=method)
            code = grpc.StatusCode.INTERNAL
            details = f"{ErrorCode.INTERNAL}: {method} failed inside gfaas ingress"
        await context.abort(code, details)

    return handler


def create_handler(
    backend: InferenceBackend,
    *,
    stats: InferenceStats | None = None,
    tokens: TokenBook | None = None,
) -> grpc.GenericRpcHandler:
    """The service's RPCs over `backend`; `stats` may be shared with the HTTP front.
    With `tokens` every RPC but ServerLive and ServerReady wants metadata
    `authorization: Bearer <API key>` (UNAUTHENTICATED without); the key names the
    call's tenant."""
    extensions: tuple[str, ...] = oip.EXTENSIONS
    if backend.regions.cuda.available():
        extensions = (*extensions, oip.CUDA_EXTENSION)
    server_metadata = grpc_codec.server_metadata(_server_version(), extensions)
    books = stats if stats is not None else InferenceStats()
    message = proto.message

    def known_model(name: str, version: str) -> FunctionSpec:
        spec = backend.spec(name)
        if spec is None:
            raise GfaasError(ErrorCode.UNKNOWN_FUNCTION, f"model {name!r} is not deployed")
        if version and version != oip.MODEL_VERSION:
            raise GfaasError(
                ErrorCode.UNKNOWN_FUNCTION,
                f"model {name!r} has no version {version!r} "
                f"(gfaas serves version {oip.MODEL_VERSION!r})",
            )
        return spec

    async def server_live(request: Any, context: grpc.aio.ServicerContext) -> Any:
        # Answering at all is liveness: the event loop runs.
        return message("ServerLiveResponse")(live=True)

    async def server_ready(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return message("ServerReadyResponse")(ready=backend.ready())

    async def model_ready(request: Any, context: grpc.aio.ServicerContext) -> Any:
        # A yes/no question: an unknown model is not ready (tritonclient.http reads
        # HTTP's 404 the same way).
        try:
            spec = known_model(request.name, request.version)
        except GfaasError:
            return message("ModelReadyResponse")(ready=False)
        return message("ModelReadyResponse")(ready=backend.not_ready(spec.name) is None)

    async def server_metadata_rpc(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return server_metadata

    async def model_metadata(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return grpc_codec.model_metadata(known_model(request.name, request.version))

    async def model_infer(request: Any, context: grpc.aio.ServicerContext) -> Any:
        spec = known_model(request.model_name, request.model_version)
        started = time.perf_counter_ns()
        ok = False
        try:
            response = await run_infer(request, spec, context)
            ok = True
            return response
        finally:
            books.record(
                spec.name,
                ok=ok,
                ns=time.perf_counter_ns() - started,
                now_ms=time.time_ns() // 1_000_000,
            )

    async def run_infer(request: Any, spec: FunctionSpec, context: grpc.aio.ServicerContext) -> Any:
        parsed = grpc_codec.parse_infer_request(request)
        parsed = grpc_codec.with_deadline(parsed, context.time_remaining())
        reply = await infer_parsed(backend, spec, parsed, _passed_headers(context))
        return grpc_codec.encode_infer_response(
            spec.name, parsed, reply.outputs, response_id=parsed.id or reply.invocation_id
        )

    async def model_config(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return grpc_codec.model_config(known_model(request.name, request.version))

    async def model_statistics(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.name:
            names = [known_model(request.name, request.version).name]
        else:
            names = [s.name for s in backend.specs()]
        return grpc_codec.model_statistics((n, books.of(n)) for n in names)

    async def repository_index(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return grpc_codec.repository_index(
            backend.specs(), not_ready=backend.not_ready, ready_only=request.ready
        )

    async def repository_control(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise GfaasError(
            ErrorCode.BAD_REQUEST,
            "gfaas deploys models through its function registry (`gfaas deploy`); "
            "the repository load/unload API is not supported",
        )

    def _regions(context: grpc.aio.ServicerContext) -> TenantRegions:
        """The caller's regions: those of its authenticated tenant (issue 10)."""
        tenant = _passed_headers(context).get(H_TENANT) or DEFAULT_TENANT
        return backend.regions.of(tenant)

    async def shm_status(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return grpc_codec.shm_status(_regions(context).status(request.name or None))

    async def shm_register(request: Any, context: grpc.aio.ServicerContext) -> Any:
        _regions(context).register(request.name, request.key, request.offset, request.byte_size)
        return message("SystemSharedMemoryRegisterResponse")()

    async def shm_unregister(request: Any, context: grpc.aio.ServicerContext) -> Any:
        _regions(context).unregister(request.name or None)
        return message("SystemSharedMemoryUnregisterResponse")()

    async def cuda_status(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return grpc_codec.cuda_status(_regions(context).cuda.status(request.name or None))

    async def cuda_register(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raw = grpc_codec.cuda_raw_handle(request.raw_handle)
        _regions(context).cuda.register(request.name, raw, request.device_id, request.byte_size)
        return message("CudaSharedMemoryRegisterResponse")()

    async def cuda_unregister(request: Any, context: grpc.aio.ServicerContext) -> Any:
        _regions(context).cuda.unregister(request.name or None)
        return message("CudaSharedMemoryUnregisterResponse")()

    rpcs: dict[str, _Handler] = {
        "ServerLive": server_live,
        "ServerReady": server_ready,
        "ModelReady": model_ready,
        "ServerMetadata": server_metadata_rpc,
        "ModelMetadata": model_metadata,
        "ModelInfer": model_infer,
        "ModelConfig": model_config,
        "ModelStatistics": model_statistics,
        "RepositoryIndex": repository_index,
        "RepositoryModelLoad": repository_control,
        "RepositoryModelUnload": repository_control,
        "SystemSharedMemoryStatus": shm_status,
        "SystemSharedMemoryRegister": shm_register,
        "SystemSharedMemoryUnregister": shm_unregister,
        "CudaSharedMemoryStatus": cuda_status,
        "CudaSharedMemoryRegister": cuda_register,
        "CudaSharedMemoryUnregister": cuda_unregister,
    }
    methods = {m.name: m for m in proto.service().methods}
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            _guarded(name, fn, tokens),
            request_deserializer=_deserializer(message(methods[name].input_type.name).FromString),
            response_serializer=message(methods[name].output_type.name).SerializeToString,
        )
        for name, fn in rpcs.items()
    }
    return grpc.method_handlers_generic_handler(proto.SERVICE, handlers)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(
    backend: InferenceBackend,
    *,
    host: str,
    port: int,
    max_payload: int,
    stop: anyio.Event,
    stats: InferenceStats | None = None,
    tokens: TokenBook | None = None,
    tls: FrontTLS | None = None,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `stop` is set, then stop taking calls and let in-flight ones finish
    within GRACE_S. Reports the bound port once listening. With `tls`, over TLS only."""
    server = grpc.aio.server(
        options=[
            # Larger requests get RESOURCE_EXHAUSTED from gRPC itself, before decoding.
            ("grpc.max_receive_message_length", max_payload + _FRAMING_BYTES),
            ("grpc.max_send_message_length", -1),
            # Replicas of ingress on one host share the port, as they share HTTP's.
            ("grpc.so_reuseport", 1),
        ]
    )
    server.add_generic_rpc_handlers((create_handler(backend, stats=stats, tokens=tokens),))
    if tls is None:
        bound = server.add_insecure_port(_address(host, port))
    else:
        credentials = grpc.ssl_server_credentials([(tls.key, tls.cert)])
        bound = server.add_secure_port(_address(host, port), credentials)
    await server.start()
    try:
        task_status.started(bound)
        await stop.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await server.stop(GRACE_S)

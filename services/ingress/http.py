"""The Open Inference Protocol (KServe v2 / Triton HTTP) front of ingress.

A Starlette app over an InferenceBackend that ingress implements on its NATS
connection, so tritonclient.http, KServe v2 clients and curl work against gfaas.
Body conversions live in services/ingress/oip.py; this module reads requests,
enforces the size limit, and maps gfaas error codes to HTTP statuses. The inference
routes, which carry nearly all the traffic, are answered before Starlette's router
and middleware (`InferRoutes`); every other route goes through them.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from importlib import metadata
from typing import Final, Protocol

import anyio
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from services.ingress import oip, oip_response, oip_shm
from services.ingress.shm_regions import ShmRegions, TenantRegions
from services.ingress.stats import InferenceStats
from services.ingress.statuses import statuses_for
from shared import tracing
from shared.auth import UNAUTHENTICATED_REASON, TokenBook
from shared.config import DEFAULT_HTTP_BODY_IDLE_S
from shared.errors import GfaasError
from shared.logs import get_logger
from shared.schema import (
    DEFAULT_TENANT,
    H_INVOCATION,
    H_TENANT,
    ErrorCode,
    FunctionSpec,
    InvokeReply,
    InvokeRequest,
)
from shared.tensors import validate_inputs

log = get_logger("ingress.http")


class InferenceBackend(Protocol):
    def ready(self) -> bool:
        """Connected to NATS and serving."""
        ...

    def specs(self) -> Sequence[FunctionSpec]:
        """The deployed functions (OIP models)."""
        ...

    def spec(self, name: str) -> FunctionSpec | None: ...

    def not_ready(self, name: str) -> str | None:
        """Why model `name` cannot serve now (None: it can): ingress not serving, or,
        for a workflow, a stage function that is not deployed."""
        ...

    def output_names(self, name: str) -> Collection[str] | None:
        """Every output model `name` produces, when all are known: a function's
        declared outputs (None if it declares none), a workflow's outputs, those
        whose stage declares no dtype and shape too (its `spec` leaves them out)."""
        ...

    async def infer(
        self, name: str, request: InvokeRequest, headers: Mapping[str, str]
    ) -> InvokeReply:
        """Run one invocation; `headers` carries the caller's trace context and tenant.

        Errors come back as `InvokeReply.error` or as a raised GfaasError; both map to
        the same HTTP status.
        """
        ...

    @property
    def regions(self) -> ShmRegions:
        """Registered shared memory (the OIP shared-memory extensions): system regions,
        and CUDA ones in `regions.cuda`."""
        ...

    async def infer_shm(
        self, name: str, parsed: oip.InferRequest, headers: Mapping[str, str]
    ) -> InvokeReply:
        """`infer` for a request whose inputs or outputs name shared-memory regions
        (system or CUDA)."""
        ...


JSON: Final = "application/json"
# The protocol's health APIs answer false with a 4xx (Triton sends 400), not a 5xx.
NOT_READY_STATUS: Final = 400

# HTTP headers handed to the backend, under the names NATS headers and the W3C
# propagator expect.
_PASSED_HEADERS: Final = {
    "traceparent": "traceparent",
    "tracestate": "tracestate",
    H_TENANT.lower(): H_TENANT,
    H_INVOCATION.lower(): H_INVOCATION,
}
_DECOMPRESSORS: Final = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def status_for(code: ErrorCode) -> int:
    return statuses_for(code).http


def _error(status: int, reason: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        oip_response.error_body(reason),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _gfaas_error(exc: GfaasError) -> Response:
    return _error(status_for(exc.code), f"{exc.code}: {exc.reason}")


def _server_version() -> str:
    try:
        return metadata.version("gfaas")
    except metadata.PackageNotFoundError:
        return "0+unknown"


async def infer_parsed(
    backend: InferenceBackend,
    spec: FunctionSpec,
    parsed: oip.InferRequest,
    headers: Mapping[str, str],
) -> InvokeReply:
    """One parsed OIP inference through the backend, as both fronts (HTTP, gRPC) run
    it: outputs asked for checked against the spec, shared-memory regions staged when
    named, a failure raised as the GfaasError each front maps to its status."""
    produced = backend.output_names(spec.name)
    oip_response.check_requested_outputs(parsed, spec.name, produced)
    if parsed.uses_shm:
        # Checked against the spec as admission checks them, but before staging: an
        # input admission would refuse (a name the model lacks, another dtype or
        # shape) had its region's bytes leased and copied first, a slab of the claim
        # created and kept for its cool-down, all to be refused.
        validate_inputs(spec, parsed.invoke.inputs, unstaged=parsed.shm_inputs)
        reply = await backend.infer_shm(spec.name, parsed, headers)
    else:
        reply = await backend.infer(spec.name, parsed.invoke, headers)
    if reply.error is not None:
        raise GfaasError.from_info(reply.error)
    oip_response.check_produced(parsed, spec.name, produced, reply.outputs)
    return reply


MODEL_ROUTE: Final = "/v2/models/{name}"
VERSIONED_ROUTE: Final = "/v2/models/{name}/versions/{version}"


def create_app(
    backend: InferenceBackend,
    *,
    max_payload: int,
    stats: InferenceStats | None = None,
    tokens: TokenBook | None = None,
    body_idle_s: float = DEFAULT_HTTP_BODY_IDLE_S,
) -> ASGIApp:
    """The OIP HTTP app; request bodies over `max_payload` bytes get 413, and one
    whose next bytes take over `body_idle_s` to come gets 408 (the connection closed).
    `stats` may be shared with the gRPC front, so either protocol's statistics count
    both. With `tokens` every route but health wants `Authorization: Bearer <API key>`
    (401 without), and the request's tenant is the key's (`BearerAuth`)."""
    extensions: tuple[str, ...] = oip.EXTENSIONS
    if backend.regions.cuda.available():
        # Only where a CUDA region could be registered at all.
        extensions = (*extensions, oip.CUDA_EXTENSION)
    server_metadata = oip_response.server_metadata(_server_version(), extensions)
    stats = stats if stats is not None else InferenceStats()

    def known_model(request: Request) -> FunctionSpec:
        name: str = request.path_params["name"]
        spec = backend.spec(name)
        if spec is None:
            raise GfaasError(ErrorCode.UNKNOWN_FUNCTION, f"model {name!r} is not deployed")
        version: str | None = request.path_params.get("version")
        if version is not None and version != oip.MODEL_VERSION:
            raise GfaasError(
                ErrorCode.UNKNOWN_FUNCTION,
                f"model {name!r} has no version {version!r} "
                f"(gfaas serves version {oip.MODEL_VERSION!r})",
            )
        return spec

    async def metadata_endpoint(request: Request) -> Response:
        return Response(server_metadata, media_type="application/json")

    # Health bodies as the protocol defines them ({"live": bool}, {"ready": bool}):
    # Triton's client reads the status alone, KServe's SDK parses the JSON.
    async def live(request: Request) -> Response:
        # Answering at all is liveness: the event loop runs.
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        serving = backend.ready()
        return JSONResponse({"ready": serving}, status_code=200 if serving else NOT_READY_STATUS)

    async def model_metadata(request: Request) -> Response:
        spec = known_model(request)
        return Response(oip_response.model_metadata(spec), media_type="application/json")

    async def model_ready(request: Request) -> Response:
        spec = known_model(request)
        why = backend.not_ready(spec.name)
        if why is not None:
            reason = f"model {spec.name!r} is not ready: {why}"
            body = {"name": spec.name, "ready": False, "error": reason}
            return JSONResponse(body, status_code=NOT_READY_STATUS)
        return JSONResponse({"name": spec.name, "ready": True})

    async def infer(request: Request) -> Response:
        spec = known_model(request)
        started = time.perf_counter_ns()
        ok = False
        passed = _passed_headers(request)
        route = VERSIONED_ROUTE if "version" in request.path_params else MODEL_ROUTE
        # The HTTP server span, under the client's traceparent if it sent one; the
        # invocation's spans hang under it (run_infer passes its context on).
        span_cm = tracing.handling_span(
            "ingress http infer",
            passed,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "http.route": f"{route}/infer",
                "url.path": request.scope["path"],
                "gfaas.function": spec.name,
                "gfaas.tenant": passed.get(H_TENANT) or DEFAULT_TENANT,
            },
        )
        try:
            with span_cm as span:
                response = await run_infer(request, spec, passed)
                span.set_attribute("http.response.status_code", response.status_code)
                if response.status_code >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            ok = response.status_code == 200
            return response
        finally:
            stats.record(
                spec.name,
                ok=ok,
                ns=time.perf_counter_ns() - started,
                now_ms=time.time_ns() // 1_000_000,
            )

    async def run_infer(request: Request, spec: FunctionSpec, passed: dict[str, str]) -> Response:
        try:
            body = await _read_body(request, max_payload, body_idle_s)
            header_length = oip.parse_header_length(
                request.headers.get(oip.HEADER_LENGTH), len(body)
            )
            parsed = oip.parse_infer_request(body, header_length)
            headers = tracing.inject(dict(passed))
            reply = await infer_parsed(backend, spec, parsed, headers)
            encoded = oip_response.encode_infer_response(
                spec.name, parsed, reply.outputs, response_id=parsed.id or reply.invocation_id
            )
        except GfaasError:
            raise  # answered by the app's handler, in the protocol's error shape
        except HTTPException as exc:  # a stalled body's 408
            return _error(exc.status_code, exc.detail, exc.headers)
        except ClientDisconnect:
            # Nobody is left to read an answer; nothing to log either.
            return Response(status_code=400)
        except Exception:
            # A broken backend must still answer in the protocol's error shape.
            log.exception("oip infer failed", model=request.path_params["name"])
            return _error(500, f"{ErrorCode.INTERNAL}: inference failed inside gfaas ingress")
        headers = {}
        if encoded.header_length is not None:
            headers[oip.HEADER_LENGTH] = str(encoded.header_length)
        return Response(encoded.body, media_type=encoded.media_type, headers=headers)

    async def model_config(request: Request) -> Response:
        return Response(oip_response.model_config(known_model(request)), media_type=JSON)

    async def model_stats(request: Request) -> Response:
        """One model's statistics, or every deployed model's (`/v2/models/stats`)."""
        if "name" in request.path_params:
            names = [known_model(request).name]
        else:
            names = [s.name for s in backend.specs()]
        body = oip_response.model_statistics((n, stats.of(n)) for n in names)
        return Response(body, media_type=JSON)

    async def repository_index(request: Request) -> Response:
        ready_only = oip.parse_index_request(await _read_body(request, max_payload, body_idle_s))
        body = oip_response.repository_index(
            backend.specs(), not_ready=backend.not_ready, ready_only=ready_only
        )
        return Response(body, media_type="application/json")

    async def repository_control(request: Request) -> Response:
        return _error(
            400,
            f"{ErrorCode.BAD_REQUEST}: gfaas deploys models through its function registry "
            "(`gfaas deploy`); the repository load/unload API is not supported",
        )

    def _regions(request: Request) -> TenantRegions:
        """The caller's regions: those of its authenticated tenant (issue 10)."""
        tenant = _passed_headers(request).get(H_TENANT) or DEFAULT_TENANT
        return backend.regions.of(tenant)

    async def shm_status(request: Request) -> Response:
        regions = _regions(request).status(request.path_params.get("region"))
        return Response(oip_shm.shm_status(regions), media_type="application/json")

    async def shm_register(request: Request) -> Response:
        body = await _read_body(request, max_payload, body_idle_s)
        key, offset, size = oip_shm.parse_register_request(body)
        _regions(request).register(request.path_params["region"], key, offset, size)
        return Response(status_code=200)

    async def shm_unregister(request: Request) -> Response:
        _regions(request).unregister(request.path_params.get("region"))
        return Response(status_code=200)

    async def cuda_status(request: Request) -> Response:
        regions = _regions(request).cuda.status(request.path_params.get("region"))
        return Response(oip_shm.shm_status(regions), media_type="application/json")

    async def cuda_register(request: Request) -> Response:
        body = await _read_body(request, max_payload, body_idle_s)
        raw_handle, device_id, size = oip_shm.parse_cuda_register_request(body)
        name: str = request.path_params["region"]
        _regions(request).cuda.register(name, raw_handle, device_id, size)
        return Response(status_code=200)

    async def cuda_unregister(request: Request) -> Response:
        _regions(request).cuda.unregister(request.path_params.get("region"))
        return Response(status_code=200)

    async def gfaas_error(request: Request, exc: Exception) -> Response:
        # Every refusal a route raises answers here, with its code's HTTP status.
        assert isinstance(exc, GfaasError)
        return _gfaas_error(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        # Unmatched paths and methods answer in the protocol's {"error": ...} shape too.
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, exc.detail, exc.headers)

    async def client_gone(request: Request, exc: Exception) -> Response:
        # A client that went away while its body was read (repository index, region
        # registers): nobody reads an answer, and it is no server error to log with a
        # traceback, as infer's own handling says (run_infer).
        return Response(status_code=400)

    model, versioned = MODEL_ROUTE, VERSIONED_ROUTE
    shm = "/v2/systemsharedmemory"
    cuda = "/v2/cudasharedmemory"
    routes = [
        Route("/v2", metadata_endpoint, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        # Before `/v2/models/{name}`: "stats" is not a model's name.
        Route("/v2/models/stats", model_stats, methods=["GET"]),
        Route(f"{model}/stats", model_stats, methods=["GET"]),
        Route(f"{versioned}/stats", model_stats, methods=["GET"]),
        Route(f"{model}/config", model_config, methods=["GET"]),
        Route(f"{versioned}/config", model_config, methods=["GET"]),
        Route(model, model_metadata, methods=["GET"]),
        Route(versioned, model_metadata, methods=["GET"]),
        Route(f"{model}/ready", model_ready, methods=["GET"]),
        Route(f"{versioned}/ready", model_ready, methods=["GET"]),
        Route(f"{model}/infer", infer, methods=["POST"]),
        Route(f"{versioned}/infer", infer, methods=["POST"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route(f"{shm}/status", shm_status, methods=["GET"]),
        Route(f"{shm}/region/{{region}}/status", shm_status, methods=["GET"]),
        Route(f"{shm}/region/{{region}}/register", shm_register, methods=["POST"]),
        Route(f"{shm}/unregister", shm_unregister, methods=["POST"]),
        Route(f"{shm}/region/{{region}}/unregister", shm_unregister, methods=["POST"]),
        Route(f"{cuda}/status", cuda_status, methods=["GET"]),
        Route(f"{cuda}/region/{{region}}/status", cuda_status, methods=["GET"]),
        Route(f"{cuda}/region/{{region}}/register", cuda_register, methods=["POST"]),
        Route(f"{cuda}/unregister", cuda_unregister, methods=["POST"]),
        Route(f"{cuda}/region/{{region}}/unregister", cuda_unregister, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", repository_control, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", repository_control, methods=["POST"]),
    ]
    app: ASGIApp = InferRoutes(
        Starlette(
            routes=routes,
            exception_handlers={
                HTTPException: http_error,
                GfaasError: gfaas_error,
                ClientDisconnect: client_gone,
            },
        ),
        infer,
    )
    return BearerAuth(app, tokens) if tokens is not None else app


class InferRoutes:
    """ASGI: `POST /v2/models/{name}[/versions/{version}]/infer` straight to the
    infer endpoint, every other request to `app` (Starlette's router). Starlette's
    two exception middlewares, its router trying each route's pattern in turn and the
    send wrappers they add took about 10% of ingress's busy samples under load
    (benchmarks.md, "Spans and HTTP parsing cheaper"). What they did for this route is
    done here: path parameters, a GfaasError answered in the protocol's shape."""

    def __init__(self, app: ASGIApp, infer: Callable[[Request], Awaitable[Response]]) -> None:
        self.app = app
        self.infer = infer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = (
            infer_path_params(scope["path"])
            if scope["type"] == "http" and scope["method"] == "POST"
            else None
        )
        if params is None:
            await self.app(scope, receive, send)
            return
        scope["path_params"] = params
        try:
            response = await self.infer(Request(scope, receive))
        except GfaasError as exc:
            response = _gfaas_error(exc)
        await response(scope, receive, send)


def infer_path_params(path: str) -> dict[str, str] | None:
    """The path parameters of an inference route (as Starlette's `{name}` matches:
    one non-empty segment each), or None for any other path."""
    parts = path.split("/")
    if len(parts) == 5 and parts[4] == "infer" and parts[3]:
        params = {"name": parts[3]}
    elif len(parts) == 7 and parts[6] == "infer" and parts[4] == "versions" and parts[3]:
        if not parts[5]:
            return None
        params = {"name": parts[3], "version": parts[5]}
    else:
        return None
    return params if parts[:3] == ["", "v2", "models"] else None


# Open without a key, as Triton leaves them: load balancers and probes ask these.
OPEN_PATHS: Final = frozenset({"/v2/health/live", "/v2/health/ready"})
# Where BearerAuth leaves the authenticated tenant in the ASGI scope.
TENANT_SCOPE_KEY: Final = "gfaas.tenant"


class BearerAuth:
    """ASGI middleware: a request's API key names its tenant (shared.auth.TokenBook);
    without a known key, 401 in the protocol's error shape."""

    def __init__(self, app: ASGIApp, tokens: TokenBook) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        tenant = self.tokens.tenant(given.decode("latin-1"))
        if tenant is None:
            reason = UNAUTHENTICATED_REASON if not given else "unauthenticated: unknown API key"
            response = _error(401, reason, {"WWW-Authenticate": 'Bearer realm="gfaas"'})
            await response(scope, receive, send)
            return
        scope[TENANT_SCOPE_KEY] = tenant
        await self.app(scope, receive, send)


def _passed_headers(request: Request) -> dict[str, str]:
    passed = {
        name: request.headers[key]
        for key, name in _PASSED_HEADERS.items()
        if key in request.headers
    }
    tenant = request.scope.get(TENANT_SCOPE_KEY)
    if tenant:
        # Authenticated: the key's tenant, whatever Gfaas-Tenant the caller wrote.
        passed[H_TENANT] = tenant
    return passed


def _too_large(size: int | str, limit: int) -> GfaasError:
    return GfaasError(
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"request body of {size} bytes exceeds the {limit}-byte limit",
    )


async def _read_body(
    request: Request, limit: int, idle_s: float = DEFAULT_HTTP_BODY_IDLE_S
) -> bytes:
    """The request body, decompressed, refusing more than `limit` bytes before reading it
    all, and a body that stops coming for `idle_s` (uvicorn has no such timeout: a
    client that stalled midway held its connection and request for good)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(declared, limit)
    chunks: list[bytes] = []
    total = 0
    with anyio.CancelScope(deadline=anyio.current_time() + idle_s) as waiting:
        async for chunk in request.stream():
            waiting.deadline = anyio.current_time() + idle_s
            total += len(chunk)
            if total > limit:
                raise _too_large(f"more than {limit}", limit)
            chunks.append(chunk)
    if waiting.cancelled_caught:
        raise HTTPException(
            408,
            f"{ErrorCode.BAD_REQUEST}: the request body stopped coming: no bytes for "
            f"{idle_s:g} s after {total}",
            # What is left of the body would be read as the next request.
            headers={"Connection": "close"},
        )
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        return body
    wbits = _DECOMPRESSORS.get(encoding)
    if wbits is None:
        raise GfaasError(
            ErrorCode.BAD_REQUEST,
            f"Content-Encoding {encoding!r} is not supported (gzip, deflate or identity)",
        )
    decompressor = zlib.decompressobj(wbits)
    try:
        # One byte over the limit is enough to know it is too large: a small
        # compressed body cannot inflate past the limit in memory.
        plain = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise GfaasError(ErrorCode.BAD_REQUEST, f"body is not valid {encoding}: {exc}") from None
    if len(plain) > limit:
        raise _too_large(f"more than {limit} (decompressed)", limit)
    if not decompressor.eof:
        raise GfaasError(ErrorCode.BAD_REQUEST, f"body is truncated {encoding} data")
    return plain

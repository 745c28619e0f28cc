"""The Python client: invoke functions, deploy specs, push models and code, read status.

Everything it does is plain NATS on documented subjects (docs/protocol.md); any
nats client can do the same.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import nats.errors
import numpy as np
from nats.aio.client import Client as NATS
from nats.aio.client import _default_error_callback
from opentelemetry.trace import Span, SpanKind

from shared import jetstream, subjects, tracing
from shared.auth import (
    Credentials,
    auth_dir,
    connect_options,
    default_admin_creds,
    tenant_invoke,
    tenant_invoke_async,
    tenant_result,
)
from shared.codebundle import Limits, pack, parse_ref
from shared.codestore import CodeStore
from shared.config import PAYLOAD_HEADROOM, Settings, nats_servers, settings_from_env
from shared.dataplane.backend import BackendError
from shared.dataplane.client import BrokerClient, Brokers, move_into, open_tensor, write_into
from shared.errors import GfaasError
from shared.handler_check import SANDBOX_TIMEOUT_S
from shared.modelstore import ModelStore
from shared.registry import Registry
from shared.schema import (
    DEFAULT_TENANT,
    H_CALLBACK,
    H_INVOCATION,
    H_MSG_ID,
    H_TENANT,
    ErrorCode,
    FunctionKind,
    FunctionSpec,
    Handle,
    HandlerCheck,
    HandlerCheckReply,
    InvokeReply,
    InvokeRequest,
    OutputMode,
    Profile,
    ProfileReply,
    ProfileRequest,
    ServiceStatus,
    Tensor,
    WorkflowSpec,
    decode,
    encode,
    new_invocation_id,
)
from shared.spec import check_function, check_workflow
from shared.tensors import as_torch, dtype_of, from_value, to_numpy
from shared.workflow import check_functions, check_tensors, plan_workflow

Inputs = Mapping[str, Any] | Sequence[Tensor]
# With the whole request over the bus limit, inputs above this size go by handle.
BY_HANDLE_ABOVE = 64 * 1024
# How long a deploy waits for a worker's handler check: the sandbox's limit and some.
# With no worker subscribed the answer (none) comes at once.
HANDLER_CHECK_WAIT_S = SANDBOX_TIMEOUT_S + 5.0
# While connecting, each server is tried twice (nats-py's fewest) this far apart; once
# connected, reconnects go as nats-py's defaults have them.
CONNECT_RETRY_WAIT_S = 0.1
RECONNECT_ATTEMPTS = 60
RECONNECT_WAIT_S = 2.0


def _tensors(inputs: Inputs) -> list[Tensor]:
    if not isinstance(inputs, Mapping):
        return list(inputs)
    tensors = []
    for name, value in inputs.items():
        try:
            tensors.append(from_value(name, value))
        except GfaasError as exc:
            raise unsupported(f"input {name!r}", exc) from None
    return tensors


def unsupported(what: str, exc: GfaasError) -> GfaasError:
    """A value with no wire dtype (torch.bfloat16, say), given by the caller: its
    mistake (bad_request), not a handler's (the conversion's own word)."""
    reason = exc.reason.partition(": ")[2] or exc.reason
    return GfaasError(ErrorCode.BAD_REQUEST, f"{what}: unsupported {reason}")


def memory_of_kind(kind: FunctionKind, workers: Mapping[str, Mapping[str, Any]]) -> list[int]:
    """Device memory totals of the workers (scheduler status details) that a function
    of `kind` may run on: workers of its kind, or any when none is (as the scheduler
    places it). Workers that report no total are left out."""
    gpu = kind is FunctionKind.GPU
    totals = [(str(w.get("device", "")), int(w.get("memory_total", 0))) for w in workers.values()]
    chosen = [t for device, t in totals if device.startswith("cuda") is gpu]
    if not any(device.startswith("cuda") is gpu for device, _ in totals):
        chosen = [t for _, t in totals]
    return [t for t in chosen if t > 0]


def outputs_of(reply: InvokeReply) -> dict[str, np.ndarray[Any, Any]]:
    """The reply's tensors as numpy arrays, or the reply's error raised.

    By-handle outputs come back as zero-copy views of the pooled buffer: valid until
    the caller releases them (`Client.release`).
    """
    if reply.error is not None:
        raise GfaasError.from_info(reply.error)
    return {
        t.name: open_tensor(t).cpu().numpy() if t.handle else to_numpy(t) for t in reply.outputs
    }


def _no_credentials(settings: Settings) -> str:
    """Why a command had no credentials to connect with, and how to give it some: a
    `gfaas up --state-dir DIR` keeps the admin's under DIR, not where commands look."""
    looked = auth_dir(settings) / "admin.json"
    return (
        f"no credentials: none at {looked}; set GFAAS_STATE_DIR to the --state-dir "
        "`gfaas up` ran with, or GFAAS_NATS_CREDS=FILE"
    )


async def connect_nats(url: str, *, creds: str | Path | None = None) -> NATS:
    """A client connection as `Client.connect` makes it (see there for `creds`). A
    server that refuses the credentials is a ConnectionError at once, not retried."""
    settings = settings_from_env()
    if creds is None:
        creds = default_admin_creds(settings) or ""
    options = connect_options(creds=creds, tls_ca=settings.nats_tls_ca)
    nc = NATS()
    connecting = True

    async def on_error(exc: Exception) -> None:
        # While connecting the error is raised below, as one line; nats-py's own
        # callback logged each try's traceback.
        if not connecting:
            await _default_error_callback(exc)

    try:
        # No reconnects while connecting: refused credentials fail here, now. A server
        # that is not there fails as fast: nats-py tries each server of the pool up to
        # max_reconnect_attempts times even so (by default 60 tries, 2 s apart).
        await nc.connect(
            servers=nats_servers(url),
            name="gfaas-client",
            connect_timeout=5,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=CONNECT_RETRY_WAIT_S,  # type: ignore[arg-type]  # a float works
            error_cb=on_error,
            **options,
        )
    except BaseException as exc:
        await nc.close()  # a refused connection leaves its socket open otherwise
        if isinstance(exc, nats.errors.NoServersError):
            raise ConnectionError(f"cannot reach NATS at {url}: {exc}") from None
        if isinstance(exc, nats.errors.Error):
            who = f"credentials {creds}" if creds else _no_credentials(settings)
            raise ConnectionError(f"NATS at {url} refused the connection ({who}): {exc}") from None
        raise
    # Connected: from now on, reconnect as nats-py does by default.
    connecting = False
    nc.options["allow_reconnect"] = True
    nc.options["max_reconnect_attempts"] = RECONNECT_ATTEMPTS
    nc.options["reconnect_time_wait"] = RECONNECT_WAIT_S
    return nc


class Client:
    def __init__(
        self,
        nc: NATS,
        *,
        tenant: str = "",
        timeout: float = 30.0,
        node: str = "local",
        replicas: int = 1,
        tenant_account: str = "",
    ) -> None:
        self.nc = nc
        self.tenant = tenant
        # Connected with a tenant's credentials (shared.auth): invocations go to that
        # tenant's subjects, the only ones its NATS user may publish.
        self.tenant_account = tenant_account
        self.timeout = timeout
        # Replicas of the JetStream resources this client may be first to create
        # (`Settings.js_replicas`); existing ones are used as they are.
        self.replicas = replicas
        # This client's name as a lease holder: outputs by handle are held by it.
        self.holder = f"client-{new_invocation_id()[:16]}"
        self.broker = BrokerClient(nc, node)
        # Every node's broker: an output by handle is released at its own node's.
        self.brokers = Brokers(self.broker)

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        url: str = "nats://127.0.0.1:4222",
        *,
        creds: str | Path | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[Client]:
        """`creds`: a gfaas credentials file (shared.auth.Credentials: the admin's, a
        tenant's); None: GFAAS_NATS_CREDS, else the admin's in the state directory
        (GFAAS_STATE_DIR, `.gfaas`) when there is one; "": none."""
        if creds is None:
            # Resolved here, not only in connect_nats: a tenant's file given as
            # GFAAS_NATS_CREDS must send to the tenant's subjects as one passed here.
            creds = default_admin_creds(settings_from_env()) or ""
        nc = await connect_nats(url, creds=creds)
        if creds and "tenant_account" not in kwargs:
            kwargs["tenant_account"] = Credentials.load(creds).tenant
        try:
            yield cls(nc, **kwargs)
        finally:
            await nc.drain()

    def _headers(self, invocation_id: str) -> dict[str, str]:
        headers = {H_INVOCATION: invocation_id}
        if self.tenant:
            headers[H_TENANT] = self.tenant
        return headers

    def _body(self, request: InvokeRequest) -> bytes:
        body = encode(request)
        limit = self.nc.max_payload - PAYLOAD_HEADROOM
        if len(body) > limit:
            raise GfaasError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"request of {len(body)} bytes exceeds the bus limit of {limit} bytes",
            )
        return body

    async def _by_handle_if_large(self, tensors: list[Tensor]) -> list[Tensor]:
        """Tensors too large for one message move into the node's pool (the caller
        must be on the node); the rest stay by value. Release the result's handles."""
        limit = self.nc.max_payload - PAYLOAD_HEADROOM
        if sum(len(t.data) for t in tensors) + 4096 <= limit:
            return tensors
        if self.tenant_account:
            # A tenant may not lease at the memory broker (docs/security.md): asked
            # anyway, the request went unanswered and the call failed seconds later.
            raise self._tenant_over_limit(f"inputs of {sum(len(t.data) for t in tensors)} bytes")
        large = [t for t in tensors if len(t.data) > BY_HANDLE_ABOVE]
        tenant = self.tenant or DEFAULT_TENANT
        handles: list[Handle] = []
        try:
            handles = await self.broker.lease(
                [len(t.data) for t in large], owner=self.holder, tenant=tenant
            )
            moved = {t.name: move_into(h, t) for t, h in zip(large, handles, strict=True)}
        except (BackendError, GfaasError) as exc:
            if handles:
                await self.broker.release(handles, self.holder, tenant)
            raise GfaasError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"inputs exceed the bus limit of {limit} bytes and cannot move by handle "
                f"from here (is this client on the node of a memory broker?): {exc}",
            ) from None
        return [moved.get(t.name, t) for t in tensors]

    def _tenant_over_limit(self, what: str) -> GfaasError:
        """What a tenant hears for data that would have to go into the node's pool,
        which only services and the admin may lease from."""
        limit = self.nc.max_payload - PAYLOAD_HEADROOM
        return GfaasError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"{what}: a tenant's inputs must fit the bus limit of {limit} bytes "
            "(larger ones go over HTTP or gRPC with the shared-memory extension)",
        )

    async def invoke_reply(
        self,
        function: str,
        inputs: Inputs,
        *,
        timeout: float | None = None,
        invocation_id: str = "",
        outputs_by: OutputMode = OutputMode.VALUE,
    ) -> InvokeReply:
        """The raw reply. With `outputs_by` handle (or auto), outputs may come by handle,
        held by this client: read them with `outputs_of`, then `release` them."""
        invocation_id = invocation_id or new_invocation_id()
        timeout = timeout or self.timeout
        with self._span(function, invocation_id) as span:
            reply = await self._invoke_reply(
                self._invoke_subject(function), inputs, timeout, invocation_id, outputs_by
            )
            if reply.error is not None:
                tracing.mark_error(span, reply.error.code, reply.error.reason)
            return reply

    def _invoke_subject(self, function: str) -> str:
        subject = subjects.invoke(function)  # the name checked
        return tenant_invoke(self.tenant_account, function) if self.tenant_account else subject

    def _span(self, function: str, invocation_id: str) -> AbstractContextManager[Span]:
        """The caller's span of one invocation: the trace's root, ended once the reply
        is in (and what the call pooled is released); every service's span is inside
        it (their context rides in the request's headers)."""
        return tracing.tracer().start_as_current_span(
            f"client invoke {function}",
            kind=SpanKind.CLIENT,
            attributes={
                "gfaas.function": function,
                "gfaas.invocation_id": invocation_id,
                **tracing.nats_attributes(
                    subjects.invoke(function), "publish", tenant=self.tenant or DEFAULT_TENANT
                ),
            },
        )

    async def _invoke_reply(
        self,
        subject: str,
        inputs: Inputs,
        timeout: float,
        invocation_id: str,
        outputs_by: OutputMode,
    ) -> InvokeReply:
        given = _tensors(inputs)
        sent = await self._by_handle_if_large(given)
        request = InvokeRequest(
            inputs=sent,
            timeout_ms=int(timeout * 1000),
            outputs_by=outputs_by,
            holder=self.holder if outputs_by is not OutputMode.VALUE else "",
        )
        # Inputs this call moved into the pool are for this call only.
        pooled = [t for t, g in zip(sent, given, strict=True) if t is not g]
        try:
            body = self._body(request)
        except GfaasError:
            # Still over the bus limit (inputs too small to move filled it): refused
            # before it went out, so nobody else reads what this call pooled.
            await self.release(pooled)
            raise
        try:
            msg = await self.nc.request(
                subject,
                body,
                timeout=timeout,
                headers=tracing.inject(self._headers(invocation_id)),
            )
        except nats.errors.NoRespondersError:
            await self.release(pooled)
            raise GfaasError(ErrorCode.NO_WORKER, "no ingress is running") from None
        except nats.errors.TimeoutError:
            # A worker may still be reading them: their TTL frees them, not us.
            raise GfaasError(ErrorCode.DEADLINE_EXCEEDED, f"no reply within {timeout}s") from None
        await self.release(pooled)
        return decode(msg.data, InvokeReply)

    async def invoke(
        self,
        function: str,
        inputs: Inputs,
        *,
        timeout: float | None = None,
        outputs_by: OutputMode = OutputMode.VALUE,
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Outputs as numpy arrays that the caller owns: by-handle outputs are copied
        out of the pool and released (use `invoke_reply` to keep them zero-copy)."""
        invocation_id = new_invocation_id()
        timeout = timeout or self.timeout
        # One span for the call, the outputs' release included.
        with self._span(function, invocation_id) as span:
            reply = await self._invoke_reply(
                self._invoke_subject(function), inputs, timeout, invocation_id, outputs_by
            )
            if reply.error is not None:
                tracing.mark_error(span, reply.error.code, reply.error.reason)
            outputs = {name: array.copy() for name, array in outputs_of(reply).items()}
            await self.release(reply.outputs)
        return outputs

    # -- pooled buffers (callers on the node) ------------------------------------------

    async def put(
        self, name: str, value: Any, *, device: str = "cpu", ttl_s: float = 0.0
    ) -> Tensor:
        """`value` copied into a pooled buffer, as an input tensor that travels by handle.

        The client holds the lease: `release` it when no invocation needs it any more
        (or its TTL frees it)."""
        try:
            tensor = as_torch(name, value)
            dtype = dtype_of(name, tensor)
        except GfaasError as exc:
            # Checked before leasing: the caller's mistake must not leave a lease behind.
            raise unsupported(f"put {name!r}", exc) from None
        if self.tenant_account:
            # As for an invocation's large inputs: the lease would go unanswered.
            raise self._tenant_over_limit(f"put {name!r} into the pool")
        tenant = self.tenant or DEFAULT_TENANT
        (handle,) = await self.broker.lease(
            [tensor.numel() * tensor.element_size()],
            owner=self.holder,
            device=device,
            tenant=tenant,
            ttl_s=ttl_s,
        )
        try:
            return write_into(handle, name, tensor, dtype)
        except BaseException:
            # Nobody else knows of this lease yet: a failed copy (the pool not
            # mappable here, say) gives it back rather than leaving it to its TTL.
            with anyio.CancelScope(shield=True):
                await self.broker.release([handle], self.holder, tenant)
            raise

    async def release(self, tensors: Sequence[Tensor]) -> None:
        """Drop this client's references to by-handle tensors (value tensors are skipped)."""
        handles = [t.handle for t in tensors if t.handle is not None]
        # Each lease is released at the broker of the node it lives on.
        await self.brokers.release(handles, self.holder, self.tenant or DEFAULT_TENANT)

    async def invoke_async(
        self,
        function: str,
        inputs: Inputs,
        *,
        invocation_id: str = "",
        callback: str = "",
    ) -> str:
        """Queue an invocation in JetStream; returns its id (the dedup key): for a
        tenant, the id ingress answers (`invocation_id` with the tenant's tag)."""
        invocation_id = invocation_id or new_invocation_id()
        subject = subjects.invoke_async(function)
        with tracing.tracer().start_as_current_span(
            f"client invoke_async {function}",
            kind=SpanKind.PRODUCER,
            attributes={
                "gfaas.function": function,
                "gfaas.invocation_id": invocation_id,
                **tracing.nats_attributes(subject, "publish", tenant=self.tenant or DEFAULT_TENANT),
            },
        ):
            headers = self._headers(invocation_id) | {H_MSG_ID: invocation_id}
            if callback:
                headers[H_CALLBACK] = callback
            body = self._body(InvokeRequest(inputs=_tensors(inputs)))
            if self.tenant_account:
                return await self._queue_as_tenant(function, body, tracing.inject(headers))
            await self.nc.jetstream().publish(subject, body, headers=tracing.inject(headers))
        return invocation_id

    async def _queue_as_tenant(self, function: str, body: bytes, headers: dict[str, str]) -> str:
        """A tenant cannot reach JetStream: ingress queues its invocation and answers
        the id to look it up by (its own, with the tenant's tag: shared.auth). A
        callback must be under `tenant_callbacks(tenant)`, which the tenant may hear."""
        subject = tenant_invoke_async(self.tenant_account, function)
        try:
            msg = await self.nc.request(subject, body, timeout=self.timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise GfaasError(ErrorCode.NO_WORKER, "no ingress is running") from None
        reply = decode(msg.data, InvokeReply)
        if reply.error is not None and reply.error.code is not ErrorCode.PENDING:
            raise GfaasError.from_info(reply.error)
        return reply.invocation_id

    async def result(self, invocation_id: str, *, timeout: float = 5.0) -> InvokeReply:
        subject = (
            tenant_result(self.tenant_account, invocation_id)
            if self.tenant_account
            else subjects.result(invocation_id)
        )
        try:
            msg = await self.nc.request(subject, b"", timeout=timeout)
        except nats.errors.NoRespondersError:
            # As an invocation says it: nats-py's own error is no GfaasError, and it
            # ended `gfaas result` in a traceback.
            raise GfaasError(ErrorCode.NO_WORKER, "no ingress is running") from None
        return decode(msg.data, InvokeReply)

    async def status(self, service: str, *, timeout: float = 2.0) -> ServiceStatus:
        msg = await self.nc.request(subjects.status(service), b"", timeout=timeout)
        return decode(msg.data, ServiceStatus)

    async def statuses(
        self, service: str, *, expect: int, timeout: float = 5.0
    ) -> dict[str, dict[str, Any]]:
        """Every instance's status details (each answers the status subject once), by
        instance: up to `expect` of them, or what answered within `timeout`."""
        found = await self.status_all(service, expect=expect, timeout=timeout)
        return {status.instance: status.details for status in found}

    async def status_all(
        self, service: str, *, expect: int = 1 << 16, timeout: float = 0.5
    ) -> list[ServiceStatus]:
        """The statuses of up to `expect` instances of `service`, or of all that
        answered within `timeout`."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        found: dict[str, ServiceStatus] = {}
        try:
            await self.nc.publish(subjects.status(service), b"", reply=inbox)
            with anyio.move_on_after(timeout):
                while len(found) < expect:
                    try:
                        msg = await sub.next_msg(timeout=timeout)
                    except TimeoutError:  # nats-py's own, a subclass: nobody else answers
                        break
                    if not msg.data:  # the server's "no responders": nobody runs it
                        break
                    status = decode(msg.data, ServiceStatus)
                    found[status.instance] = status
        finally:
            await sub.unsubscribe()
        return list(found.values())

    async def registry(self) -> Registry[FunctionSpec]:
        return await Registry.open(self.nc.jetstream(), replicas=self.replicas)

    async def workflow_registry(self) -> Registry[WorkflowSpec]:
        return await Registry.open_workflows(self.nc.jetstream(), replicas=self.replicas)

    async def profile(self, function: str, *, timeout: float = 120.0) -> Profile:
        """Have a node agent measure `function` on its device over a grid of (spatial
        share, time quota) configurations; stored for the autoscaler, and returned."""
        try:
            msg = await self.nc.request(
                subjects.PROFILE, encode(ProfileRequest(function=function)), timeout=timeout
            )
        except nats.errors.NoRespondersError:
            raise GfaasError(ErrorCode.NO_WORKER, "no node agent is running") from None
        except nats.errors.TimeoutError:
            raise GfaasError(ErrorCode.DEADLINE_EXCEEDED, f"no profile within {timeout}s") from None
        reply = decode(msg.data, ProfileReply)
        if reply.error is not None:
            raise GfaasError(reply.error.code, reply.error.reason)
        assert reply.profile is not None
        return reply.profile

    async def deploy(
        self, spec: FunctionSpec | WorkflowSpec, *, handler_check: bool = True
    ) -> None:
        """Register a function or a workflow; one name is never both.

        A function's handler is first dry-run on a worker (`check_handler`; skipped
        with `handler_check` False): one that cannot be imported, or takes the wrong
        arguments, is refused here rather than failing at its first call."""
        # Checked as a spec file is (raising a ValueError): specs built in code too.
        if isinstance(spec, WorkflowSpec):
            check_workflow(spec, source=spec.name)
        else:
            check_function(spec, source=spec.name)
        functions, workflows = await self.registry(), await self.workflow_registry()
        if isinstance(spec, WorkflowSpec):
            if await functions.fetch(spec.name) is not None:
                raise ValueError(f"{spec.name!r} is already a function")
            # Every stage's function is deployed and gets what it declares, so the
            # workflow cannot fail at its first call for want of one.
            plan = plan_workflow(spec)
            # Each stage's function by its key (a direct get: a listing of the whole
            # bucket is a watch that a busy server can answer late, and empty).
            deployed = {}
            for name in {stage.function for stage in spec.stages}:
                found = await functions.fetch(name)
                if found is not None:
                    deployed[name] = found
            check_functions(plan, deployed)
            check_tensors(plan, deployed)
            await _put_unless_other(workflows, spec, functions, "a function")
        else:
            if await workflows.fetch(spec.name) is not None:
                raise ValueError(f"{spec.name!r} is already a workflow")
            if spec.model:
                store = await ModelStore.open(self.nc.jetstream(), replicas=self.replicas)
                if not await store.size(spec.model):
                    raise ValueError(
                        f"{spec.name}: model {spec.model!r} is not in the model store; "
                        f"push it first (gfaas model push {spec.model} FILE)"
                    )
            await self.check_code(spec)
            if handler_check:
                await self.check_handler(spec)
            await _put_unless_other(functions, spec, workflows, "a workflow")

    async def check_handler(
        self, spec: FunctionSpec, *, timeout: float = HANDLER_CHECK_WAIT_S
    ) -> bool:
        """Have a worker dry-run `spec`'s handler in a sandbox (import, signature): True
        when one found it sound, False when none answered within `timeout` (or it could
        not check); a ValueError with the worker's reason when it is no handler."""
        try:
            msg = await self.nc.request(
                subjects.HANDLER_CHECK, encode(HandlerCheck(spec=spec)), timeout=timeout
            )
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return False
        error = decode(msg.data, HandlerCheckReply).error
        if error is not None and error.code is ErrorCode.HANDLER_ERROR:
            raise ValueError(f"{spec.name}: {error.reason}")
        return error is None

    async def device_memory(self, kind: FunctionKind, *, timeout: float = 2.0) -> list[int]:
        """Each device's total memory where a function of `kind` may run, as the
        scheduler knows the workers; empty when no scheduler answers or none is known."""
        try:
            status = await self.status("scheduler", timeout=timeout)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return []
        return memory_of_kind(kind, status.details.get("workers", {}))

    async def remove(self, name: str, *, force: bool = False) -> bool:
        """Remove a function or a workflow. A function that deployed workflows use is
        refused (ValueError naming them) unless `force`: they would fail at their
        next call."""
        workflows = await self.workflow_registry()
        if not force:
            users = sorted(
                w.name
                for w in await workflows.fetch_all()
                if any(s.function == name for s in w.stages)
            )
            if users:
                raise ValueError(
                    f"{name!r} is used by workflow(s) {', '.join(users)}; "
                    "remove those first or force it (gfaas rm --force)"
                )
        removed = await (await self.registry()).delete(name)
        return await workflows.delete(name) or removed

    async def functions(self) -> list[FunctionSpec]:
        return await (await self.registry()).fetch_all()

    async def workflows(self) -> list[WorkflowSpec]:
        return await (await self.workflow_registry()).fetch_all()

    async def push_model(self, name: str, path: Path) -> int:
        store = await ModelStore.open(self.nc.jetstream(), replicas=self.replicas)
        return await store.push(name, path)

    async def push_code(self, name: str, directory: Path) -> tuple[str, bool]:
        """Pack `directory`'s Python packages into a code bundle (shared/codebundle.py)
        and store it: what a spec's `code` pins ("NAME@sha256:<hex>"), and whether it
        was written (False: that exact content was stored already)."""
        limits = Limits(max_bytes=settings_from_env().code_bundle_max_mb * 1024 * 1024)
        data = await anyio.to_thread.run_sync(pack, directory, limits)
        store = await CodeStore.open(self.nc.jetstream(), replicas=self.replicas)
        ref, written = await store.push(name, data)
        return str(ref), written

    async def check_code(self, spec: FunctionSpec) -> None:
        """A ValueError (one line) when `spec` pins a code bundle the store does not
        hold as pinned; nothing for a spec without one."""
        if not spec.code:
            return
        store = await CodeStore.open(self.nc.jetstream(), replicas=self.replicas)
        problem = await store.problem(parse_ref(spec.code))
        if problem is not None:
            raise ValueError(f"{spec.name}: {problem}")

    async def code_bundles(self) -> list[tuple[str, int, list[str]]]:
        """Every stored bundle version: its reference, its size and the deployed
        functions that pin it."""
        store = await CodeStore.open(self.nc.jetstream(), replicas=self.replicas)
        pins = await self._pins()
        return [(ref, size, pins.get(ref, [])) for ref, size in await store.stored()]

    async def remove_code(self, ref: str, *, force: bool = False) -> bool:
        """Remove a stored bundle version; False when it is not stored. One that
        deployed functions pin is refused (ValueError naming them) unless `force`:
        their next instance would not start."""
        parsed = parse_ref(ref)  # a BundleError (a ValueError) for a malformed one
        users = (await self._pins()).get(str(parsed), [])
        if users and not force:
            raise ValueError(
                f"{parsed.short} is pinned by function(s) {', '.join(users)}; redeploy "
                "them with another version first or force it (gfaas code rm --force)"
            )
        store = await CodeStore.open(self.nc.jetstream(), replicas=self.replicas)
        return await store.delete(parsed)

    async def _pins(self) -> dict[str, list[str]]:
        pins: dict[str, list[str]] = {}
        for spec in await self.functions():
            if spec.code:
                pins.setdefault(spec.code, []).append(spec.name)
        return {ref: sorted(names) for ref, names in pins.items()}

    async def models(self) -> list[tuple[str, int]]:
        return await (await ModelStore.open(self.nc.jetstream(), replicas=self.replicas)).list()

    async def ensure_resources(self) -> None:
        js = self.nc.jetstream()
        await jetstream.ensure_invocations_stream(js, replicas=self.replicas)
        await jetstream.results_kv(js, replicas=self.replicas)


def spec_json(spec: FunctionSpec | WorkflowSpec) -> str:
    return json.dumps(msgspec.to_builtins(spec), indent=2)


async def _put_unless_other(
    mine: Registry[Any], spec: FunctionSpec | WorkflowSpec, other: Registry[Any], what: str
) -> None:
    """Put `spec`, unless `other` has its name: looked at again after the checks (a
    handler's dry run takes seconds), and once more after the put, since two buckets
    cannot be written together. A deploy of the other kind under the same name at the
    same moment then sees this one, and at most one of the two stays, never both."""
    if await other.fetch(spec.name) is not None:
        raise ValueError(f"{spec.name!r} is already {what}")
    await mine.put(spec)
    if await other.fetch(spec.name) is not None:
        await mine.delete(spec.name)
        raise ValueError(f"{spec.name!r} is already {what}")

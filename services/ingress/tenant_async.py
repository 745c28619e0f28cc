"""A tenant's async invocations over NATS: `gfaas.v1.t.<tenant>.invoke_async.<fn>`.

The TENANTS account reaches these through its imports (shared/auth.py), so the tenant
in the subject is the authenticated one. A submit is checked here and queued in
GFAAS_INVOCATIONS as the service account's own are, under the tenant's name: the
tenant from the subject in `Gfaas-Tenant` (whatever header it wrote), its id with
the tenant's tag (`auth.tenant_invocation_id`: no tenant can make, or look up, an id
of another's), its callback only under its own `gfaas.v1.tcb.<tenant>.` (a stream the
TENANTS account imports, each tenant hearing only its own). From there async_path.py
runs it like any other and `AsyncInvocations.result` answers its lookups.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
from nats.js.client import JetStreamContext

from services.ingress.admission import too_large
from shared import auth, subjects
from shared.bus import header_bytes
from shared.config import PAYLOAD_HEADROOM
from shared.logs import get_logger
from shared.names import is_valid_name
from shared.results import deadline_problem
from shared.schema import (
    H_CALLBACK,
    H_DEADLINE,
    H_INVOCATION,
    H_MSG_ID,
    H_TENANT,
    ErrorCode,
    InvokeReply,
    InvokeRequest,
    decode,
    error_reply,
    is_valid_token,
    new_invocation_id,
    now_millis,
)

log = get_logger("ingress.tenant_async")

# What a submit is answered with once it is queued (as a result lookup says of it).
QUEUED = "queued, not started yet"


def callback_problem(tenant: str, callback: str) -> str:
    """Why a tenant may not have `callback` (its subject for the result), or ""."""
    prefix = auth.tenant_callbacks(tenant)
    rest = callback.removeprefix(prefix + ".")
    if rest != callback and all(is_valid_token(t) for t in rest.split(".")):
        return ""
    return (
        f"a tenant's callback must be a subject under {prefix}. (tokens of "
        f"[A-Za-z0-9_-]; only those reach it), not {callback!r}"
    )


def asked_deadline_problem(request: InvokeRequest, headers: Mapping[str, str]) -> str:
    """Why the deadline the caller asked for (its deadline header, else its
    timeout_ms) is too far off for an async invocation, or "". One taken from the
    function's spec is checked when the invocation is taken (admission), as any
    async invocation's is; said here, the caller hears it at once."""
    remaining_ms = request.timeout_ms
    try:
        deadline_ms = int(headers.get(H_DEADLINE, "0") or 0)
    except ValueError:
        deadline_ms = 0  # admission refuses it, with its reason
    if deadline_ms:
        remaining_ms = deadline_ms - now_millis()
    return deadline_problem(remaining_ms / 1000.0)


def queued_headers(
    tenant: str, invocation_id: str, callback: str, given: Mapping[str, str] | None
) -> dict[str, str]:
    """The queued message's headers: the caller's (its trace context), less
    JetStream's own (`Nats-`: dedup and expectations are ours to set), with the
    tenant, the id (also the dedup key, as the service account's client sets it) and
    the checked callback written over whatever the caller said."""
    headers = {k: v for k, v in (given or {}).items() if not k.startswith("Nats-")}
    headers.pop(H_CALLBACK, None)
    headers.update({H_TENANT: tenant, H_INVOCATION: invocation_id, H_MSG_ID: invocation_id})
    if callback:
        headers[H_CALLBACK] = callback
    return headers


async def submit(
    js: JetStreamContext,
    tenant: str,
    function: str,
    body: bytes,
    headers: Mapping[str, str] | None,
    *,
    max_payload: int,
) -> InvokeReply:
    """Queue a tenant's async invocation: `pending` with the id to look it up by, or
    the reason it was not queued. `max_payload`: the platform's limit on a body
    (shared.config.effective_max_payload), under the server's by PAYLOAD_HEADROOM."""
    h = headers or {}
    try:
        request = decode(body, InvokeRequest)
    except msgspec.MsgspecError as exc:
        return error_reply("", ErrorCode.BAD_REQUEST, f"malformed request: {exc}")
    given = h.get(H_INVOCATION) or h.get(H_MSG_ID) or request.invocation_id or new_invocation_id()
    invocation_id = auth.tenant_invocation_id(tenant, given)
    problem = ""
    if not is_valid_name(function):
        problem = f"{function!r} is not a function name"
    elif not is_valid_token(invocation_id):
        longest = 64 - len(auth.tenant_tag(tenant))
        problem = f"invocation id {given!r} must be 1-{longest} characters of [A-Za-z0-9_-]"
    callback = h.get(H_CALLBACK) or request.callback
    problem = problem or (callback_problem(tenant, callback) if callback else "")
    problem = problem or asked_deadline_problem(request, h)
    if problem:
        return error_reply(given, ErrorCode.BAD_REQUEST, problem)
    queued = queued_headers(tenant, invocation_id, callback, h)
    # The server takes a publish past its max_payload (body and headers) as a
    # protocol violation and closes the connection: ingress's, for a body the tenant
    # sent just under the limit to which the queued headers were added.
    if len(body) > max_payload:
        refused = too_large(len(body), max_payload)
        return error_reply(invocation_id, refused.code, refused.reason)
    if header_bytes(queued) > PAYLOAD_HEADROOM:
        return error_reply(
            invocation_id,
            ErrorCode.BAD_REQUEST,
            f"headers of {header_bytes(queued)} bytes exceed the {PAYLOAD_HEADROOM}-byte limit",
        )
    try:
        await js.publish(subjects.invoke_async(function), body, headers=queued)
    except Exception as exc:  # JetStream out of reach, no stream leader: the caller may retry
        log.warning("tenant_async.queue_failed", tenant=tenant, error=repr(exc))
        return error_reply(
            invocation_id, ErrorCode.UNAVAILABLE, f"could not queue the invocation: {exc!r}"
        )
    return error_reply(invocation_id, ErrorCode.PENDING, QUEUED)

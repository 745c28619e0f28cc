"""Admission of one invocation: everything ingress checks before work is scheduled.

Pure over (function name, body, headers, the registry's cached spec): no I/O, so the
sync, async and HTTP paths share it and it is tested without a server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Final

import msgspec

from shared.config import DEFAULT_MAX_DEADLINE_S
from shared.errors import GfaasError, bad_request
from shared.names import is_valid_name, name_problem
from shared.schema import (
    DEFAULT_TENANT,
    H_DEADLINE,
    H_INVOCATION,
    H_MSG_ID,
    H_TENANT,
    ErrorCode,
    FunctionSpec,
    InvocationMeta,
    InvokeRequest,
    Tensor,
    WorkflowSpec,
    decode,
    is_valid_token,
    new_invocation_id,
)
from shared.tensors import validate_inputs

# Functions and workflows share one namespace of names.
Spec = FunctionSpec | WorkflowSpec
SpecLookup = Callable[[str], Spec | None]
DEFAULT_MAX_TIMEOUT_MS: Final = DEFAULT_MAX_DEADLINE_S * 1000


def too_large(size: int, max_payload: int) -> GfaasError:
    """A request body over the bus's limit (the sync, async and tenant paths)."""
    return GfaasError(
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"request of {size} bytes exceeds the {max_payload}-byte limit; "
        "send large tensors by handle",
    )


def decode_request(body: bytes) -> InvokeRequest:
    try:
        return decode(body, InvokeRequest)
    except msgspec.MsgspecError as exc:
        raise GfaasError(ErrorCode.BAD_REQUEST, f"malformed request: {exc}") from None


def admit(
    function: str,
    body: bytes,
    headers: Mapping[str, str] | None,
    lookup: SpecLookup,
    *,
    max_payload: int,
    now_ms: int,
    id_tag: str = "",
    max_timeout_ms: float = DEFAULT_MAX_TIMEOUT_MS,
) -> tuple[InvocationMeta, InvokeRequest, Spec]:
    """Validate and stamp an invocation, or raise GfaasError with the reason.
    `id_tag`: an id the caller gave is put under it (a tenant's, shared.auth).
    `max_timeout_ms`: the furthest past `now_ms` a caller may set the deadline (the
    function's own timeout when that is longer; inf: no cap)."""
    h = headers or {}
    if len(body) > max_payload:
        raise too_large(len(body), max_payload)
    request = decode_request(body)
    given = h.get(H_INVOCATION) or h.get(H_MSG_ID) or request.invocation_id
    if given and id_tag and not given.startswith(id_tag):
        given = id_tag + given
    invocation_id = given or new_invocation_id()
    if not is_valid_token(invocation_id):
        raise GfaasError(
            ErrorCode.BAD_REQUEST,
            f"invocation id {invocation_id!r} must be 1-64 characters of [A-Za-z0-9_-]",
        )
    spec = lookup(function)
    if spec is None:
        raise GfaasError(ErrorCode.UNKNOWN_FUNCTION, f"function {function!r} is not deployed")
    validate_inputs(spec, request.inputs)
    tenant = h.get(H_TENANT) or DEFAULT_TENANT
    if not is_valid_name(tenant):
        raise GfaasError(ErrorCode.BAD_REQUEST, name_problem("tenant", tenant))
    try:
        deadline = int(h.get(H_DEADLINE, "0") or 0)
    except ValueError:
        raise GfaasError(ErrorCode.BAD_REQUEST, f"{H_DEADLINE} must be an integer") from None
    if deadline < 0:
        raise bad_request(f"{H_DEADLINE} must be a time in ms since the epoch, got {deadline}")
    if request.timeout_ms < 0:
        raise bad_request(f"timeout_ms must not be negative, got {request.timeout_ms}")
    if not deadline:
        deadline = now_ms + (request.timeout_ms or spec.timeout_ms)
    # The caller's deadline, however far out it asks, ends by the cap: a far one held
    # its queue slot, grant, leases and result for as long as it said.
    furthest = now_ms + max(max_timeout_ms, spec.timeout_ms)
    if deadline > furthest:
        deadline = int(furthest)
    meta = InvocationMeta(
        invocation_id=invocation_id,
        function=function,
        tenant=tenant,
        deadline_ms=deadline,
        node=input_node(request.inputs),
    )
    return meta, request, spec


def input_node(inputs: Sequence[Tensor]) -> str:
    """The node whose pool holds most of the by-handle input bytes ("" when none are
    by handle): a worker there reads them in place, one elsewhere has them copied."""
    held: dict[str, int] = {}
    for t in inputs:
        if t.handle is not None:
            held[t.handle.pool] = held.get(t.handle.pool, 0) + t.handle.nbytes
    # Ties go to the first name, so one request always routes the same way.
    return min(held, key=lambda node: (-held[node], node)) if held else ""

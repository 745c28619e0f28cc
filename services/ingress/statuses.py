"""The one table from gfaas error codes to the statuses both OIP fronts answer with.

HTTP (http.py) and gRPC (grpc_front.py) read their status for a code from here, so
a code cannot mean "retry" on one front and "broken" on the other. Codes that are
the platform's passing trouble (no room, no worker, a model the store cannot give
right now) are 503 / UNAVAILABLE: the status clients and gRPC retry policies retry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, NamedTuple

import grpc

from shared.schema import ErrorCode


class Statuses(NamedTuple):
    http: int
    grpc: grpc.StatusCode


_S = grpc.StatusCode

STATUSES: Final[Mapping[ErrorCode, Statuses]] = {
    # The caller's request is wrong: retrying it cannot help.
    ErrorCode.BAD_REQUEST: Statuses(400, _S.INVALID_ARGUMENT),
    ErrorCode.INVALID_INPUT: Statuses(400, _S.INVALID_ARGUMENT),
    ErrorCode.NO_POOL: Statuses(400, _S.INVALID_ARGUMENT),
    ErrorCode.UNKNOWN_FUNCTION: Statuses(404, _S.NOT_FOUND),
    ErrorCode.NOT_FOUND: Statuses(404, _S.NOT_FOUND),
    ErrorCode.PAYLOAD_TOO_LARGE: Statuses(413, _S.RESOURCE_EXHAUSTED),
    ErrorCode.QUOTA_EXCEEDED: Statuses(429, _S.RESOURCE_EXHAUSTED),
    # The function, as deployed, cannot meet its SLO on these devices.
    ErrorCode.SLO_UNMEETABLE: Statuses(503, _S.FAILED_PRECONDITION),
    # Transient, not the caller's fault: worth retrying.
    ErrorCode.OVERLOADED: Statuses(503, _S.UNAVAILABLE),
    ErrorCode.NO_WORKER: Statuses(503, _S.UNAVAILABLE),
    ErrorCode.WORKER_LOST: Statuses(503, _S.UNAVAILABLE),
    ErrorCode.UNAVAILABLE: Statuses(503, _S.UNAVAILABLE),
    # The model is missing from, truncated or corrupt in the model store (or a push
    # is under way), or no device has room for it: the platform's (or its
    # operator's) trouble, not the caller's, and retried as such by the async path
    # (it is not a CALLER_FAULT); a model pushed later serves the same request.
    ErrorCode.MODEL_UNAVAILABLE: Statuses(503, _S.UNAVAILABLE),
    ErrorCode.SUPERSEDED: Statuses(409, _S.ABORTED),
    ErrorCode.DEADLINE_EXCEEDED: Statuses(504, _S.DEADLINE_EXCEEDED),
    ErrorCode.HANDLER_ERROR: Statuses(500, _S.INTERNAL),
    ErrorCode.INTERNAL: Statuses(500, _S.INTERNAL),
}
# A code missing from the table (none is, bar `pending`, never an inference's answer).
FALLBACK: Final = Statuses(500, _S.INTERNAL)


def statuses_for(code: ErrorCode) -> Statuses:
    return STATUSES.get(code, FALLBACK)

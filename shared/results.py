"""Async invocations' records in the results KV: one key per invocation id.

The KV revision orders an invocation's attempts. Ingress writes PENDING when it takes
a delivery and sends the attempt with that revision (`H_CLAIM`); the worker moves the
record to RUNNING at exactly that revision before it runs the handler, and to DONE
when it has the reply. An attempt another delivery has superseded (its revision is
stale) is refused by the worker, so one invocation never runs twice at once, and a
redelivery finds the result of work already done instead of running it again.
"""

from __future__ import annotations

from typing import Final

import nats.errors
import nats.js.errors
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared.errors import GfaasError
from shared.jetstream import RESULT_TTL_S
from shared.schema import (
    CALLER_FAULTS,
    AsyncRecord,
    AsyncState,
    ErrorCode,
    InvokeReply,
    decode,
    encode,
    error_reply,
)

# What a KV operation raises when JetStream cannot be reached (a node down, no
# quorum for a moment): a platform fault, never the caller's.
UNREACHABLE: Final = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    TimeoutError,
    # The stream has no leader for a moment (a cluster node died) or says so.
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)

# The store keeps each record RESULT_TTL_S from its last write. An attempt's record is
# written when ingress takes it (PENDING) and when a worker claims it (RUNNING), and
# not again until its result (DONE, then kept RESULT_TTL_S): an attempt whose
# deadline is further off than the TTL outlived its record, so a lookup answered
# not_found while it ran, and a redelivery found no record and ran it a second time,
# the worker's result refused (its claim's revision gone). Async attempts' deadlines
# are held to MAX_ASYNC_S, which leaves RECORD_MARGIN_S for clocks that disagree and
# a worker's retries at storing its result.
RECORD_MARGIN_S: Final = 120.0
MAX_ASYNC_S: Final = RESULT_TTL_S - RECORD_MARGIN_S

# Room for a KV write's headers (Nats-Expected-Last-Subject-Sequence and its framing).
RECORD_HEADROOM: Final = 128


class ResultStore:
    def __init__(self, kv: KeyValue, *, max_payload: int) -> None:
        self.kv = kv
        self.max_payload = max_payload

    async def get(self, invocation_id: str) -> tuple[AsyncRecord, int] | None:
        try:
            entry = await self.kv.get(invocation_id)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if not entry.value or entry.revision is None:
            return None
        return decode(entry.value, AsyncRecord), entry.revision

    async def create(self, invocation_id: str, record: AsyncRecord) -> int | None:
        """The new revision, or None when a record exists already."""
        try:
            return await self.kv.create(invocation_id, encode(record))
        except KeyWrongLastSequenceError:
            return None

    async def swap(self, invocation_id: str, record: AsyncRecord, last: int) -> int | None:
        """Write `record` if the key is still at revision `last`: the new revision, or
        None when someone wrote it since."""
        try:
            return await self.kv.update(invocation_id, encode(record), last=last)
        except KeyWrongLastSequenceError:
            return None

    async def first_to_count(self, invocation_id: str) -> bool:
        """True the first time it is asked of an invocation (within the store's TTL):
        its final outcome is counted once, whichever delivery of it finishes first."""
        try:
            await self.kv.create(counted_key(invocation_id), b"1")
        except KeyWrongLastSequenceError:
            return False
        return True

    async def claim(self, invocation_id: str, revision: int, worker: str) -> int:
        """A worker takes the attempt sent at `revision`; raises SUPERSEDED when
        another attempt owns the invocation, UNAVAILABLE when the store is out of reach."""
        try:
            new = await self.swap(
                invocation_id, AsyncRecord(state=AsyncState.RUNNING, worker=worker), revision
            )
        except UNREACHABLE as exc:
            raise GfaasError(
                ErrorCode.UNAVAILABLE, f"the results store did not answer: {exc!r}"
            ) from None
        if new is None:
            raise GfaasError(
                ErrorCode.SUPERSEDED,
                f"a newer attempt of {invocation_id} owns it; this one was not run",
            )
        return new

    def done(self, reply: InvokeReply) -> AsyncRecord:
        record = AsyncRecord(state=AsyncState.DONE, reply=reply)
        # A result too large for the store (it rides messages too) is stored as the
        # error that says so, not dropped. What is written is the record, with the
        # update's expected-revision header: the server counts both against
        # max_payload, and closes the connection of a publish past it.
        if len(encode(record)) + RECORD_HEADROOM <= self.max_payload:
            return record
        return AsyncRecord(state=AsyncState.DONE, reply=self._too_large(reply))

    def _too_large(self, reply: InvokeReply) -> InvokeReply:
        return error_reply(
            reply.invocation_id,
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"result of {len(encode(reply))} bytes is too large to store; "
            "large outputs move by handle",
        )


def deadline_problem(remaining_s: float) -> str:
    """Why an async invocation whose deadline is `remaining_s` off cannot be taken
    ("" when it can)."""
    if remaining_s <= MAX_ASYNC_S:
        return ""
    return (
        f"an async invocation's deadline may be at most {MAX_ASYNC_S:.0f} s off (its "
        f"record is kept {RESULT_TTL_S:.0f} s), not {remaining_s:.0f} s: ask for a "
        "shorter timeout_ms, or call it synchronously"
    )


def counted_key(invocation_id: str) -> str:
    """The key that says an invocation's outcome is counted: beside its record, never
    one (no invocation id has a dot)."""
    return f"counted.{invocation_id}"


def answer(invocation_id: str, record: AsyncRecord) -> InvokeReply:
    """What `gfaas.v1.result.<id>` answers for a record."""
    if record.state is AsyncState.DONE and record.reply is not None:
        return record.reply
    if record.state is AsyncState.RUNNING:
        reason = f"running on worker {record.worker}"
    elif record.last_error is not None:
        reason = (
            f"attempt {record.attempt} failed with {record.last_error.code}: "
            f"{record.last_error.reason}; it will be tried again"
        )
    else:
        reason = "accepted, not finished yet"
    return error_reply(invocation_id, ErrorCode.PENDING, reason)


def is_final(reply: InvokeReply) -> bool:
    """A result to store: success, or a failure that is the caller's to fix. Anything
    else is the platform's fault and the invocation is tried again."""
    error = reply.error
    if error is None or error.code in CALLER_FAULTS:
        return True
    # A handler that ran past its own deadline is the function's; a deadline missed
    # before any worker answered (a service down) is not.
    return error.code is ErrorCode.DEADLINE_EXCEEDED and bool(reply.worker)

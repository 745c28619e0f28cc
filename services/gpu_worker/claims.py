"""Async attempts: claimed in the results store before they run, their result stored
before anyone is told (shared/results.py has the record and its revisions)."""

from __future__ import annotations

import anyio

from shared.logs import get_logger
from shared.results import UNREACHABLE, ResultStore, is_final
from shared.schema import (
    AsyncRecord,
    AsyncState,
    ErrorCode,
    ErrorInfo,
    InvocationMeta,
    InvokeReply,
)

log = get_logger("gpu_worker")

# Tries at storing a claimed async result while the store is out of reach (about 30 s).
STORE_ATTEMPTS = 20


class Claims:
    def __init__(self, results: ResultStore | None, worker_id: str, claimed: set[str]) -> None:
        self.results = results
        self.worker_id = worker_id
        # Claimed attempts whose results are not stored yet (the heartbeats list them).
        self.claimed = claimed

    async def claim(self, meta: InvocationMeta) -> int:
        """An async attempt is claimed in the results store before it runs (0: a sync
        invocation, nothing to claim): a superseded attempt is refused, never run."""
        if not meta.claim or self.results is None:
            return 0
        # Listed before the claim is made, so any heartbeat after it says so.
        self.claimed.add(meta.invocation_id)
        try:
            return await self.results.claim(meta.invocation_id, meta.claim, self.worker_id)
        except BaseException:
            self.claimed.discard(meta.invocation_id)
            raise

    async def store(self, meta: InvocationMeta, claimed: int, reply: InvokeReply) -> None:
        """The result of a claimed attempt, stored before anyone is told: should the
        ingress that sent it die, a redelivery finds it instead of running it again."""
        assert self.results is not None
        # A failure that is not the caller's (a model not in the store, the device out
        # of memory) is not the result: the claim is given back as PENDING with the
        # reason, so the ingress retries it (or, should it die, a redelivery does);
        # stored as DONE, it was answered as final to every later delivery.
        record = (
            self.results.done(reply)
            if is_final(reply)
            else AsyncRecord(state=AsyncState.PENDING, last_error=reply.error)
        )
        try:
            # Through a short outage of the store: until it is stored, a redelivery
            # would run it again. Listed as claimed meanwhile, so it is waited for.
            for attempt in range(STORE_ATTEMPTS):
                try:
                    stored = await self.results.swap(meta.invocation_id, record, claimed)
                except UNREACHABLE as exc:
                    log.warning(
                        "result.store_failed",
                        invocation_id=meta.invocation_id,
                        attempt=attempt + 1,
                        error=repr(exc),
                    )
                    await anyio.sleep(min(0.1 * 2**attempt, 2.0))
                    continue
                if stored is None:  # an ingress stored it from our reply first
                    log.info("result.stored_elsewhere", invocation_id=meta.invocation_id)
                return
        finally:
            self.claimed.discard(meta.invocation_id)

    async def give_back(self, meta: InvocationMeta, claimed: int, error: BaseException) -> None:
        """A claimed attempt that failed short of a reply (a bug, an error no GfaasError
        says): stored as the internal failure it is, which is retried, unless its
        result is stored already. Kept claimed, it was listed in every heartbeat as
        running, and the ingress waited on it for good."""
        if not claimed or meta.invocation_id not in self.claimed:
            return
        reply = InvokeReply(
            invocation_id=meta.invocation_id,
            error=ErrorInfo(code=ErrorCode.INTERNAL, reason=repr(error)),
            worker=self.worker_id,
        )
        try:
            await self.store(meta, claimed, reply)
        except Exception as exc:  # no longer listed: the ingress takes it as lost
            log.warning(
                "result.give_back_failed", invocation_id=meta.invocation_id, error=repr(exc)
            )

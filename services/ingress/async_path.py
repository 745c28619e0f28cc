"""Async invocations: at least once from JetStream, exactly one stored result.

Each delivery of a message from GFAAS_INVOCATIONS is handled here:

- it is identified (header id, Nats-Msg-Id, the body's id, else its stream position);
  one that can never succeed (no usable id, a malformed body) goes to the
  dead-letter stream with the reason and is acknowledged, never left to block;
- its record in the results KV (shared.results) decides what happens: DONE is
  answered from the record, RUNNING is waited for while its worker lives, PENDING is
  taken over with a new revision, which the worker must claim before it runs;
- a failure that is not the caller's is retried: the record keeps the reason, the
  message is nak'ed with a growing delay (another ingress may take it), and after
  `async_max_attempts` deliveries it fails with the reason and the attempts;
- while it is handled, in-progress acks keep JetStream from redelivering it;
- its final outcome (a result, a give-up, a dead-lettered message) is counted once,
  as a sync call's is (`settled`: gfaas_invocations_total), by the first delivery to
  have it; the attempts before it are not counted.

Only then is the callback published and the message acknowledged, so a crash
anywhere means redelivery, and redelivery never means a second run.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Awaitable, Mapping
from typing import Literal, Protocol

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from shared import auth, jetstream, subjects
from shared.bus import BusHealth, decode_event, header_bytes, send_reply
from shared.config import Settings
from shared.errors import described
from shared.logs import get_logger
from shared.results import UNREACHABLE, ResultStore, answer, is_final
from shared.schema import (
    H_CALLBACK,
    H_DEAD_CODE,
    H_DEAD_REASON,
    H_DEADLINE,
    H_INVOCATION,
    H_MSG_ID,
    AsyncRecord,
    AsyncState,
    ErrorCode,
    InvokeReply,
    InvokeRequest,
    WorkerHeartbeat,
    decode,
    error_reply,
    is_valid_token,
    now_millis,
)

log = get_logger("ingress.async")

# How often a waiting delivery looks at its record again.
POLL_S = 0.05
# How many messages not read yet a result lookup that found no record reads at most
# (newest first; a later lookup reads on), and how many queued ids ingress keeps.
QUEUED_SCAN = 1024
QUEUED_INDEX_MAX = 200_000


class Call(Protocol):
    def __call__(
        self, function: str, body: bytes, headers: Mapping[str, str], *, claim: int
    ) -> Awaitable[InvokeReply]: ...


class Settled(Protocol):
    """Told an invocation's final outcome, once (metrics: `Ingress.settled`)."""

    def __call__(
        self,
        function: str,
        headers: Mapping[str, str] | None,
        reply: InvokeReply,
        seconds: float | None,
    ) -> Awaitable[None]: ...


async def _uncounted(
    function: str, headers: Mapping[str, str] | None, reply: InvokeReply, seconds: float | None
) -> None:
    return None


def backoff_s(attempt: int, base_s: float, cap_s: float, jitter: float = 0.2) -> float:
    """The wait before delivery `attempt + 1`: doubling from `base_s` up to `cap_s`,
    with some jitter so that work failed together is not retried together."""
    delay = min(base_s * 2.0 ** max(attempt - 1, 0), cap_s)
    return delay * (1.0 + jitter * (2.0 * random.random() - 1.0))


def identify(headers: Mapping[str, str] | None, data: bytes, seq: int) -> str:
    """The id a caller can fetch the result by: the header, the dedup id, the body's,
    else one derived from the stream position (the same on every redelivery)."""
    h = headers or {}
    found = h.get(H_INVOCATION) or h.get(H_MSG_ID)
    if not found:
        try:
            found = decode(data, InvokeRequest).invocation_id
        except msgspec.MsgspecError:
            found = ""
    return found or f"s{seq}"


def deadline_passed(headers: Mapping[str, str] | None) -> int:
    """The caller's absolute deadline (`Gfaas-Deadline-Ms`) if it has passed, else 0.
    No attempt can make it then: one sent was refused by its worker or timed out at
    once, a failure no fault of the caller's, and was tried again to the last."""
    try:
        deadline = int((headers or {}).get(H_DEADLINE, "0") or 0)
    except ValueError:
        return 0  # admission refuses it, with its reason
    return deadline if 0 < deadline <= now_millis() else 0


def expired(invocation_id: str, deadline_ms: int, attempt: int, last: str = "") -> InvokeReply:
    """The final result of an invocation whose deadline passed before it could run."""
    late = now_millis() - deadline_ms
    reason = f"its deadline ({H_DEADLINE} {deadline_ms}) passed {late} ms ago"
    reason += f", after attempt {attempt}; the last: {last}" if last else ", before it ran"
    return error_reply(invocation_id, ErrorCode.DEADLINE_EXCEEDED, reason)


def not_found(invocation_id: str) -> InvokeReply:
    return error_reply(
        invocation_id, ErrorCode.NOT_FOUND, f"no result for invocation {invocation_id}"
    )


class AsyncInvocations:
    def __init__(
        self,
        nc: NATS,
        results: ResultStore,
        call: Call,
        settings: Settings,
        *,
        max_payload: int,
        health: BusHealth,
        settled: Settled = _uncounted,
    ) -> None:
        self.nc = nc
        self.settled = settled
        self.health = health
        self.results = results
        self.call = call
        self.settings = settings
        self.max_payload = max_payload
        self.completed = 0
        self.retried = 0
        self.dead = 0
        self.answered_from_record = 0
        self.queued = QueuedIndex()

    # -- one delivery -------------------------------------------------------------------

    async def handle(self, msg: Msg) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_alive, msg)
            try:
                await self._handle_through_outages(msg)
            except UNREACHABLE as exc:
                # JetStream itself is out of reach still: another ingress (another
                # node's) may reach it, rather than wait out the ack.
                log.warning("async.store_unreachable", subject=msg.subject, error=repr(exc))
                await self._nak(msg, msg.metadata.num_delivered or 1)
            except Exception as exc:
                log.exception("async.failed", subject=msg.subject)
                await self._broken(msg, exc)
            finally:
                tg.cancel_scope.cancel()

    async def _handle_through_outages(self, msg: Msg) -> None:
        """`_handle`, again after a backoff while the store is out of reach (a node
        down, a stream leader being elected), for up to an ack wait; then it raises.
        Nak'ed at each failure, every delivery counted as an attempt: a few seconds'
        outage used up an invocation's attempts before it ran, and its first real
        failure after was its last. Handling a delivery again is what a redelivery
        does, so it is safe from wherever the outage stopped it."""
        give_up_at = time.monotonic() + self.settings.async_ack_wait_s
        outage = 0
        while True:
            try:
                await self._handle(msg)
                return
            except UNREACHABLE as exc:
                outage += 1
                if time.monotonic() >= give_up_at:
                    raise
                log.warning(
                    "async.store_unreachable", subject=msg.subject, outage=outage, error=repr(exc)
                )
                base, cap = self.settings.async_backoff_s, self.settings.async_backoff_max_s
                await anyio.sleep(backoff_s(outage, base, cap))

    async def _broken(self, msg: Msg, exc: Exception) -> None:
        """A delivery whose handling raised (a bug, a record that will not decode):
        tried again after a backoff as a platform fault is, and once out of attempts
        given up on as one is (its result stored where it can be, dead-lettered).
        Left unsettled, it came back at every ack wait, for good."""
        attempt = msg.metadata.num_delivered or 1
        if attempt < self.settings.async_max_attempts:
            await self._nak(msg, attempt)
            return
        function = subjects.last_token(msg.subject)
        invocation_id = identify(msg.headers, msg.data, msg.metadata.sequence.stream)
        reason = f"gave up after {attempt} attempts; the last: handling it failed: {described(exc)}"
        try:
            if is_valid_token(invocation_id):
                # A worker may hold it still (handling raised after it claimed the
                # attempt): the give-up wrote over its RUNNING record, and the result
                # it then stored was refused. Its claim stands while it lives.
                await self._while_running(invocation_id)
                final = error_reply(invocation_id, ErrorCode.INTERNAL, reason)
                stored = await self._finish_stored(invocation_id, final)
                await self._count(msg, function, invocation_id, msg.headers, stored)
                await self._tell(self._callback_of(msg), stored)
                if stored is not final:  # the worker's result: the invocation is done
                    await msg.ack()
                    return
        except Exception as failed:  # the store may be what fails: dead-lettered still
            log.warning("async.give_up_failed", subject=msg.subject, error=repr(failed))
        try:
            await self._dead(msg, function, ErrorCode.INTERNAL, reason)
        except Exception as failed:  # back after the ack wait, and given up on again
            log.warning("async.dead_letter_failed", subject=msg.subject, error=repr(failed))
            return
        if not is_valid_token(invocation_id):  # no record to say it was: counted once let go
            final = error_reply("", ErrorCode.INTERNAL, reason)
            await self.settled(function, msg.headers, final, self._since_queued(msg))

    @staticmethod
    def _callback_of(msg: Msg) -> str:
        """Where the caller asked for its result: the header's, else the body's."""
        found = (msg.headers or {}).get(H_CALLBACK, "")
        if not found:
            try:
                found = decode(msg.data, InvokeRequest).callback
            except msgspec.MsgspecError:
                found = ""
        return found

    async def _nak(self, msg: Msg, attempt: int) -> None:
        delay = backoff_s(attempt, self.settings.async_backoff_s, self.settings.async_backoff_max_s)
        try:
            await msg.nak(delay=delay)
        except Exception as exc:  # it comes back after the ack wait anyway
            log.warning("async.nak_failed", error=repr(exc))

    async def consume(self, stop: anyio.Event) -> None:
        """Take deliveries while there are free slots, until `stop`; in-flight ones
        finish first. Only as many are fetched as can start at once, so a fetched
        message never waits unrecorded behind a busy slot."""
        js = self.nc.jetstream()
        while True:
            # A cluster may be electing a stream leader just now: keep trying.
            try:
                await jetstream.ensure_async_consumer(
                    js,
                    ack_wait_s=self.settings.async_ack_wait_s,
                    max_ack_pending=max(self.settings.async_concurrency * 64, 1024),
                )
                break
            except Exception as exc:
                log.warning("async.consumer_unavailable", error=repr(exc))
                with anyio.move_on_after(1.0):
                    await stop.wait()
                if stop.is_set():
                    return
        sub = await js.pull_subscribe_bind(
            jetstream.ASYNC_CONSUMER, stream=jetstream.INVOCATIONS_STREAM
        )
        slots = anyio.Semaphore(self.settings.async_concurrency)
        try:
            async with anyio.create_task_group() as runs:

                async def run(msg: Msg) -> None:
                    try:
                        await self.handle(msg)
                    except Exception:  # its settling failed too: back after the ack wait
                        log.exception("async.failed", subject=msg.subject)
                    finally:
                        slots.release()

                async def fetch_loop() -> None:
                    while True:
                        await slots.acquire()
                        free = 1
                        while slots.value > 0:
                            slots.acquire_nowait()
                            free += 1
                        batch: list[Msg] = []
                        try:
                            batch = await sub.fetch(batch=free, timeout=1)
                        except TimeoutError:
                            # nats-py raises its own subclass or, from deeper in,
                            # asyncio's plain one: both mean "no work".
                            pass
                        except Exception as exc:  # a node down, a reconnect: try again
                            log.warning("async.fetch_failed", error=repr(exc))
                            await anyio.sleep(0.25)
                        for msg in batch:
                            runs.start_soon(run, msg)
                        for _ in range(free - len(batch)):
                            slots.release()

                async with anyio.create_task_group() as intake:
                    intake.start_soon(fetch_loop)
                    await stop.wait()
                    intake.cancel_scope.cancel()
        finally:
            # A pull subscription never marks its queue done, so drain() would wait on it.
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()

    async def _keep_alive(self, msg: Msg) -> None:
        period = max(self.settings.async_ack_wait_s / 3.0, 0.05)
        while True:
            await anyio.sleep(period)
            try:
                await msg.in_progress()
            except Exception as exc:  # the next one may get through; redelivery is safe
                log.warning("async.in_progress_failed", error=repr(exc))

    async def _handle(self, msg: Msg) -> None:
        function = subjects.last_token(msg.subject)
        request: InvokeRequest | None = None
        malformed = ""
        try:
            request = decode(msg.data, InvokeRequest)
        except msgspec.MsgspecError as exc:
            malformed = f"malformed request: {exc}"
        invocation_id = identify(msg.headers, msg.data, msg.metadata.sequence.stream)
        if not is_valid_token(invocation_id):
            reason = f"invocation id {invocation_id!r} must be 1-64 characters of [A-Za-z0-9_-]"
            await self._dead(msg, function, ErrorCode.BAD_REQUEST, reason)
            # No record can have this id to say it was counted: it is counted once
            # let go (before, a dead letter that failed and was tried again counted
            # it twice).
            await self.settled(
                function,
                msg.headers,
                error_reply("", ErrorCode.BAD_REQUEST, reason),
                self._since_queued(msg),
            )
            return
        if request is None:
            stored = await self._finish_stored(
                invocation_id, error_reply(invocation_id, ErrorCode.BAD_REQUEST, malformed)
            )
            await self._count(msg, function, invocation_id, msg.headers, stored)
            # Its result is this error: the callback (a header's; the body's is lost
            # with the body) is told it as of any other, or its caller waits for good.
            await self._tell((msg.headers or {}).get(H_CALLBACK, ""), stored)
            await self._dead(msg, function, ErrorCode.BAD_REQUEST, malformed)
            return
        headers = dict(msg.headers or {})
        headers[H_INVOCATION] = invocation_id
        callback = headers.get(H_CALLBACK) or request.callback
        result = await self._attempt(msg, function, invocation_id, headers)
        if result is None:
            return  # retried later, or owned by another delivery
        await self._count(msg, function, invocation_id, headers, result)
        await self._tell(callback, result)
        self.completed += 1
        await msg.ack()

    async def _count(
        self,
        msg: Msg,
        function: str,
        invocation_id: str,
        headers: Mapping[str, str] | None,
        result: InvokeReply,
    ) -> None:
        """Its final outcome, told `settled` by the first delivery to get here (a
        redelivery of work done, or a second delivery waiting on the same run, is
        not counted again; one whose first delivery died before it counted is)."""
        if await self.results.first_to_count(invocation_id):
            await self.settled(function, headers, result, self._since_queued(msg))

    @staticmethod
    def _since_queued(msg: Msg) -> float:
        """End to end: from its publish (the stream's time of the message) to now."""
        return max(time.time() - msg.metadata.timestamp.timestamp(), 0.0)

    async def _tell(self, callback: str, result: InvokeReply) -> None:
        """Publish a stored result to the caller's `callback`, if it named one."""
        if not callback:
            return
        try:
            await send_reply(self.nc, callback, result, max_payload=self.max_payload)
        except Exception as exc:  # the result is stored; a bad callback must not block ack
            log.warning("async.callback_failed", callback=callback, error=repr(exc))

    async def _attempt(
        self, msg: Msg, function: str, invocation_id: str, headers: dict[str, str]
    ) -> InvokeReply | None:
        """The stored result once there is one; None when this delivery is done with
        (nak'ed for a retry, or superseded by another)."""
        attempt = msg.metadata.num_delivered or 1
        # A worker claimed this delivery's own attempt (its call came back first).
        ours = False
        while True:
            got = await self.results.get(invocation_id)
            if got is None:
                revision = await self.results.create(
                    invocation_id, AsyncRecord(state=AsyncState.PENDING, attempt=attempt)
                )
                if revision is None:
                    continue  # another delivery wrote it first: look again
            else:
                record, revision = got
                if record.state is AsyncState.DONE and record.reply is not None:
                    self.answered_from_record += 1
                    return record.reply  # a redelivery of work already done
                if record.state is AsyncState.RUNNING and not await self._worker_gone(
                    invocation_id, record.worker, revision
                ):
                    continue  # its worker finished or someone moved it on: look again
                if record.state is AsyncState.RUNNING and ours:
                    # Our own attempt died with its worker: a failed attempt like any
                    # other, counted and retried after a backoff. Run again at once
                    # and uncounted, one that takes its worker down each time (a
                    # poison input) ran forever and was never dead-lettered.
                    outcome = await self._lost(msg, invocation_id, attempt, record, revision)
                    if outcome != "again":
                        return outcome
                    continue
                taken = await self.results.swap(
                    invocation_id,
                    AsyncRecord(
                        state=AsyncState.PENDING, attempt=attempt, last_error=record.last_error
                    ),
                    revision,
                )
                if taken is None:
                    continue
                revision = taken
            passed = deadline_passed(headers)
            if passed:
                # Final at once: stored, told and counted as any result (no dead
                # letter: nothing is wrong with the message, it is too late).
                return await self._finish_stored(
                    invocation_id, expired(invocation_id, passed, attempt)
                )
            reply = await self.call(function, msg.data, headers, claim=revision)
            if reply.invocation_id != invocation_id:
                # One refused before it had an id (admission: a function not deployed,
                # bad inputs) says none: stored and told so, its callback could not
                # tell whose result it heard, nor a lookup whose it answered.
                reply = msgspec.structs.replace(reply, invocation_id=invocation_id)
            if reply.error is not None and reply.error.code is ErrorCode.SUPERSEDED:
                return None  # the delivery that superseded us answers
            if is_final(reply):
                return await self._finish_stored(invocation_id, reply)
            outcome = await self._failed(msg, invocation_id, attempt, reply)
            if outcome != "again":
                return outcome
            ours = True

    async def _lost(
        self, msg: Msg, invocation_id: str, attempt: int, record: AsyncRecord, revision: int
    ) -> InvokeReply | Literal["again"] | None:
        """This delivery's attempt is lost with its worker (`record`, RUNNING at
        `revision`): failed as `_failed` fails it, so it counts as an attempt;
        "again" when the record moved on meanwhile."""
        lost = error_reply(
            invocation_id,
            ErrorCode.WORKER_LOST,
            f"worker {record.worker} was lost while it ran the invocation",
        )
        assert lost.error is not None
        waiting = AsyncRecord(state=AsyncState.PENDING, attempt=attempt, last_error=lost.error)
        if await self.results.swap(invocation_id, waiting, revision) is None:
            return "again"
        return await self._failed(msg, invocation_id, attempt, lost)

    async def _failed(
        self, msg: Msg, invocation_id: str, attempt: int, reply: InvokeReply
    ) -> InvokeReply | Literal["again"] | None:
        """A platform fault: the result if a worker finished meanwhile, "again" when a
        worker still runs it, None once the message is nak'ed for a later try."""
        assert reply.error is not None
        got = await self.results.get(invocation_id)
        if got is not None:
            record, revision = got
            if record.state is AsyncState.DONE and record.reply is not None:
                return record.reply
            if record.state is AsyncState.RUNNING:
                # A worker claimed it: whatever we were told (the scheduler went away
                # after placing it, or lost sight of the worker in an outage of the
                # bus), the worker's own heartbeats say whether it still runs it.
                return "again"
        else:
            revision = 0
        passed = deadline_passed(msg.headers)
        if passed:  # no later attempt can make it: final now, not after a backoff
            last = f"{reply.error.code}: {reply.error.reason}"
            return await self._finish_stored(
                invocation_id, expired(invocation_id, passed, attempt, last)
            )
        if attempt >= self.settings.async_max_attempts:
            final = error_reply(
                invocation_id,
                reply.error.code,
                f"gave up after {attempt} attempts; the last: {reply.error.reason}",
            )
            await self._dead(
                msg,
                subjects.last_token(msg.subject),
                reply.error.code,
                final.error.reason if final.error else "",
                settle=False,
            )
            return await self._finish_stored(invocation_id, final)
        waiting = AsyncRecord(state=AsyncState.PENDING, attempt=attempt, last_error=reply.error)
        if revision:
            await self.results.swap(invocation_id, waiting, revision)
        else:
            await self.results.create(invocation_id, waiting)
        log.info("async.retry", invocation_id=invocation_id, attempt=attempt, code=reply.error.code)
        self.retried += 1
        await self._nak(msg, attempt)
        return None

    async def _finish_stored(self, invocation_id: str, reply: InvokeReply) -> InvokeReply:
        """The result as stored: the worker may have stored it already (then that one
        stands), else it is stored now."""
        while True:
            got = await self.results.get(invocation_id)
            if got is None:
                if await self.results.create(invocation_id, self.results.done(reply)):
                    return reply
                continue
            record, revision = got
            if record.state is AsyncState.DONE and record.reply is not None:
                return record.reply
            if await self.results.swap(invocation_id, self.results.done(reply), revision):
                return reply

    async def _while_running(self, invocation_id: str) -> None:
        """Wait while a live worker runs the invocation (its record RUNNING), as a
        delivery waits on one (`_worker_gone`): back once it is not RUNNING, or its
        worker is gone."""
        while True:
            got = await self.results.get(invocation_id)
            if got is None or got[0].state is not AsyncState.RUNNING:
                return
            record, revision = got
            if await self._worker_gone(invocation_id, record.worker, revision):
                return

    async def _worker_gone(self, invocation_id: str, worker: str, revision: int) -> bool:
        """Wait while `worker` runs this invocation: False once the record moved on,
        True if the worker stops heartbeating while the bus is up, or says in a
        heartbeat that it does not hold it (its attempt is then lost)."""
        heard = time.monotonic()
        dropped = False

        async def on_beat(msg: Msg) -> None:
            nonlocal heard, dropped
            beat = decode_event(msg, WorkerHeartbeat)
            if beat is not None:
                heard = time.monotonic()
                dropped = invocation_id not in beat.claimed

        try:
            sub = await self.nc.subscribe(subjects.heartbeat(worker), cb=on_beat)
        except ValueError:
            return True  # no such worker could ever beat
        try:
            while True:
                got = await self.results.get(invocation_id)
                if got is None or got[1] != revision:
                    return False
                silent = self.health.silence(heard, time.monotonic())
                if dropped or silent > self.settings.worker_timeout_s:
                    return True
                await anyio.sleep(POLL_S)
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()

    async def _dead(
        self, msg: Msg, function: str, code: ErrorCode, reason: str, *, settle: bool = True
    ) -> None:
        """Keep a message that can never succeed, with the reason, and (`settle`) let
        it go."""
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
        headers[H_DEAD_CODE] = str(code)
        headers[H_DEAD_REASON] = reason[:1024]
        data = msg.data
        # A message near max_payload does not fit with the reason: past it, the
        # server closed ingress's connection, and the message, redelivered, did so
        # again on every delivery. Kept without its body, which the reason says.
        if len(data) + header_bytes(headers) > self.nc.max_payload:
            dropped = f"[its body of {len(data)} bytes is dropped: too large to keep] "
            headers[H_DEAD_REASON] = (dropped + reason)[:1024]
            data = b""
        log.warning("async.dead_letter", subject=msg.subject, code=code, reason=reason)
        await self.nc.jetstream().publish(subjects.dead_letter(function), data, headers=headers)
        self.dead += 1
        if settle:
            await msg.term()

    def details(self) -> dict[str, object]:
        return {
            "completed": self.completed,
            "retried": self.retried,
            "dead_lettered": self.dead,
            "answered_from_record": self.answered_from_record,
        }

    # -- results ------------------------------------------------------------------------

    async def result(self, invocation_id: str, *, tenant: str | None = None) -> InvokeReply:
        """What `result.<id>` answers; `tenant`: the lookup is that tenant's (its
        subject), which may see only its own invocations."""
        if not is_valid_token(invocation_id):
            return error_reply(
                invocation_id, ErrorCode.BAD_REQUEST, f"{invocation_id!r} is not an invocation id"
            )
        if tenant is not None and not auth.owns_invocation(tenant, invocation_id):
            # Another tenant's or the service account's: said as of an id never used,
            # without looking, so nothing (not even that it exists) is told.
            return not_found(invocation_id)
        got = await self.results.get(invocation_id)
        if got is None:
            if await self._queued(invocation_id):
                return error_reply(invocation_id, ErrorCode.PENDING, "queued, not started yet")
            # It may have been taken and recorded while we looked.
            got = await self.results.get(invocation_id)
        if got is None:
            return not_found(invocation_id)
        return answer(invocation_id, got[0])

    async def _queued(self, invocation_id: str) -> bool:
        return await self.queued.holds(self.nc.jetstream(), invocation_id)


class QueuedIndex:
    """Which ids are in the stream, published but not yet taken: for a lookup that
    found no record (a caller asks right after its publish, before any ingress took
    it).

    Each lookup read the newest QUEUED_SCAN messages again, one JetStream request
    each: a caller looping over ids it never used made ingress send 257 requests a
    lookup, and work queued deeper than that was answered not_found. Each message
    is now read once, newest first, into an index of its id that later lookups
    answer from: a lookup costs one stream_info, plus a read of each message
    published since the last (at most `budget` of them; more on the next), plus one
    to confirm an id the index holds from an earlier lookup is still queued. Messages
    below the stream's first are dropped from it; past `limit` ids, the oldest."""

    def __init__(self, *, budget: int = QUEUED_SCAN, limit: int = QUEUED_INDEX_MAX) -> None:
        self.budget = budget
        self.limit = limit
        self.lock = anyio.Lock()
        self._reset()

    def _reset(self) -> None:
        self.seq_of: dict[str, int] = {}
        self.id_at: dict[int, str] = {}
        self.order: list[int] = []  # a heap of the indexed sequences
        self.high = 0  # every message up to it is indexed or in `gaps`
        self.gaps: list[list[int]] = []  # [lo, hi] not yet read, ascending

    async def holds(self, js: JetStreamContext, invocation_id: str) -> bool:
        async with self.lock:
            state = (await js.stream_info(jetstream.INVOCATIONS_STREAM)).state
            self._advance(state.first_seq, state.last_seq)
            seq = self.seq_of.get(invocation_id)
            if seq is not None:
                if await self._still_there(js, seq):
                    return True
                self._forget(seq)
            return await self._scan(js, invocation_id)

    def _advance(self, first: int, last: int) -> None:
        if last < self.high:  # the stream was made anew: nothing indexed holds
            self._reset()
        if last > self.high:
            low = max(self.high + 1, first)
            if low <= last:
                self.gaps.append([low, last])
            self.high = last
        self.gaps = [[max(lo, first), hi] for lo, hi in self.gaps if hi >= first]
        while self.order and self.order[0] < first:
            self._forget(heapq.heappop(self.order))

    async def _scan(self, js: JetStreamContext, invocation_id: str) -> bool:
        left = self.budget
        while self.gaps and left > 0:
            gap = self.gaps[-1]
            seq = gap[1]
            left -= 1
            try:
                raw = await js.get_msg(jetstream.INVOCATIONS_STREAM, seq)
            except NotFoundError:
                raw = None  # taken and acknowledged already
            gap[1] -= 1
            if gap[1] < gap[0]:
                self.gaps.pop()
            if raw is None:
                continue
            found = identify(raw.headers, raw.data or b"", seq)
            self._add(seq, found)
            if found == invocation_id:
                return True
        return False

    @staticmethod
    async def _still_there(js: JetStreamContext, seq: int) -> bool:
        try:
            await js.get_msg(jetstream.INVOCATIONS_STREAM, seq)
        except NotFoundError:
            return False
        return True

    def _add(self, seq: int, invocation_id: str) -> None:
        self.id_at[seq] = invocation_id
        if seq > self.seq_of.get(invocation_id, 0):
            self.seq_of[invocation_id] = seq
        heapq.heappush(self.order, seq)
        while len(self.id_at) > self.limit and self.order:
            self._forget(heapq.heappop(self.order))

    def _forget(self, seq: int) -> None:
        invocation_id = self.id_at.pop(seq, None)
        if invocation_id is not None and self.seq_of.get(invocation_id) == seq:
            del self.seq_of[invocation_id]

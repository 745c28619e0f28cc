"""Where an admitted invocation goes, decided in one place: straight to a worker
under one of the scheduler's grants, else to the scheduler while one is heard (or,
during a handover, once the next one is: liveness.py), else nowhere (`unavailable`
at once).

The dispatcher owns the books that decision reads: the grants (direct.py), the
schedulers' liveness and what was forwarded to them (liveness.py), and whether the
bus itself is up (shared.bus.BusHealth). Its event handlers take decoded events and
publish through a `Bus`; nothing here imports nats.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import anyio
import msgspec

from services.ingress.direct import DirectRoutes
from services.ingress.liveness import Forwarded, SchedulerWatch
from shared import subjects, tracing
from shared.bus import Bus, BusHealth, NoResponders
from shared.config import Settings
from shared.errors import GfaasError
from shared.logs import get_logger
from shared.schema import (
    H_AFFINITY,
    H_DIRECT,
    Done,
    ErrorCode,
    Grant,
    InvocationMeta,
    InvokeReply,
    SchedulerBeat,
    WorkerLost,
    decode,
    encode,
    error_reply,
)

log = get_logger("ingress.dispatch")

NO_SCHEDULER = "no scheduler is running (or none has been heard from lately)"
# The longest a direct send without a deadline is waited for.
DIRECT_LIMIT_S = 300.0


def lost_by(scheduler: str) -> str:
    return (
        f"scheduler {scheduler or '(none)'} stopped answering while it held this "
        "invocation; it may not have run"
    )


def deadline_of(meta: InvocationMeta) -> float:
    """The invocation's deadline on the monotonic clock the books keep."""
    return time.monotonic() + min(meta.remaining_s(), DIRECT_LIMIT_S)


class Dispatcher:
    def __init__(self, bus: Bus, holder: str, settings: Settings) -> None:
        self.bus = bus
        self.holder = holder
        # Worker slots the scheduler lent us: invocations sent straight to workers.
        self.direct = DirectRoutes()
        # Is an active scheduler there, and what was forwarded to it.
        self.watch = SchedulerWatch(
            timeout_s=settings.scheduler_timeout_s, started_at=time.monotonic()
        )
        # Our own echo, heard back: is the bus up? A silence we all shared is
        # nobody's death.
        self.health = BusHealth(settings.heartbeat_s, on_back=self.watch.bus_back)
        self.unavailable = 0
        # Set (and replaced) on each scheduler beat: what a handover waits on.
        self._beat_heard = anyio.Event()

    # -- the one decision -----------------------------------------------------------------

    async def _route(
        self,
        meta: InvocationMeta,
        *,
        reply: str = "",
        near: str = "",
        on_lost: Callable[[], None] | None = None,
        grace_s: float = 0.0,
    ) -> tuple[str | None, str]:
        """The worker to send straight to, or None for the scheduler (recorded as
        forwarded to it, under the key returned with it: "" for a direct send);
        raises `unavailable` when neither is there. What is sent is kept in the books
        while its reply is waited for: until the deadline, and `grace_s` more."""
        now = time.monotonic()
        deadline = deadline_of(meta) + grace_s
        worker = self.direct.take(
            meta.function,
            meta.invocation_id,
            now,
            deadline,
            near=near,
            reply=reply,
            on_lost=on_lost,
        )
        if worker is not None:
            return worker, ""
        now = await self._await_leader(meta, now)
        if not self.watch.available(now):
            self.unavailable += 1
            raise GfaasError(ErrorCode.UNAVAILABLE, NO_SCHEDULER)
        forwarded = Forwarded(
            scheduler=self.watch.leader(now) or "", deadline=deadline, reply=reply, on_lost=on_lost
        )
        return None, self.watch.sent(meta.invocation_id, forwarded)

    async def _await_leader(self, meta: InvocationMeta, now: float) -> float:
        """While there is no leader but one may be any moment, wait for its beat, at
        most until the handover's grace or the invocation's deadline runs out (each
        beat may end the grace: the would-be successor says it is stopping). Returns
        the time after the wait (`now` when there was none)."""
        while self.watch.leader(now) is None and self.watch.available(now):
            wait = min(self.watch.grace_until(now) - now, meta.remaining_s())
            if wait <= 0:
                break
            with anyio.move_on_after(wait):
                await self._beat_heard.wait()
            now = time.monotonic()
        return now

    def _headers(
        self, meta: InvocationMeta, worker: str | None, extra: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """Routing headers (the origin, which a grant may go to, rides in `meta`); a
        direct send says so, so that the worker's Done comes back here."""
        headers = meta.to_headers()
        if worker is not None:
            headers[H_DIRECT] = self.holder
        if extra:
            headers.update(extra)
        return tracing.inject(headers)

    async def send(self, meta: InvocationMeta, body: bytes, reply: str) -> str | None:
        """Forward a caller's invocation; whoever runs it answers `reply` directly.
        Returns the worker it went straight to, if any; raises `unavailable`."""
        worker, _ = await self._route(meta, reply=reply)
        subject = subjects.worker_run(worker) if worker is not None else subjects.SCHEDULE
        await self.bus.publish(subject, body, reply=reply, headers=self._headers(meta, worker))
        return worker

    async def call(
        self,
        meta: InvocationMeta,
        body: bytes,
        extra: Mapping[str, str] | None = None,
        *,
        grace_s: float = 0.0,
    ) -> InvokeReply:
        """Send an invocation and wait for its reply (HTTP, async and workflow stages),
        until its deadline and `grace_s` more."""
        with anyio.CancelScope() as lost:
            try:
                near = (extra or {}).get(H_AFFINITY, "")
                worker, forwarded = await self._route(
                    meta, near=near, on_lost=lost.cancel, grace_s=grace_s
                )
            except GfaasError as exc:
                return error_reply(meta.invocation_id, exc.code, exc.reason)
            # After the route: a handover may have been waited out.
            timeout = max(meta.remaining_s(), 0.001) + grace_s
            scheduler = self.watch.leader(time.monotonic()) or ""
            headers = self._headers(meta, worker, extra)
            subject = subjects.worker_run(worker) if worker is not None else subjects.SCHEDULE
            try:
                data = await self.bus.request(subject, body, timeout=timeout, headers=headers)
            except NoResponders:
                if worker is not None:
                    # It never reached the worker (gone or draining): the scheduler
                    # places it instead.
                    await self._give_back(self.direct.finish(meta.invocation_id))
                    await self._give_back(self.direct.retire(worker))
                    return await self.call(meta, body, extra, grace_s=grace_s)
                if scheduler and meta.remaining_s() > 0:
                    # The one we heard as active has stopped listening: it is handing
                    # over. Wait for the next (bounded: it is not taken as the leader
                    # until it beats as active again, and the grace runs out).
                    self.watch.no_responders(scheduler, time.monotonic())
                    return await self.call(meta, body, extra, grace_s=grace_s)
                return error_reply(meta.invocation_id, ErrorCode.UNAVAILABLE, NO_SCHEDULER)
            except TimeoutError:
                return error_reply(
                    meta.invocation_id,
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"no reply within {timeout:.3f}s",
                )
            finally:
                if worker is None:
                    self.watch.end(forwarded)
        if lost.cancelled_caught:
            if worker is None:
                return error_reply(meta.invocation_id, ErrorCode.UNAVAILABLE, lost_by(scheduler))
            return error_reply(
                meta.invocation_id,
                ErrorCode.WORKER_LOST,
                f"worker {worker} stopped answering while running this invocation",
            )
        try:
            reply = decode(data, InvokeReply)
        except msgspec.MsgspecError as exc:
            return error_reply(meta.invocation_id, ErrorCode.INTERNAL, f"bad reply: {exc}")
        if (
            worker is not None
            and reply.error is not None
            and (reply.error.code is ErrorCode.OVERLOADED)
        ):
            # The lent worker is full after all (its other callers got there first):
            # stop sending there and let the scheduler place this one.
            await self._give_back(self.direct.retire(worker))
            return await self.call(meta, body, extra, grace_s=grace_s)
        return reply

    # -- events (decoded by the wiring) ------------------------------------------------------

    async def on_grant(self, grant: Grant) -> None:
        await self._give_back(self.direct.on_grant(grant, time.monotonic()))

    async def on_done(self, done: Done, outcome: str = "") -> None:
        """A worker finished something we sent it directly (`outcome`: its Done's
        Gfaas-Outcome, "ok" or the caller's error code)."""
        await self._give_back(self.direct.finish(done.invocation_id, done.reply))
        if outcome == ErrorCode.OVERLOADED:
            # The lent worker turned it away, full after all (what ran there past its
            # deadline, counted free here, still runs): stop sending there. A send for
            # a caller's reply subject was answered `overloaded` by the worker itself,
            # and the next ones would be too (a call of ours is placed again: `call`).
            await self._give_back(self.direct.retire(done.worker_id))

    async def on_scheduled_done(self, done: Done, outcome: str = "") -> None:
        """A worker finished something the scheduler placed for us."""
        self.watch.done(done.invocation_id, done.reply)

    async def on_worker_lost(self, lost: WorkerLost) -> None:
        for iid, sent in self.direct.lost(lost.worker_id):
            await self._give_up(
                iid,
                sent.on_lost,
                sent.reply,
                ErrorCode.WORKER_LOST,
                f"{lost.reason} while running this invocation",
            )

    async def on_scheduler_beat(self, beat: SchedulerBeat) -> None:
        changed = self.watch.beat(beat, time.monotonic())
        heard, self._beat_heard = self._beat_heard, anyio.Event()
        heard.set()
        if changed and self.direct.routes:
            # A new active scheduler knows nothing of what the last one lent: those
            # grants are void (their slots are in the workers' heartbeats anyway).
            dropped = self.direct.surrender()
            log.info(
                "grants.dropped_for_new_scheduler", scheduler=beat.scheduler_id, grants=len(dropped)
            )

    async def tick(self) -> None:
        """Lapsed grants go back; callers of a scheduler that fell silent are told."""
        now = time.monotonic()
        await self._give_back(self.direct.tick(now))
        if self.health.healthy(now):
            for iid, sent in self.watch.tick(now):
                self.unavailable += 1
                await self._give_up(
                    iid, sent.on_lost, sent.reply, ErrorCode.UNAVAILABLE, lost_by(sent.scheduler)
                )

    async def return_grants(self) -> None:
        """At shutdown: nothing more is sent directly, so every grant goes back."""
        await self._give_back(self.direct.surrender())

    async def _give_back(self, grants: list[Grant]) -> None:
        for grant in grants:
            await self.bus.publish(subjects.GRANT_RETURN, encode(grant))

    async def _give_up(
        self,
        invocation_id: str,
        on_lost: Callable[[], None] | None,
        reply: str,
        code: ErrorCode,
        reason: str,
    ) -> None:
        """What we sent will not be answered: end our own wait for it (`on_lost`), or
        answer its caller."""
        if on_lost is not None:
            on_lost()
        elif reply:
            await self.bus.reply_error(reply, invocation_id, code, reason)

    def details(self) -> dict[str, object]:
        return {
            "direct": {
                "sent": self.direct.direct,
                "renewals": self.direct.renewals,
                "in_flight": len(self.direct.sent),
                "grants": {
                    r.grant.function: {"worker": r.grant.worker_id, "slots": r.grant.slots}
                    for r in self.direct.routes.values()
                    if r.usable
                },
            },
            "scheduler": self.watch.leader(time.monotonic()),
            "unavailable": self.unavailable,
            "forwarded": len(self.watch.forwarded),
        }

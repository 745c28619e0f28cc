"""Is a scheduler there to forward to, and who answers for what was forwarded if not.

Pure books on an injected clock. Schedulers beat on `gfaas.v1.scheduler_alive`
(shared.schema.SchedulerBeat), the active one saying so. Ingress forwards to
`gfaas.v1.schedule` while it hears an active scheduler. Leadership changes hands
(a lease that lapsed while a loaded scheduler's loop stalled and is retaken, a
standby taking over a dead one's lease) without any being heard for up to one
timeout: for that long after the last leader stepped down or fell silent, while a
possible successor is heard, an invocation waits for the next leader instead of
failing; past it, or with no successor (the last scheduler stopped), the caller is
told `unavailable` at once rather than waiting out its own deadline. What ingress
forwarded is kept until the worker's Done comes back (`done.scheduler.<ingress>`) or its
deadline passes; when the scheduler it went to falls silent, those callers are
answered `unavailable` too: a killed scheduler loses the invocations it held.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from services.ingress.by_invocation import ByInvocation
from shared.schema import SchedulerBeat


@dataclass
class Forwarded:
    scheduler: str  # the active one when it was sent ("" if none was known yet)
    deadline: float
    reply: str = ""
    # For request-reply calls made by ingress itself: ends the wait.
    on_lost: Callable[[], None] | None = None
    invocation_id: str = ""  # set by `SchedulerWatch.sent`


@dataclass
class SchedulerWatch:
    timeout_s: float
    started_at: float
    # Scheduler id -> when it last said it is active.
    active: dict[str, float] = field(default_factory=dict)
    # What was forwarded through the scheduler, oldest first, by invocation id made
    # its own (`id#n`) while another forwarded under the id is kept: callers may
    # reuse an id, and each of them is answered if its scheduler falls silent.
    forwarded: ByInvocation[Forwarded] = field(default_factory=ByInvocation)

    # The last active scheduler heard, kept when it falls silent.
    last_leader: str = ""
    # Scheduler id -> when it last said it could lead (a standby, or a leader that
    # lost its lease and tries to retake it): a possible successor.
    standby: dict[str, float] = field(default_factory=dict)
    # Scheduler id -> when a request to it found nobody listening: not the leader
    # until it beats as active again, but still in `active`, so that if it is dead
    # its silence is noticed and what was forwarded to it answered.
    deaf: dict[str, float] = field(default_factory=dict)
    # When an active beat was last heard, and when an active scheduler last stepped
    # down (None: never).
    heard_at: float | None = None
    stepped_down_at: float | None = None

    def beat(self, beat: SchedulerBeat, now: float) -> bool:
        """Record a beat; True when an active scheduler other than the last one speaks
        (a new leader: grants lent by the old one are void)."""
        sid = beat.scheduler_id
        if not beat.active:
            if self.active.pop(sid, None) is not None:
                self.stepped_down_at = now
            self.deaf.pop(sid, None)
            if beat.stopping:
                self.standby.pop(sid, None)
            else:
                self.standby[sid] = now
            return False
        self.standby.pop(sid, None)
        self.active[sid] = now
        self.heard_at = now
        changed = bool(self.last_leader) and sid != self.last_leader
        self.last_leader = sid
        return changed

    def leader(self, now: float) -> str | None:
        """The active scheduler heard most recently within the timeout, if any."""
        live = [
            (t, s)
            for s, t in self.active.items()
            if now - t <= self.timeout_s and t > self.deaf.get(s, -1.0)
        ]
        return max(live)[1] if live else None

    def grace_until(self, now: float) -> float:
        """Until when having no leader is taken for a handover under way rather than
        for no scheduler: one timeout after ingress started (none heard yet), and,
        while a possible successor is heard, one timeout after the last leader stepped
        down or fell silent (the lease's TTL is within the timeout, so a successor
        that has not led by then is not about to)."""
        until = self.started_at + self.timeout_s
        successor = any(now - t <= self.timeout_s for t in self.standby.values())
        if successor and self.heard_at is not None:
            lapsed = self.heard_at + self.timeout_s
            if self.stepped_down_at is not None and self.stepped_down_at >= self.heard_at:
                lapsed = min(lapsed, self.stepped_down_at)
            until = max(until, lapsed + self.timeout_s)
        return until

    def available(self, now: float) -> bool:
        """A leader is there, or one may be any moment (see grace_until)."""
        return self.leader(now) is not None or now <= self.grace_until(now)

    def no_responders(self, scheduler: str, now: float) -> None:
        """Nobody listens on the schedule subject although `scheduler` beat as active:
        it stops listening before it says it stepped down, and may retake the lease
        (if it is stopping, its next beat says so)."""
        if scheduler in self.active:
            self.deaf[scheduler] = now
            self.stepped_down_at = now
        self.standby[scheduler] = now

    def bus_back(self, at: float) -> None:
        """The bus is back after a silence: nobody's silence during it counts."""
        self.active = {s: max(t, at) for s, t in self.active.items()}
        self.standby = {s: max(t, at) for s, t in self.standby.items()}
        if self.heard_at is not None:
            self.heard_at = max(self.heard_at, at)

    def sent(self, invocation_id: str, record: Forwarded) -> str:
        """Record what was forwarded; returns its key (for `end`)."""
        record.invocation_id = invocation_id
        return self.forwarded.add(record)

    def done(self, invocation_id: str, reply: str) -> Forwarded | None:
        """A worker's Done for something forwarded: the record sent with that reply
        subject (Done.reply) ends, never another caller's under the id. Ingress's own
        requests wait on an inbox not known here (reply ""): each ends its record by
        its key (`end`) once its wait is over."""
        return self.forwarded.done(invocation_id, reply)

    def end(self, key: str) -> Forwarded | None:
        """What was recorded under `key` (`sent`), removed, if it still is."""
        return self.forwarded.pop(key)

    def tick(self, now: float) -> list[tuple[str, Forwarded]]:
        """Forget what has outlived its deadline (its caller was answered, or has given
        up); return what went to a scheduler that has since fallen silent."""
        # Oldest first, and deadlines mostly follow: stop at the first one still due.
        expired = []
        for key, f in self.forwarded.items():
            if f.deadline > now:
                break
            expired.append(key)
        for key in expired:
            self.forwarded.pop(key)
        silent = {s for s, t in self.active.items() if now - t > self.timeout_s}
        for s in silent:
            del self.active[s]
            self.deaf.pop(s, None)
        self.standby = {s: t for s, t in self.standby.items() if now - t <= self.timeout_s}
        if not silent and self.leader(now) is not None:
            return []
        # Sent to a silent scheduler, or sent before any was heard and still no one is.
        lost = [
            key
            for key, f in self.forwarded.items()
            if f.scheduler in silent
            or (not f.scheduler and self.leader(now) is None and not self.available(now))
        ]
        gone = (self.forwarded.pop(key) for key in lost)
        return [(f.invocation_id, f) for f in gone if f is not None]

"""Is a scheduler there to forward to, and who answers for what was forwarded if not.

Pure books on an injected clock. Schedulers beat on `gfaas.v1.scheduler_alive`
(shared.schema.SchedulerBeat), the active one saying so. Ingress forwards to
`gfaas.v1.schedule` only while it hears an active scheduler; otherwise the caller is
told `unavailable` at once instead of waiting out its timeout. What ingress forwarded
is kept until the worker's Done comes back (`done.scheduler.<ingress>`) or its
deadline passes; when the scheduler it went to falls silent, those callers are
answered `unavailable` too: a killed scheduler loses the invocations it held.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from shared.schema import SchedulerBeat


@dataclass
class Forwarded:
    scheduler: str  # the active one when it was sent ("" if none was known yet)
    deadline: float
    reply: str = ""
    # For request-reply calls made by ingress itself: ends the wait.
    on_lost: Callable[[], None] | None = None


@dataclass
class SchedulerWatch:
    timeout_s: float
    started_at: float
    # Scheduler id -> when it last said it is active.
    active: dict[str, float] = field(default_factory=dict)
    # Invocation id -> what was forwarded through the scheduler, oldest first.
    forwarded: dict[str, Forwarded] = field(default_factory=dict)

    # The last active scheduler heard, kept when it falls silent.
    last_leader: str = ""

    def beat(self, beat: SchedulerBeat, now: float) -> bool:
        """Record a beat; True when an active scheduler other than the last one speaks
        (a new leader: grants lent by the old one are void)."""
        if not beat.active:
            self.active.pop(beat.scheduler_id, None)
            return False
        self.active[beat.scheduler_id] = now
        changed = bool(self.last_leader) and beat.scheduler_id != self.last_leader
        self.last_leader = beat.scheduler_id
        return changed

    def leader(self, now: float) -> str | None:
        """The active scheduler heard most recently within the timeout, if any."""
        live = [(t, s) for s, t in self.active.items() if now - t <= self.timeout_s]
        return max(live)[1] if live else None

    def available(self, now: float) -> bool:
        # Just started: give the schedulers one timeout to be heard before saying no.
        return self.leader(now) is not None or now - self.started_at <= self.timeout_s

    def bus_back(self, at: float) -> None:
        """The bus is back after a silence: nobody's silence during it counts."""
        self.active = {s: max(t, at) for s, t in self.active.items()}

    def sent(self, invocation_id: str, record: Forwarded) -> None:
        self.forwarded[invocation_id] = record

    def done(self, invocation_id: str) -> Forwarded | None:
        return self.forwarded.pop(invocation_id, None)

    def tick(self, now: float) -> list[tuple[str, Forwarded]]:
        """Forget what has outlived its deadline (its caller was answered, or has given
        up); return what went to a scheduler that has since fallen silent."""
        # Oldest first, and deadlines mostly follow: stop at the first one still due.
        expired = []
        for iid, f in self.forwarded.items():
            if f.deadline > now:
                break
            expired.append(iid)
        for iid in expired:
            del self.forwarded[iid]
        silent = {s for s, t in self.active.items() if now - t > self.timeout_s}
        for s in silent:
            del self.active[s]
        if not silent and self.leader(now) is not None:
            return []
        # Sent to a silent scheduler, or sent before any was heard and still no one is.
        lost = [
            (iid, f)
            for iid, f in self.forwarded.items()
            if f.scheduler in silent
            or (not f.scheduler and self.leader(now) is None and not self.available(now))
        ]
        for iid, _ in lost:
            del self.forwarded[iid]
        return lost

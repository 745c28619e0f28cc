"""Direct sends: ingress's side of the scheduler's grants (shared.scheduling.grants).

While ingress holds a grant for a function, it sends that function's invocations
straight to the granted worker, at most `slots` at a time, and the worker's Done
comes back here to free the slot. The books below are pure: the app feeds them
grants, Done notes, lost workers and the clock, and acts on what they return.

A grant is used until shortly before it lapses. Half-way through its life one
invocation goes through the scheduler instead, which renews the grant if nothing
waits there. A grant that lapsed or was revoked is given back once nothing sent
under it is still running, so the scheduler never counts a slot free too early.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.schema import Grant

# Stop sending under a grant this long before it lapses: what is on its way must
# reach the worker while the scheduler still holds the slots.
STOP_BEFORE_S = 0.25
# Grant ids given back, remembered so a renewal already on its way is ignored.
RETURNED_MEMORY = 256
# Sends forgotten at their deadline, remembered (at most this many, for at most this
# long) so that the late Done of one that overran is told from a later send's.
OVERDUE_MEMORY = 256
OVERDUE_MEMORY_S = 300.0


@dataclass
class Route:
    grant: Grant
    expires_at: float
    renew_at: float
    in_use: int = 0
    renewing: bool = False
    usable: bool = True  # False once revoked or lapsed: waiting to be given back

    def open_at(self, now: float) -> bool:
        return (
            self.usable and now < self.expires_at - STOP_BEFORE_S and self.in_use < self.grant.slots
        )


@dataclass
class Sent:
    """An invocation sent directly: what to free when it ends, whom to answer if
    its worker is lost (a reply subject, or a callback for ingress's own requests)."""

    invocation_id: str
    grant_id: str
    worker_id: str
    deadline: float
    reply: str = ""
    on_lost: Callable[[], None] | None = None


@dataclass
class DirectRoutes:
    routes: dict[str, Route] = field(default_factory=dict)  # by grant id
    by_function: dict[str, str] = field(default_factory=dict)  # function -> grant id
    # By invocation id, made its own (`id#n`) while another sent under the id runs:
    # callers may reuse an id, and a Done note names its send by id and reply subject.
    sent: dict[str, Sent] = field(default_factory=dict)
    # Sends past their deadline, keyed as in `sent`, oldest first: their slots are
    # counted free and their callers answered, but their worker may still run them
    # (a handler's thread cannot be stopped) and send its Done late, which then
    # ends nothing else.
    overdue: dict[str, Sent] = field(default_factory=dict)
    returned: deque[str] = field(default_factory=lambda: deque(maxlen=RETURNED_MEMORY))
    direct: int = 0
    renewals: int = 0
    # Numbers the keys of sends that share a caller's id; how many are in `sent`
    # and `overdue` under each id (most ids are one send's: look-ups take no scan).
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _under: dict[str, int] = field(default_factory=dict)

    def on_grant(self, grant: Grant, now: float) -> list[Grant]:
        """A grant, renewal or revocation from the scheduler; returns grants to give back."""
        if grant.grant_id in self.returned:
            return []
        route = self.routes.get(grant.grant_id)
        if grant.slots <= 0:
            if route is None:
                return []
            route.usable = False
            return self._settle(route)
        if route is None:
            route = self.routes[grant.grant_id] = Route(grant, 0.0, 0.0)
        route.grant = grant
        route.expires_at = now + grant.ttl_s
        route.renew_at = now + grant.ttl_s / 2
        route.renewing = False
        back: list[Grant] = []
        old = self.by_function.get(grant.function)
        if old is not None and old != grant.grant_id and old in self.routes:
            self.routes[old].usable = False
            back += self._settle(self.routes[old])
        self.by_function[grant.function] = grant.grant_id
        return back

    def take(
        self,
        function: str,
        invocation_id: str,
        now: float,
        deadline: float,
        *,
        near: str = "",
        reply: str = "",
        on_lost: Callable[[], None] | None = None,
    ) -> str | None:
        """The worker to send this invocation to directly, or None for the scheduler."""
        if self._ambiguous(invocation_id, reply):
            # The id is the caller's to choose (Gfaas-Invocation-Id; an async
            # redelivery reuses its id too), and a worker's Done names its send by the
            # id and the reply subject it came with. Ingress's own requests wait on an
            # inbox these books never see (reply ""): a second such send under an id
            # already in flight could not be told apart from the first when a Done
            # came back. Refusing the call would break callers that reuse an id on
            # purpose (a correlation id, a retry while the first attempt still runs),
            # so that repeat goes through the scheduler, whose own slots it uses.
            return None
        grant_id = self.by_function.get(function)
        route = self.routes.get(grant_id) if grant_id is not None else None
        if route is None or not route.open_at(now):
            return None
        if near and near != route.grant.worker_id:
            return None  # a workflow stage wants its inputs' worker: the scheduler weighs it
        if now >= route.renew_at and not route.renewing:
            route.renewing = True  # this one goes through the scheduler, which renews
            self.renewals += 1
            return None
        route.in_use += 1
        self.direct += 1
        key = invocation_id
        if key in self.sent or key in self.overdue:
            key = f"{invocation_id}#{next(self._seq)}"  # '#' is no id's character
        self.sent[key] = Sent(
            invocation_id, route.grant.grant_id, route.grant.worker_id, deadline, reply, on_lost
        )
        self._under[invocation_id] = self._under.get(invocation_id, 0) + 1
        return route.grant.worker_id

    def held(self, invocation_id: str, reply: str = "") -> str | None:
        """The key (in `sent` or `overdue`) of the send a note names by its id and
        reply subject: the one sent with that reply subject, else the one whose reply
        subject these books never knew (ingress's own request waits on an inbox of its
        own; `take` lets only one such under an id be recorded), else None. Never one
        with another reply subject of its own: that is another caller's send."""
        if invocation_id not in self._under:
            return None
        if self._under[invocation_id] == 1:
            # The id's only send, most often under the id itself: no scan.
            for books in (self.sent, self.overdue):
                only = books.get(invocation_id)
                if only is not None:
                    return invocation_id if only.reply in (reply, "") else None
        unknown: str | None = None
        for books in (self.sent, self.overdue):
            for key, sent in books.items():
                if sent.invocation_id != invocation_id:
                    continue
                if sent.reply == reply:
                    return key
                if not sent.reply and unknown is None:
                    unknown = key
        return unknown

    def finish(self, invocation_id: str, reply: str = "") -> list[Grant]:
        """A direct invocation ended (its Done arrived, or it never reached its worker):
        the send under `invocation_id` with the `reply` subject it went with (see
        `held`; "" for ingress's own request)."""
        key = self.held(invocation_id, reply)
        if key is None:
            return []
        if key in self.overdue:
            self._pop(self.overdue, key)  # its slot was counted free at its deadline
            return []
        sent = self._pop(self.sent, key)
        route = self.routes.get(sent.grant_id)
        if route is None:
            return []
        route.in_use -= 1
        return self._settle(route)

    def lost(self, worker_id: str) -> list[tuple[str, Sent]]:
        """A worker is gone: what was sent there (by invocation id), to be answered.
        Its grants went with it in the scheduler's books: nothing to give back."""
        gone = [key for key, s in self.sent.items() if s.worker_id == worker_id]
        answered = [(s.invocation_id, s) for s in (self._pop(self.sent, key) for key in gone)]
        for key in [key for key, s in self.overdue.items() if s.worker_id == worker_id]:
            self._pop(self.overdue, key)  # no Done will come
        for gid in [gid for gid, r in self.routes.items() if r.grant.worker_id == worker_id]:
            self._forget(self.routes[gid])
            self.returned.append(gid)
        return answered

    def retire(self, worker_id: str) -> list[Grant]:
        """Stop sending to a worker that did not take a send; returns grants to give back."""
        back: list[Grant] = []
        for route in [r for r in self.routes.values() if r.grant.worker_id == worker_id]:
            route.usable = False
            back += self._settle(route)
        return back

    def tick(self, now: float) -> list[Grant]:
        """Lapse grants past their use and count sends past their deadline as ended
        (the caller has stopped waiting: their slots free, `overdue` until their Done
        comes); returns grants to give back."""
        for key in [key for key, s in self.sent.items() if s.deadline <= now]:
            sent = self.sent.pop(key)
            self.overdue[key] = sent
            if sent.grant_id in self.routes:
                self.routes[sent.grant_id].in_use -= 1
        while self.overdue:
            key, oldest = next(iter(self.overdue.items()))
            if len(self.overdue) <= OVERDUE_MEMORY and now - oldest.deadline < OVERDUE_MEMORY_S:
                break
            self._pop(self.overdue, key)
        back: list[Grant] = []
        for route in list(self.routes.values()):
            if now >= route.expires_at - STOP_BEFORE_S:
                route.usable = False
            back += self._settle(route)
        return back

    def surrender(self) -> list[Grant]:
        """Every grant, to give back at shutdown or drop for a new scheduler: nothing
        more will be sent under them (what is still running finishes on the worker's
        own capacity check). What was sent stays recorded until its Done or deadline:
        if its worker is lost, its caller is still told so (`lost`)."""
        grants = [route.grant for route in self.routes.values()]
        for route in list(self.routes.values()):
            self._forget(route)
            self.returned.append(route.grant.grant_id)
        return grants

    def _ambiguous(self, invocation_id: str, reply: str) -> bool:
        """A send under `invocation_id` with `reply` could not be told apart from one
        that may still run (in flight, or overdue): both with the same reply subject,
        or both without one known here (ingress's own requests)."""
        if invocation_id not in self._under:
            return False
        return any(
            s.invocation_id == invocation_id and s.reply == reply
            for books in (self.sent, self.overdue)
            for s in books.values()
        )

    def _pop(self, books: dict[str, Sent], key: str) -> Sent:
        sent = books.pop(key)
        left = self._under[sent.invocation_id] - 1
        if left:
            self._under[sent.invocation_id] = left
        else:
            del self._under[sent.invocation_id]
        return sent

    def _settle(self, route: Route) -> list[Grant]:
        if route.usable or route.in_use > 0:
            return []
        self._forget(route)
        self.returned.append(route.grant.grant_id)
        return [route.grant]

    def _forget(self, route: Route) -> None:
        grant = route.grant
        self.routes.pop(grant.grant_id, None)
        if self.by_function.get(grant.function) == grant.grant_id:
            del self.by_function[grant.function]

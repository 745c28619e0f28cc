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

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.schema import Grant

# Stop sending under a grant this long before it lapses: what is on its way must
# reach the worker while the scheduler still holds the slots.
STOP_BEFORE_S = 0.25
# Grant ids given back, remembered so a renewal already on its way is ignored.
RETURNED_MEMORY = 256


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

    grant_id: str
    worker_id: str
    deadline: float
    reply: str = ""
    on_lost: Callable[[], None] | None = None


@dataclass
class DirectRoutes:
    routes: dict[str, Route] = field(default_factory=dict)  # by grant id
    by_function: dict[str, str] = field(default_factory=dict)  # function -> grant id
    sent: dict[str, Sent] = field(default_factory=dict)  # by invocation id
    returned: deque[str] = field(default_factory=lambda: deque(maxlen=RETURNED_MEMORY))
    direct: int = 0
    renewals: int = 0

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
        if invocation_id in self.sent:
            # The id is the caller's to choose (Gfaas-Invocation-Id; an async
            # redelivery reuses its id too), and a worker's Done names nothing else:
            # a second direct send under one id could not be told apart from the first
            # when a Done came back, and its slot would never be freed. Refusing the
            # call would break callers that reuse an id on purpose (a correlation id,
            # a retry while the first attempt still runs), so the repeat goes through
            # the scheduler, whose own slots it uses; each direct send stays one record.
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
        self.sent[invocation_id] = Sent(
            route.grant.grant_id, route.grant.worker_id, deadline, reply, on_lost
        )
        return route.grant.worker_id

    def finish(self, invocation_id: str) -> list[Grant]:
        """A direct invocation ended (its Done arrived, or its worker was lost)."""
        sent = self.sent.pop(invocation_id, None)
        route = self.routes.get(sent.grant_id) if sent is not None else None
        if route is None:
            return []
        route.in_use -= 1
        return self._settle(route)

    def lost(self, worker_id: str) -> list[tuple[str, Sent]]:
        """A worker is gone: what was sent there (by invocation id), to be answered.
        Its grants went with it in the scheduler's books: nothing to give back."""
        gone = [iid for iid, s in self.sent.items() if s.worker_id == worker_id]
        answered = [(iid, self.sent.pop(iid)) for iid in gone]
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
        """Lapse grants past their use and forget sends past their deadline (the
        caller has stopped waiting); returns grants to give back."""
        for iid in [iid for iid, s in self.sent.items() if s.deadline <= now]:
            sent = self.sent.pop(iid)
            if sent.grant_id in self.routes:
                self.routes[sent.grant_id].in_use -= 1
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

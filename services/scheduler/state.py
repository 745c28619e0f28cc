"""The scheduler's books: live workers, what each runs, and the queue of waiting work.

Pure bookkeeping, no I/O: the app feeds it events (heartbeat, assignment, done,
clock ticks) and publishes what it returns. Besides who runs what, the books
learn what the policies need to predict latency: per worker, its device tier
(from heartbeats) and a device profile fitted to its measured loads; per model,
its size; per function, its warm execution time (an EWMA of `Done.exec_ms` of
runs sent where the model was ready, with the interference slowdown taken out);
and per function, SLO hits so far.
The views are built by `shared.scheduling.observed`, the same transitions the
planner applies, so the live scheduler and the simulator decide on equal terms.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from shared.scheduling import RequestView, SloTracker, WorkerView
from shared.scheduling.dispatch import assume_assigned
from shared.scheduling.grants import HOT_CALLS, HOT_WINDOW_S, grant_slots, keep_grant
from shared.scheduling.observed import (
    alone_exec_s,
    assume_finished,
    ewma,
    fit_profile,
    reported_cache,
    with_running,
)
from shared.schema import (
    Done,
    FunctionSpec,
    Grant,
    InvocationMeta,
    WorkerHeartbeat,
    new_invocation_id,
)
from shared.spec import wants_instances


def learnt_from(done: Done) -> bool:
    """Whether `done` says how long its function takes: a worker sends `exec_ms` for a
    handler that ran to its end, ok or past its deadline (its caller, answered
    `deadline_exceeded`, had stopped waiting, but a 2 s run is 2 s of evidence: left
    out, a function that often overruns would look fast). A run that failed otherwise
    (the handler raised, bad input, a refusal) says nothing of it, and sends 0."""
    return done.exec_ms > 0.0


@dataclass
class Invocation:
    meta: InvocationMeta
    reply: str
    body: bytes
    headers: dict[str, str]
    view: RequestView
    # For exec-time learning: requests already on the worker when this one was
    # sent, and whether its model was ready there (a cold run's time includes the
    # swap-in, which would make the function look slow for good).
    co_runners: int = 0
    warm: bool = False
    # Starts lost under it: instances that took it while starting and died before
    # they were ready (it never ran there), each time sent to another start.
    lost_starts: int = 0
    # When it was sent to the worker whose books hold it (`ClusterState.assign`).
    sent_at: float = 0.0


@dataclass
class Lent:
    """A grant the books hold: its slots count as running `request`s on the worker
    (busy and pinning the model) until the ingress gives it back."""

    grant: Grant
    ingress: str
    request: RequestView
    expires_at: float
    lent_at: float
    # How long past expiry the slots stay held if the ingress never gives them back
    # (it died): the longest a run it sent may take.
    grace_s: float
    revoked: bool = False

    @property
    def holds(self) -> list[RequestView]:
        return [self.request] * self.grant.slots


@dataclass
class WorkerBook:
    view: WorkerView  # as reported, plus what was sent since
    last_seen: float
    # By invocation id, made its own (`ClusterState.assign`) while another running
    # here has it; `ClusterState.held` finds one by the id and reply a note names.
    running: dict[str, Invocation] = field(default_factory=dict)
    lent: dict[str, Lent] = field(default_factory=dict)  # by grant id
    # Cache key -> (bytes, seconds) of the latest load measured on this worker.
    loads: dict[str, tuple[int, float]] = field(default_factory=dict)
    # Invocations it runs that these books never saw (a former leader placed them,
    # say), learnt from a refusal: busy slots until their Done notes come.
    unseen: int = 0
    # An instance still loading its handler and model (WorkerHeartbeat.starting).
    starting: bool = False
    # The process these books are of (WorkerHeartbeat.boot).
    boot: str = ""


@dataclass
class ClusterState:
    worker_timeout_s: float
    pending_limit: int
    workers: dict[str, WorkerBook] = field(default_factory=dict)
    # Waiting invocations by their views' ids (`_queue_key`), oldest first (dicts
    # keep insertion order).
    pending: dict[str, Invocation] = field(default_factory=dict)
    # Cache key -> bytes on a device (heartbeats), or stored bytes (object store).
    model_bytes: dict[str, int] = field(default_factory=dict)
    # Function -> warm execution seconds alone on a device.
    exec_s: dict[str, float] = field(default_factory=dict)
    slo: SloTracker = field(default_factory=SloTracker)
    rejected: int = 0
    # Ingress instance -> when it last said it is alive (its grants die with it).
    ingress_seen: dict[str, float] = field(default_factory=dict)
    # (ingress, function) -> when its last few invocations came (is it hot?).
    calls: dict[tuple[str, str], deque[float]] = field(default_factory=dict)
    # Numbers the queue keys of invocations that share a caller's id.
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def views(self) -> list[WorkerView]:
        """The workers the policies choose from: all of them, but an instance still
        starting only while no other instance of its function is loaded. It takes the
        invocations that wait for a first instance (their inputs are staged while it
        loads); beside a loaded one it would only make them wait for its load."""
        books = self.workers.values()
        if not any(book.starting for book in books):
            return [book.view for book in books]
        loaded = {b.view.function for b in books if not b.starting and b.view.function}
        return [b.view for b in books if not (b.starting and b.view.function in loaded)]

    # -- what the policies are told -------------------------------------------------------

    def request_view(
        self,
        spec: FunctionSpec,
        meta: InvocationMeta,
        now: float,
        now_ms: int,
        *,
        instanced: bool | None = None,
    ) -> RequestView:
        """The policy's view of a new invocation, on the scheduler's clock `now`;
        `instanced` when the scheduler knows better than the spec (an isolated node).

        Due by its SLO (as in the simulator), or by its hard deadline if sooner;
        the hard deadline alone is enforced by `expire_pending`.
        """
        due = now + spec.slo_ms / 1000.0
        if meta.deadline_ms:
            due = min(due, now + (meta.deadline_ms - now_ms) / 1000.0)
        return RequestView(
            invocation_id=meta.invocation_id,
            function=spec.name,
            kind=spec.kind,
            model=spec.model,
            arrived_at=now,
            deadline=due,
            slo_ms=spec.slo_ms,
            exec_s=self.exec_s.get(spec.name, 0.0),
            model_bytes=self.model_bytes.get(spec.model or spec.name, 0),
            node=meta.node,
            instanced=wants_instances(spec) if instanced is None else instanced,
        )

    def queue(self, window: int, with_rrc: bool) -> list[RequestView]:
        """The first `window` waiting requests, with their functions' RRC if asked."""
        views = [inv.view for inv in itertools.islice(self.pending.values(), window)]
        if with_rrc:
            views = [replace(v, rrc=self.slo.rrc(v.function)) for v in views]
        return views

    # -- events ---------------------------------------------------------------------------

    def restarted(self, hb: WorkerHeartbeat) -> WorkerBook | None:
        """The books of the process `hb`'s worker had before, removed, when `hb` comes
        from another one under the same id (restarted before the timeout reaped it).
        What that one ran died with it and sends no Done, its grants and measurements
        were its own: kept, they would hold the new process's slots for good."""
        book = self.workers.get(hb.worker_id)
        if book is None or book.boot == hb.boot:
            return None
        return self.workers.pop(hb.worker_id)

    def observe(self, hb: WorkerHeartbeat, now: float) -> bool:
        """Record a heartbeat; True when the worker is new, has more slots or fewer
        held (pending work may now fit)."""
        book = self.workers.get(hb.worker_id)
        loads = book.loads if book is not None else {}
        for key, size in hb.model_bytes.items():
            self.model_bytes[key] = size
            seconds = hb.model_load_s.get(key, 0.0)
            if seconds > 0.0:
                loads[key] = (size, seconds)
        profile = fit_profile(loads.values())
        cache = None
        if hb.cache_capacity > 0:
            cache = reported_cache(
                hb.cache_capacity,
                hb.model_bytes,
                hb.model_load_s,
                hb.model_score,
                hb.loading,
                now,
                profile,
            )
        reported = WorkerView(
            worker_id=hb.worker_id,
            device=hb.device,
            capacity=hb.capacity,
            resident=frozenset(hb.models),
            memory_free=hb.memory_free,
            memory_total=hb.memory_total,
            cache=cache,
            profile=profile,
            node=hb.node,
            function=hb.function,
        )
        forgot = book is not None and self._forget_finished(book, hb.inflight, now)
        running = [inv.view for inv in book.running.values()] if book is not None else []
        for lent in book.lent.values() if book is not None else ():
            running += lent.holds
        view = with_running(reported, running, now)
        if book is None:
            self.workers[hb.worker_id] = WorkerBook(
                view=view, last_seen=now, loads=loads, starting=hb.starting, boot=hb.boot
            )
            return True
        book.starting = hb.starting
        if book.unseen:
            # No more than the worker says it runs beyond what the books know: a lost
            # Done note must not keep a slot busy for good.
            book.unseen = min(book.unseen, max(hb.inflight - len(book.running), 0))
            view = replace(view, outstanding=view.outstanding + book.unseen)
        grew = view.capacity > book.view.capacity
        book.view, book.last_seen = view, now
        return grew or forgot

    def _forget_finished(self, book: WorkerBook, inflight: int, now: float) -> bool:
        """A Done note lost on the bus left its invocation in the books, its slot busy
        for good: where the worker says it runs fewer than the books hold, the oldest
        sent a worker timeout ago or more (surely there by now, and not counted) go.
        What was sent since may not have reached the worker when it beat. True when
        any went (pending work may now fit)."""
        excess = len(book.running) - max(inflight, 0)
        if excess <= 0:
            return False
        old = [k for k, inv in book.running.items() if now - inv.sent_at > self.worker_timeout_s]
        old.sort(key=lambda k: book.running[k].sent_at)
        for key in old[:excess]:
            del book.running[key]
        return bool(old)

    def assign(self, worker_id: str, inv: Invocation, now: float) -> None:
        book = self.workers[worker_id]
        view = book.view
        key = inv.view.cache_key
        inv.co_runners, inv.sent_at = view.outstanding, now
        inv.warm = key in view.resident and (view.cache is None or view.cache.ready(key, now))
        # Callers may reuse an id, and two under one may run here at once: keyed by
        # the id alone, the second replaced the first, whose slot one Done note then
        # never freed and whose caller a lost worker never answered.
        held = inv.meta.invocation_id
        if held in book.running:
            held = f"{held}#{next(self._seq)}"
        book.running[held] = inv
        book.view = assume_assigned(book.view, inv.view, now)

    def held(self, worker_id: str, invocation_id: str, reply: str = "") -> str | None:
        """The key in `worker_id`'s running books of the invocation a note names by its
        id (the one with its reply subject, else the first sent there), or None."""
        book = self.workers.get(worker_id)
        if book is None:
            return None
        first: str | None = None
        for key, inv in book.running.items():
            if inv.meta.invocation_id == invocation_id:
                if not reply or inv.reply == reply:
                    return key
                if first is None:
                    first = key
        return first

    def finish(self, worker_id: str, invocation_id: str, reply: str = "") -> Invocation | None:
        key = self.held(worker_id, invocation_id, reply)
        if key is None:
            return None
        book = self.workers[worker_id]
        inv = book.running.pop(key)
        book.view = assume_finished(book.view, inv.view)
        return inv

    def done(self, done: Done, now: float) -> Invocation | None:
        """A worker finished an invocation: free its slot and learn from it."""
        inv = self.finish(done.worker_id, done.invocation_id, done.reply)
        if inv is None:
            self._unseen_done(done.worker_id)
            return None
        function = inv.view.function
        if learnt_from(done) and inv.warm:
            book = self.workers.get(done.worker_id)
            profile = book.view.profile if book is not None else None
            sample = done.exec_ms / 1000.0
            if profile is not None:
                sample = alone_exec_s(sample, inv.co_runners, profile)
            self.exec_s[function] = ewma(self.exec_s.get(function, 0.0), sample)
        met = done.ok and now - inv.view.arrived_at <= inv.view.slo_ms / 1000.0
        self.slo = self.slo.record(function, met)
        return inv

    def refused(
        self, worker_id: str, invocation_id: str, inflight: int, reply: str = ""
    ) -> Invocation | None:
        """A worker at capacity handed back `invocation_id` (None: not held here). It
        leaves the worker's books, and the worker counts as running the `inflight` it
        said until Done notes (or heartbeats) say otherwise: placing anything more
        there would only be refused again."""
        inv = self.finish(worker_id, invocation_id, reply)
        book = self.workers.get(worker_id)
        if inv is None or book is None:
            return None
        more = max(inflight - book.view.outstanding, 0)
        book.unseen += more
        book.view = replace(book.view, outstanding=book.view.outstanding + more)
        return inv

    def _unseen_done(self, worker_id: str) -> None:
        book = self.workers.get(worker_id)
        if book is not None and book.unseen:
            book.unseen -= 1
            book.view = replace(book.view, outstanding=max(book.view.outstanding - 1, 0))

    # -- grants (shared.scheduling.grants) ---------------------------------------------

    def lend(
        self,
        ingress: str,
        inv: Invocation,
        spec: FunctionSpec,
        worker_id: str,
        ttl_s: float,
        now: float,
    ) -> Grant | None:
        """After `inv` was assigned to `worker_id`: a new or renewed grant of that
        worker's slots for `inv`'s function to `ingress`, or None."""
        book = self.workers.get(worker_id)
        if book is None:
            return None
        function = inv.view.function
        queued = len(self.pending)
        recent = self.calls.setdefault((ingress, function), deque(maxlen=HOT_CALLS))
        recent.append(now)
        for lent in book.lent.values():
            if lent.ingress == ingress and lent.grant.function == function:
                if lent.revoked or not keep_grant(book.view, queued=queued):
                    return None
                lent.expires_at = now + ttl_s
                return lent.grant
        if any(lent.ingress == ingress and lent.grant.function == function for lent in self.lent()):
            return None  # one grant per ingress and function: the other one lapses first
        slots = grant_slots(
            book.view,
            inv.view,
            queued=queued,
            limit=spec.concurrency,
            now=now,
            recent_calls=sum(1 for t in recent if now - t <= HOT_WINDOW_S),
        )
        if slots <= 0:
            return None
        grant = Grant(
            grant_id=new_invocation_id()[:16],
            function=function,
            worker_id=worker_id,
            slots=slots,
            ttl_s=ttl_s,
        )
        lent = book.lent[grant.grant_id] = Lent(
            grant,
            ingress,
            inv.view,
            now + ttl_s,
            lent_at=now,
            grace_s=spec.timeout_ms / 1000.0 + 1.0,
        )
        for request in lent.holds:
            book.view = assume_assigned(book.view, request, now)
        return grant

    def lent(self) -> Iterator[Lent]:
        for book in self.workers.values():
            yield from book.lent.values()

    def revoke(self, worker_id: str | None = None) -> list[Lent]:
        """Stop renewing grants (all, or those on one worker) and return the ones to
        tell their ingress about; the slots stay held until the ingress gives them back."""
        revoked = []
        for lent in self.lent():
            if not lent.revoked and worker_id in (None, lent.grant.worker_id):
                lent.revoked = True
                revoked.append(lent)
        return revoked

    def give_back(self, worker_id: str, grant_id: str) -> bool:
        """The ingress holds nothing more under this grant: free its slots."""
        book = self.workers.get(worker_id)
        lent = book.lent.pop(grant_id, None) if book is not None else None
        if book is None or lent is None:
            return False
        for request in lent.holds:
            book.view = assume_finished(book.view, request)
        return True

    def lapsed(self, now: float, heard: bool = True) -> list[Lent]:
        """Grants whose ingress stopped saying it is alive, or that no ingress gave back
        long after expiry: their slots are freed. While the bus is not `heard`, an
        ingress's silence is the bus's: its grants go only by expiry (freed then, they
        would be placed on while the ingress, never told, still sends under them)."""

        def gone(lent: Lent) -> bool:
            seen = max(self.ingress_seen.get(lent.ingress, lent.lent_at), lent.lent_at)
            return heard and now - seen > self.worker_timeout_s

        stale = [x for x in self.lent() if x.expires_at + x.grace_s <= now or gone(x)]
        for lent in stale:
            self.give_back(lent.grant.worker_id, lent.grant.grant_id)
        return stale

    def forget_idle(self, now: float, heard: bool = True) -> None:
        """Forget the ingresses gone silent for the worker timeout (after `lapsed` took
        back their grants; while the bus is not `heard`, their silence is its own), and
        the call times of (ingress, function) pairs with none in the hot window (they
        count for nothing): each ingress start has an id of its own, so kept, both grew
        for the scheduler's lifetime. An ingress heard again, or a pair called again,
        starts afresh, as a new one would."""
        if heard:
            gone = [i for i, t in self.ingress_seen.items() if now - t > self.worker_timeout_s]
            for ingress in gone:
                del self.ingress_seen[ingress]
        idle = [
            key for key, times in self.calls.items() if not times or now - times[-1] > HOT_WINDOW_S
        ]
        for key in idle:
            del self.calls[key]

    def done_direct(self, done: Done) -> None:
        """An invocation an ingress sent under a grant finished: the scheduler never
        saw it start, so it only learns the warm execution time (grants are only for
        warm functions), not SLO attainment."""
        if learnt_from(done):
            sample = done.exec_ms / 1000.0
            self.exec_s[done.function] = ewma(self.exec_s.get(done.function, 0.0), sample)

    def reject(self, inv: Invocation) -> None:
        """The policy refused `inv` (it has left the queue): a missed SLO."""
        self.rejected += 1
        self.slo = self.slo.record(inv.view.function, False)

    def reap(self, now: float) -> list[tuple[str, WorkerBook]]:
        """Forget workers silent for longer than the timeout; return their books."""
        dead = [wid for wid, b in self.workers.items() if now - b.last_seen > self.worker_timeout_s]
        return [(wid, self.workers.pop(wid)) for wid in dead]

    def enqueue(self, inv: Invocation) -> bool:
        if len(self.pending) >= self.pending_limit:
            return False
        self.pending[self._queue_key(inv)] = inv
        return True

    def _queue_key(self, inv: Invocation) -> str:
        """`inv`'s key in the queue: its view's id, made its own while another waiting
        invocation has it. Callers may reuse an id (a correlation id), and the plan
        names what it places by the view's id: keyed by the caller's id alone, the
        second would replace the first, whose caller was never answered. ('#' is no
        id's character: the key is nobody else's.)"""
        key = inv.view.invocation_id
        other = self.pending.get(key)
        if other is not None and other is not inv:
            key = f"{inv.meta.invocation_id}#{next(self._seq)}"
            inv.view = replace(inv.view, invocation_id=key)
        return key

    def requeue(self, inv: Invocation) -> None:
        """An invocation a worker refused waits again, in its place by arrival. Past
        the limit too: it was admitted, and it moves from a worker's books to the
        queue (the queue's bound is on what comes in, not on what comes back)."""
        self.pending[self._queue_key(inv)] = inv
        if any(other.view.arrived_at > inv.view.arrived_at for other in self.pending.values()):
            self.pending = dict(sorted(self.pending.items(), key=lambda kv: kv[1].view.arrived_at))

    def take(self, invocation_id: str) -> Invocation:
        """Remove a waiting invocation the planner placed or refused (by its view's id)."""
        return self.pending.pop(invocation_id)

    def bus_back(self, at: float) -> None:
        """The bus is back after a silence: a worker or ingress silent only through it
        is not lost (each gets a full timeout from `at` to be heard again)."""
        for book in self.workers.values():
            book.last_seen = max(book.last_seen, at)
        for ingress, seen in self.ingress_seen.items():
            self.ingress_seen[ingress] = max(seen, at)

    def drop_function(self, function: str) -> list[Invocation]:
        """What waits for `function`, removed (it cannot be served: answered)."""
        dropped = [inv for inv in self.pending.values() if inv.view.function == function]
        for inv in dropped:
            del self.pending[inv.view.invocation_id]
        return dropped

    def drop_pending(self) -> list[Invocation]:
        """Everything waiting, removed (this scheduler hands over)."""
        dropped = list(self.pending.values())
        self.pending.clear()
        return dropped

    def expire_pending(self, now_ms: int) -> list[Invocation]:
        expired = [
            inv
            for inv in self.pending.values()
            if inv.meta.deadline_ms and inv.meta.deadline_ms <= now_ms
        ]
        for inv in expired:
            del self.pending[inv.view.invocation_id]
        return expired

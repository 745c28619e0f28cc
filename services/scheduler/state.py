"""The scheduler's books: live workers, what each runs, and the queue of waiting work.

Pure bookkeeping, no I/O: the app feeds it events (heartbeat, assignment, done,
clock ticks) and publishes what it returns.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field

from shared.scheduling import RequestView, WorkerView
from shared.schema import InvocationMeta, WorkerHeartbeat


@dataclass
class Invocation:
    meta: InvocationMeta
    reply: str
    body: bytes
    headers: dict[str, str]
    view: RequestView


@dataclass
class WorkerBook:
    view: WorkerView
    last_seen: float
    running: dict[str, Invocation] = field(default_factory=dict)


@dataclass
class ClusterState:
    worker_timeout_s: float
    pending_limit: int
    workers: dict[str, WorkerBook] = field(default_factory=dict)
    pending: deque[Invocation] = field(default_factory=deque)

    def views(self) -> list[WorkerView]:
        return [book.view for book in self.workers.values()]

    def observe(self, hb: WorkerHeartbeat, now: float) -> bool:
        """Record a heartbeat; True when the worker is new (pending work may now fit)."""
        book = self.workers.get(hb.worker_id)
        view = WorkerView(
            worker_id=hb.worker_id,
            device=hb.device,
            capacity=hb.capacity,
            outstanding=len(book.running) if book else 0,
            resident=frozenset(hb.models),
            memory_free=hb.memory_free,
        )
        if book is None:
            self.workers[hb.worker_id] = WorkerBook(view=view, last_seen=now)
            return True
        grew = view.capacity > book.view.capacity
        book.view, book.last_seen = view, now
        return grew

    def assign(self, worker_id: str, inv: Invocation) -> None:
        book = self.workers[worker_id]
        book.running[inv.meta.invocation_id] = inv
        self._recount(book)

    def finish(self, worker_id: str, invocation_id: str) -> Invocation | None:
        book = self.workers.get(worker_id)
        if book is None:
            return None
        inv = book.running.pop(invocation_id, None)
        self._recount(book)
        return inv

    def reap(self, now: float) -> list[tuple[str, list[Invocation]]]:
        """Forget workers silent for longer than the timeout; return what they held."""
        dead = [wid for wid, b in self.workers.items() if now - b.last_seen > self.worker_timeout_s]
        return [(wid, list(self.workers.pop(wid).running.values())) for wid in dead]

    def enqueue(self, inv: Invocation) -> bool:
        if len(self.pending) >= self.pending_limit:
            return False
        self.pending.append(inv)
        return True

    def expire_pending(self, now_ms: int) -> list[Invocation]:
        kept: deque[Invocation] = deque()
        expired: list[Invocation] = []
        for inv in self.pending:
            (expired if inv.meta.deadline_ms and inv.meta.deadline_ms <= now_ms else kept).append(
                inv
            )
        self.pending = kept
        return expired

    @staticmethod
    def _recount(book: WorkerBook) -> None:
        book.view = dataclasses.replace(book.view, outstanding=len(book.running))

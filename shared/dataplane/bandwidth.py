"""Which chunk goes next on a link: weighted fair sharing with minimum rates.

Every transfer is cut into chunks (2 MiB by default: Torpor found the copy
throughput elbow near 2 MB), and the link issues one chunk at a time. In FAIR mode
the chunk with the smallest virtual finish tag goes first (start-time fair
queueing over per-transfer tags), so a small transfer that arrives behind a big
one waits at most for the chunk in flight. A transfer with an SLO gets a minimum
rate, size / (time left - expected compute); when it would fall behind that rate,
earliest-deadline-first overrides the fair order. FIFO mode issues transfers
whole, in arrival order: the baseline.

Pure: the copier (or the simulator) asks for the next chunk and reports when it
finished, passing the time.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from enum import StrEnum

MiB = 1 << 20
DEFAULT_CHUNK = 2 * MiB


class Mode(StrEnum):
    FAIR = "fair"
    FIFO = "fifo"


@dataclass(frozen=True, slots=True)
class Chunk:
    transfer_id: str
    index: int
    offset: int
    nbytes: int
    issued_at: float


@dataclass(frozen=True, slots=True)
class TransferDone:
    transfer_id: str
    flow: str
    nbytes: int
    submitted_at: float
    finished_at: float

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.submitted_at


@dataclass(frozen=True, slots=True)
class LinkStats:
    link: str
    busy_s: float
    elapsed_s: float
    bytes_done: int
    bytes_by_flow: dict[str, int]
    transfers_done: int
    active: int
    reserved_rate: float

    @property
    def utilisation(self) -> float:
        return self.busy_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def throughput(self) -> float:
        """Bytes per second while the link was busy."""
        return self.bytes_done / self.busy_s if self.busy_s > 0 else 0.0


@dataclass(slots=True)
class _Transfer:
    transfer_id: str
    flow: str
    nbytes: int
    weight: float
    min_rate: float
    submitted_at: float
    seq: int
    issued: int = 0
    done: int = 0
    chunks: int = 0
    finish_tag: float = 0.0


class LinkScheduler:
    def __init__(
        self,
        link: str,
        *,
        capacity: float,
        chunk_bytes: int = DEFAULT_CHUNK,
        mode: Mode = Mode.FAIR,
    ) -> None:
        if chunk_bytes <= 0 or capacity <= 0:
            raise ValueError("chunk_bytes and capacity must be positive")
        self.link = link
        # Bytes per second; only used to judge whether a minimum rate is about to slip.
        self.capacity = capacity
        self.chunk_bytes = chunk_bytes
        self.mode = mode
        self._transfers: dict[str, _Transfer] = {}
        self._seq = 0
        self._vtime = 0.0
        self._started_at: float | None = None
        self._busy_s = 0.0
        self._busy_until = float("-inf")
        self._bytes_done = 0
        self._by_flow: defaultdict[str, int] = defaultdict(int)
        self._transfers_done = 0
        self._last_now = 0.0

    def submit(
        self,
        transfer_id: str,
        nbytes: int,
        *,
        now: float,
        weight: float = 1.0,
        flow: str = "",
        deadline: float | None = None,
        compute_s: float = 0.0,
    ) -> None:
        """Queue a transfer; `deadline` (absolute) and `compute_s` give it a minimum rate."""
        if transfer_id in self._transfers:
            raise ValueError(f"transfer {transfer_id} already queued on {self.link}")
        # NaN compares false and inf would starve every other flow: both refused.
        if nbytes <= 0 or not 0 < weight < math.inf:
            raise ValueError("nbytes must be positive and weight positive and finite")
        min_rate = 0.0
        if deadline is not None:
            # A budget already spent asks for the whole link: the best we can do.
            budget = deadline - now - compute_s
            min_rate = nbytes / budget if budget > 0 else self.capacity
        if self._started_at is None:
            self._started_at = now
        if not self._active():
            # An idle link forgets old tags, so history gives nobody credit or debt.
            self._vtime = 0.0
        self._seq += 1
        self._transfers[transfer_id] = _Transfer(
            transfer_id,
            flow or transfer_id,
            nbytes,
            weight,
            min_rate,
            now,
            self._seq,
            finish_tag=self._vtime,
        )

    def cancel(self, transfer_id: str) -> None:
        self._transfers.pop(transfer_id, None)

    def next_chunk(self, now: float) -> Chunk | None:
        waiting = [t for t in self._transfers.values() if t.issued < t.nbytes]
        if not waiting:
            return None
        t = self._pick(waiting, now)
        n = min(self.chunk_bytes, t.nbytes - t.issued)
        # A transfer is backlogged from its arrival to its last chunk, so its next start
        # tag is its previous finish tag (set to the virtual time when it arrived).
        start = t.finish_tag
        t.finish_tag = start + n / t.weight
        self._vtime = max(self._vtime, start)
        chunk = Chunk(t.transfer_id, t.chunks, t.issued, n, now)
        t.issued += n
        t.chunks += 1
        return chunk

    def complete(self, chunk: Chunk, now: float) -> TransferDone | None:
        """Account a finished chunk; returns the transfer when this was its last byte."""
        self._busy_s += max(0.0, now - max(chunk.issued_at, self._busy_until))
        self._busy_until = max(self._busy_until, now)
        self._last_now = max(self._last_now, now)
        t = self._transfers.get(chunk.transfer_id)
        if t is None:  # cancelled while in flight
            return None
        t.done += chunk.nbytes
        self._bytes_done += chunk.nbytes
        self._by_flow[t.flow] += chunk.nbytes
        if t.done < t.nbytes:
            return None
        del self._transfers[t.transfer_id]
        self._transfers_done += 1
        return TransferDone(t.transfer_id, t.flow, t.nbytes, t.submitted_at, now)

    def pending(self) -> int:
        return len(self._transfers)

    def reserved_rate(self) -> float:
        return sum(t.min_rate for t in self._transfers.values())

    def admissible(self, nbytes: int, *, now: float, deadline: float, compute_s: float) -> bool:
        """Whether a new minimum rate still fits beside those already promised."""
        budget = deadline - now - compute_s
        return budget > 0 and self.reserved_rate() + nbytes / budget <= self.capacity

    def stats(self, now: float | None = None) -> LinkStats:
        end = self._last_now if now is None else now
        start = self._started_at if self._started_at is not None else end
        return LinkStats(
            link=self.link,
            busy_s=self._busy_s,
            elapsed_s=max(0.0, end - start),
            bytes_done=self._bytes_done,
            bytes_by_flow=dict(self._by_flow),
            transfers_done=self._transfers_done,
            active=len(self._transfers),
            reserved_rate=self.reserved_rate(),
        )

    def _active(self) -> bool:
        return any(t.issued < t.nbytes for t in self._transfers.values())

    def _pick(self, waiting: list[_Transfer], now: float) -> _Transfer:
        if self.mode is Mode.FIFO:
            return min(waiting, key=lambda t: t.seq)
        # Urgent: serving anyone else first (one chunk) would make its next chunk late.
        slot = self.chunk_bytes / self.capacity
        urgent = [
            (self._chunk_deadline(t), t.seq, t)
            for t in waiting
            if t.min_rate > 0 and self._chunk_deadline(t) <= now + 2 * slot
        ]
        if urgent:
            return min(urgent, key=lambda u: (u[0], u[1]))[2]
        return min(
            waiting,
            key=lambda t: (
                t.finish_tag + min(self.chunk_bytes, t.nbytes - t.issued) / t.weight,
                t.seq,
            ),
        )

    def _chunk_deadline(self, t: _Transfer) -> float:
        """When the next chunk must be done for `t` to keep its minimum rate."""
        n = min(self.chunk_bytes, t.nbytes - t.issued)
        return t.submitted_at + (t.issued + n) / t.min_rate

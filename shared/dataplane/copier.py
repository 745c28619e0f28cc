"""Runs chunked copies on one link, in the order the link's scheduler decides.

One worker thread per link issues one chunk at a time, so a chunk boundary is the
point where a newly arrived transfer can overtake. numpy releases the GIL while it
copies, so submitters are not held up by a copy in progress.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from shared.dataplane.bandwidth import LinkScheduler


class CopyEngine(Protocol):
    def copy(self, dst: Any, src: Any, offset: int, nbytes: int) -> None:
        """Copy bytes [offset, offset + nbytes) of `src` into `dst`; return when done."""
        ...


class NumpyEngine:
    """memcpy between byte views (np.uint8 arrays, memoryviews, mmaps)."""

    def copy(self, dst: Any, src: Any, offset: int, nbytes: int) -> None:
        d = _bytes(dst)[offset : offset + nbytes]
        np.copyto(d, _bytes(src)[offset : offset + nbytes])


class TorchEngine:
    """torch copy_ between flat uint8 tensors: it splits large copies over threads."""

    def copy(self, dst: Any, src: Any, offset: int, nbytes: int) -> None:
        dst[offset : offset + nbytes].copy_(src[offset : offset + nbytes])


def _bytes(buf: Any) -> np.ndarray[Any, Any]:
    if isinstance(buf, np.ndarray):
        return buf.reshape(-1).view(np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)


@dataclass(frozen=True, slots=True)
class CopyResult:
    transfer_id: str
    nbytes: int
    submitted_at: float
    started_at: float
    finished_at: float

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.submitted_at

    @property
    def throughput(self) -> float:
        """Bytes per second from the first chunk issued to the last one done."""
        span = self.finished_at - self.started_at
        return self.nbytes / span if span > 0 else float("inf")


@dataclass(slots=True)
class _Job:
    dst: Any
    src: Any
    future: Future[CopyResult]
    submitted_at: float
    started_at: float | None = None


class Copier:
    def __init__(
        self,
        scheduler: LinkScheduler,
        engine: CopyEngine | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.scheduler = scheduler
        self.engine: CopyEngine = engine or NumpyEngine()
        self._clock = clock
        self._cond = threading.Condition()
        self._jobs: dict[str, _Job] = {}
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name=f"copier-{scheduler.link}", daemon=True
        )
        self._thread.start()

    def submit(
        self,
        transfer_id: str,
        dst: Any,
        src: Any,
        nbytes: int,
        *,
        weight: float = 1.0,
        flow: str = "",
        deadline: float | None = None,
        compute_s: float = 0.0,
    ) -> Future[CopyResult]:
        """Copy the first `nbytes` of `src` into `dst`; `deadline` is on this copier's clock."""
        future: Future[CopyResult] = Future()
        # Running from the start: the copier holds both buffers from now until it sets
        # the result, so a waiter that gives up (asyncio.wrap_future cancels the future
        # with its task) cannot cancel it; a cancelled future would make that
        # set_result raise in the copier's thread and end it, hanging the link.
        future.set_running_or_notify_cancel()
        with self._cond:
            if self._stopping:
                raise RuntimeError(f"copier for {self.scheduler.link} is closed")
            now = self._clock()
            self.scheduler.submit(
                transfer_id,
                nbytes,
                now=now,
                weight=weight,
                flow=flow,
                deadline=deadline,
                compute_s=compute_s,
            )
            self._jobs[transfer_id] = _Job(dst, src, future, now)
            self._cond.notify()
        return future

    def close(self) -> None:
        """Finish what was submitted, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def __enter__(self) -> Copier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                chunk = self.scheduler.next_chunk(self._clock())
                while chunk is None and not self._stopping:
                    self._cond.wait()
                    chunk = self.scheduler.next_chunk(self._clock())
                if chunk is None:
                    return
                job = self._jobs[chunk.transfer_id]
                if job.started_at is None:
                    job.started_at = chunk.issued_at
            try:
                self.engine.copy(job.dst, job.src, chunk.offset, chunk.nbytes)
            except Exception as exc:
                with self._cond:
                    self.scheduler.cancel(chunk.transfer_id)
                    self._jobs.pop(chunk.transfer_id, None)
                job.future.set_exception(exc)
                continue
            with self._cond:
                done = self.scheduler.complete(chunk, self._clock())
                if done is not None:
                    del self._jobs[done.transfer_id]
            if done is not None:
                job.future.set_result(
                    CopyResult(
                        transfer_id=done.transfer_id,
                        nbytes=done.nbytes,
                        submitted_at=job.submitted_at,
                        started_at=job.started_at,
                        finished_at=done.finished_at,
                    )
                )

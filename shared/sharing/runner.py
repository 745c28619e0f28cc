"""The token arbiter under anyio, for a worker's batch loop:

    async with runner.turn(instance) as turn:
        outputs = run_batch(budget=turn.grant.slice_s)
        turn.used_s = measured  # CUDA events, or thread CPU time; else the wall time

A turn waits for a grant, and its end charges the time and wakes the others waiting.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from shared.sharing.tokens import Grant, TokenArbiter


@dataclass(slots=True)
class Turn:
    grant: Grant
    started: float
    # What the caller measured the batch to take on the device; None: the turn's
    # wall time is charged (right for a device nothing else runs on meanwhile).
    used_s: float | None = None


class TokenRunner:
    """Turns on one device's arbiter. `clock` ticks in seconds at anyio's pace (it is
    also what the waits are measured against)."""

    def __init__(self, arbiter: TokenArbiter, clock: Callable[[], float] = time.monotonic) -> None:
        self.arbiter = arbiter
        self.clock = clock
        self._changed = anyio.Event()
        # One turn at a time per instance: the arbiter gives an instance one grant.
        self._locks: dict[str, anyio.Lock] = {}

    @asynccontextmanager
    async def turn(self, instance: str) -> AsyncIterator[Turn]:
        lock = self._locks.setdefault(instance, anyio.Lock())
        async with lock:
            turn = Turn(grant=await self._acquire(instance), started=self.clock())
            try:
                yield turn
            finally:
                now = self.clock()
                used = turn.used_s if turn.used_s is not None else now - turn.started
                # An instance removed while it ran has nothing left to charge.
                if instance in self.arbiter:
                    self.arbiter.charge(instance, used, now)
                self._notify()

    async def acquire(self, instance: str) -> Grant:
        """A grant for `instance` (for callers that hold it across messages, as a
        node agent does for its instance processes): end it with `release`."""
        return await self._acquire(instance)

    def release(self, instance: str, used_s: float) -> None:
        """End the grant `acquire` gave, charging `used_s`."""
        if instance in self.arbiter:
            self.arbiter.charge(instance, max(used_s, 0.0), self.clock())
        self._notify()

    def remove(self, instance: str) -> None:
        self.arbiter.remove(instance)
        self._locks.pop(instance, None)
        self._notify()

    async def _acquire(self, instance: str) -> Grant:
        try:
            while True:
                changed = self._changed
                now = self.clock()
                decision = self.arbiter.request(instance, now)
                if isinstance(decision, Grant):
                    return decision
                with anyio.move_on_after(max(decision.at - now, 0.0)):
                    await changed.wait()
        except BaseException:
            # Cancelled (or the instance went): those ranked behind it must not wait on it.
            self.arbiter.withdraw(instance)
            self._notify()
            raise

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

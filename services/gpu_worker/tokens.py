"""An instance's side of its device's token arbiter (which lives in the node agent).

Each batch asks the agent for a grant (`acquire`, request-reply), runs, and charges
the device time it used (`release`, a note). A caller that gives up waiting says so
with a release of -1, so the agent never grants time nobody will use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeout

from shared import subjects
from shared.errors import GfaasError
from shared.schema import ErrorCode, TokenAcquire, TokenGrant, TokenRelease, decode, encode


@dataclass(slots=True)
class Held:
    slice_s: float
    # What the batch used of the device, in seconds (-1: nothing ran).
    used_s: float = -1.0


class TokenGate:
    def __init__(self, nc: NATS, agent_id: str, instance_id: str) -> None:
        self.nc = nc
        self.instance_id = instance_id
        self._acquire = subjects.agent(agent_id, "acquire")
        self._release = subjects.agent(agent_id, "release")
        # One grant at a time per instance (the arbiter gives it one): runs beyond
        # the first wait here, and each asks the moment the one before it charges.
        self._one = anyio.Lock()

    @asynccontextmanager
    async def turn(self, wait_s: float) -> AsyncIterator[Held]:
        """Hold the device for one batch; GfaasError when no grant comes within
        `wait_s` (the invocation's deadline) or the agent refuses."""
        deadline = anyio.current_time() + wait_s
        with anyio.move_on_after(max(wait_s, 0.0)) as waited:
            await self._one.acquire()
        if waited.cancelled_caught:
            raise GfaasError(
                ErrorCode.DEADLINE_EXCEEDED,
                "deadline passed waiting for this instance's earlier runs to leave the device",
            )
        try:
            async with self._hold(deadline - anyio.current_time()) as held:
                yield held
        finally:
            self._one.release()

    @asynccontextmanager
    async def _hold(self, wait_s: float) -> AsyncIterator[Held]:
        ask = encode(TokenAcquire(instance_id=self.instance_id))
        try:
            answer = await self.nc.request(self._acquire, ask, timeout=max(wait_s, 0.001))
        except (NatsTimeout, TimeoutError):
            await self._give_back(-1.0)
            raise GfaasError(
                ErrorCode.DEADLINE_EXCEEDED,
                "deadline passed waiting for this instance's time share of the device",
            ) from None
        grant = decode(answer.data, TokenGrant)
        if grant.error is not None:
            raise GfaasError(ErrorCode.UNAVAILABLE, f"no time share: {grant.error.reason}")
        held = Held(slice_s=grant.slice_s)
        try:
            yield held
        finally:
            await self._give_back(max(held.used_s, 0.0))

    async def _give_back(self, used_s: float) -> None:
        note = TokenRelease(instance_id=self.instance_id, used_s=used_s)
        await self.nc.publish(self._release, encode(note))

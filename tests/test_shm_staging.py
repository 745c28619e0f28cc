"""ShmStaging (services/ingress/staging.py) against a broker held in memory: what a
caller that gives up midway leaves leased."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from services.ingress.oip import InferRequest, ShmRef
from services.ingress.shm_regions import ShmRegions
from services.ingress.staging import ShmStaging
from shared.schema import DType, Handle, InvokeReply, InvokeRequest, Tensor

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

HOLDER = "ingress-test"


class SlowBroker:
    """Grants a lease only once `grant` is set: a lease still on its way when the
    caller is cancelled, as a gRPC deadline or cancel can find it."""

    def __init__(self) -> None:
        self.grant = anyio.Event()
        self.asked = anyio.Event()
        self.held: set[str] = set()

    async def lease(self, sizes: Sequence[int], **kwargs: Any) -> list[Handle]:
        self.asked.set()
        handles = [
            Handle(
                backend="memory",
                pool="local",
                segment="s",
                device="cpu",
                offset=0,
                nbytes=n,
                lease_id=secrets.token_hex(4),
                generation=1,
            )
            for n in sizes
        ]
        # The broker has granted them whether or not the caller waits for its answer.
        self.held.update(h.lease_id for h in handles)
        await self.grant.wait()
        return handles

    async def release(self, handles: Sequence[Handle], holder: str, tenant: str) -> None:
        self.held.difference_update(h.lease_id for h in handles)


@pytest.fixture
def segment() -> Iterator[str]:
    key = f"/staging-test-{secrets.token_hex(4)}"
    path = Path(f"/dev/shm{key}")
    path.write_bytes(bytes(16))
    try:
        yield key
    finally:
        os.unlink(path)


async def test_a_caller_gone_while_its_input_lease_is_granted_leaves_no_lease(
    segment: str,
) -> None:
    """The lease the broker granted as the caller was cancelled is released once it
    comes; it was dropped with the cancelled await, held until its TTL (300 s) and
    charged to the tenant, while nothing could ever release it."""
    broker = SlowBroker()
    regions = ShmRegions()
    regions.of("default").register("in", segment, 0, 16)

    async def invoke(name: str, request: InvokeRequest, headers: Mapping[str, str]) -> InvokeReply:
        return InvokeReply(invocation_id="i")

    async with anyio.create_task_group() as ingress_tasks:
        staging = ShmStaging(broker, regions, HOLDER, invoke, lambda: ingress_tasks)  # type: ignore[arg-type]
        parsed = InferRequest(
            id="",
            invoke=InvokeRequest(inputs=[Tensor(name="x", dtype=DType.FLOAT32, shape=[4])]),
            outputs=None,
            binary_outputs=True,
            shm_inputs={"x": ShmRef("in", 0, 16)},
        )
        with anyio.CancelScope() as caller:

            async def call() -> None:
                await staging.infer("f", parsed, {})

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await broker.asked.wait()
                caller.cancel()
        broker.grant.set()
        with anyio.fail_after(2):
            while broker.held:
                await anyio.sleep(0.01)
        ingress_tasks.cancel_scope.cancel()
    regions.close()

"""ShmStaging (services/ingress/staging.py) against a broker held in memory: what a
caller that gives up midway leaves leased."""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
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


class PoolBroker:
    """Leases a real host slab (a segment under /dev/shm), one buffer per request,
    and notes whether the copy into it was done when it was released."""

    def __init__(self, segment: str, copy_done: threading.Event) -> None:
        self.segment = segment
        self.copy_done = copy_done
        self.held: set[str] = set()
        self.released_mid_copy = False

    async def lease(self, sizes: Sequence[int], **kwargs: Any) -> list[Handle]:
        handles = [
            Handle(
                backend="shm",
                pool="local",
                segment=self.segment,
                device="cpu",
                offset=0,
                nbytes=n,
                lease_id=secrets.token_hex(4),
                generation=1,
            )
            for n in sizes
        ]
        self.held.update(h.lease_id for h in handles)
        return handles

    async def release(self, handles: Sequence[Handle], holder: str, tenant: str) -> None:
        # Released, the buffer may be leased to anyone: a copy still writing into it
        # would write into their tensor.
        self.released_mid_copy |= not self.copy_done.is_set()
        self.held.difference_update(h.lease_id for h in handles)


async def test_a_caller_gone_during_a_threaded_copy_releases_its_buffer_only_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A copy of THREAD_COPY_MIN bytes or more runs in a thread, and the event loop
    goes on meanwhile (it ran the copy itself before: the cancel below could not even
    be sent until it was done). A caller cancelled then (a gRPC cancel, an HTTP
    client gone) waits for the thread: its lease is released once the last byte is
    in, never while the thread still writes into a buffer the broker could have
    given to another caller."""
    from services.ingress import shm_regions
    from shared.dataplane.backend import close_mapping
    from shared.dataplane.shm import create_segment, unlink_segment

    nbytes = 2 << 20
    assert nbytes >= getattr(shm_regions, "THREAD_COPY_MIN", 0)
    key = f"/staging-test-{secrets.token_hex(4)}"
    Path(f"/dev/shm{key}").write_bytes(b"\x07" * nbytes)
    slab = create_segment(f"gfaas-staging-test-{secrets.token_hex(4)}", nbytes)
    started, done = threading.Event(), threading.Event()

    def slow_pread(fd: int, target: memoryview, position: int) -> int:
        started.set()
        try:
            got = 0
            for at in range(0, len(target), 1 << 16):
                time.sleep(1.0 / (len(target) >> 16))
                got += os.preadv(fd, [target[at : at + (1 << 16)]], position + at)
            return got
        finally:
            done.set()

    monkeypatch.setattr(shm_regions, "_pread", slow_pread)
    broker = PoolBroker(slab.name, done)
    regions = ShmRegions()
    regions.of("default").register("in", key, 0, nbytes)

    async def invoke(name: str, request: InvokeRequest, headers: Mapping[str, str]) -> InvokeReply:
        return InvokeReply(invocation_id="i")

    parsed = InferRequest(
        id="",
        invoke=InvokeRequest(
            inputs=[Tensor(name="x", dtype=DType.UINT8, shape=[nbytes])],
        ),
        outputs=None,
        binary_outputs=True,
        shm_inputs={"x": ShmRef("in", 0, nbytes)},
    )
    try:
        async with anyio.create_task_group() as ingress_tasks:
            staging = ShmStaging(broker, regions, HOLDER, invoke, lambda: ingress_tasks)  # type: ignore[arg-type]
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:

                    async def call() -> None:
                        await staging.infer("f", parsed, {})

                    tg.start_soon(call)
                    while not started.is_set():
                        await anyio.sleep(0.005)
                    cancelled_mid_copy = not done.is_set()
                    tg.cancel_scope.cancel()
            ingress_tasks.cancel_scope.cancel()
        assert cancelled_mid_copy  # the loop ran during the copy
        assert done.is_set()
        assert not broker.released_mid_copy
        assert not broker.held
        assert bytes(slab.mm[:16]) == b"\x07" * 16  # the copy went to its end
        assert bytes(slab.mm[-16:]) == b"\x07" * 16
    finally:
        regions.close()
        close_mapping(slab.name)
        slab.close()
        unlink_segment(slab.name)
        os.unlink(f"/dev/shm{key}")


async def _chunks(*parts: bytes) -> AsyncGenerator[bytes, None]:
    for part in parts:
        await anyio.lowlevel.checkpoint()
        yield part


async def test_another_nodes_output_is_written_into_its_region_chunk_by_chunk(
    segment: str,
) -> None:
    """Read through its node's broker, each chunk lands at its place in the region
    (system regions); a stream that comes to other than the output's size is refused
    (internal), not answered as if the region held the output."""
    from shared.errors import GfaasError

    regions = ShmRegions()
    tenant = regions.of("default")
    tenant.register("out", segment, 0, 16)
    try:
        ref = ShmRef("out", 4, 12)
        await tenant.copy_out_chunks(_chunks(b"abcde", b"fghij"), 10, ref)
        assert Path(f"/dev/shm{segment}").read_bytes() == bytes(4) + b"abcdefghij" + bytes(2)
        for parts in [(b"abc",), (b"abcdef", b"ghijk")]:
            with pytest.raises(GfaasError, match="came as"):
                await tenant.copy_out_chunks(_chunks(*parts), 10, ref)
        with pytest.raises(GfaasError, match="do not fit"):  # checked before any read
            await tenant.copy_out_chunks(_chunks(b"x" * 13), 13, ref)
    finally:
        regions.close()


async def test_another_nodes_output_goes_into_a_cuda_region_in_one_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CUDA branch of copy_out_chunks, its GPU view stood in for by a host one."""
    import torch

    regions = ShmRegions()
    target = torch.zeros(8, dtype=torch.uint8)
    monkeypatch.setattr(regions.cuda, "byte_size", lambda name: 8)
    monkeypatch.setattr(regions.cuda, "view", lambda ref, n: target[ref.offset : ref.offset + n])
    await regions.copy_out_chunks(_chunks(b"ab", b"cd"), 4, ShmRef("gpu", 2, 4))
    assert bytes(target.numpy()) == b"\0\0abcd\0\0"

"""HTTP shared memory (OIP system and CUDA regions) staged through the node's pool.

A request naming regions has their bytes copied into pooled buffers on the region's
own device (one copy, device to device for CUDA), invoked by handle, and its outputs
copied into the regions asked for (or read out as values); the bytes never ride
the bus. Every lease taken here is released however the request ends.

The inputs are staged in this node's pool; a worker of another node reads them
through this node's broker. The function may have run on a worker of another node:
its outputs are then in that node's pool, which cannot be mapped here and whose
leases only that node's broker knows, so they are read through it in chunks (into
their region, or as values) and released there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio
import msgspec
from anyio.abc import TaskGroup

from services.ingress.oip import InferRequest
from services.ingress.shm_regions import ShmRegions
from shared.dataplane.client import BrokerClient, Brokers
from shared.errors import GfaasError
from shared.logs import get_logger
from shared.schema import (
    DEFAULT_TENANT,
    H_TENANT,
    ErrorCode,
    Handle,
    InvokeReply,
    InvokeRequest,
    OutputMode,
    Tensor,
)

log = get_logger("ingress.staging")

Invoke = Callable[[str, InvokeRequest, Mapping[str, str]], Awaitable[InvokeReply]]


T = TypeVar("T")


@dataclass
class _Call(Generic[T]):
    result: T | None = None
    error: Exception | None = None
    abandoned: bool = False


class ShmStaging:
    def __init__(
        self,
        broker: BrokerClient,
        regions: ShmRegions,
        holder: str,
        invoke: Invoke,
        tasks: Callable[[], TaskGroup | None] = lambda: None,
        *,
        brokers: Brokers | None = None,
    ) -> None:
        """`tasks`: ingress's long-lived task group, where invocations run (see _invoke);
        `brokers`: every node's broker, for outputs in another node's pool."""
        self.broker = broker
        self.brokers = brokers or Brokers(broker)
        self.regions = regions
        self.holder = holder
        self.invoke = invoke
        self.tasks = tasks

    async def infer(
        self, name: str, parsed: InferRequest, headers: Mapping[str, str]
    ) -> InvokeReply:
        """An OIP request naming shared-memory regions, system or CUDA: region bytes
        move into pooled buffers on the region's own device and back (one copy each
        way, device to device for CUDA), never over the bus."""
        tenant = headers.get(H_TENANT) or DEFAULT_TENANT
        regions = self.regions.of(tenant)  # only the caller's tenant's regions
        refs = parsed.shm_inputs
        staged: list[Handle] = []
        try:
            inputs = list(parsed.invoke.inputs)
            # Outputs' regions too, before the function runs: a region not registered,
            # or one a claimed size does not fit, was found only once it had run (the
            # work done, its side effects had, the caller kept waiting the whole call).
            for output in parsed.outputs or ():
                if output.shm is not None:
                    regions.check(output.shm)
            # One lease per device: host memory for system regions, the GPU for CUDA ones.
            by_device: dict[str, list[str]] = {}
            for t in inputs:
                if t.name in refs:
                    # Before leasing: a claimed size the region cannot hold must not make
                    # the broker create (and keep for its cool-down) a slab of that size.
                    regions.check(refs[t.name])
                    by_device.setdefault(regions.device(refs[t.name]), []).append(t.name)
            by_name: dict[str, Handle] = {}
            for device, names in by_device.items():
                sizes = [refs[n].byte_size for n in names]

                async def lease(sizes: list[int] = sizes, device: str = device) -> list[Handle]:
                    return await self.broker.lease(
                        sizes, owner=self.holder, device=device, tenant=tenant
                    )

                async def unlease(handles: list[Handle]) -> None:
                    await self.broker.release(handles, self.holder, tenant)

                try:
                    # Granted as the caller gives up, the leases must still be released.
                    leased = await self._outliving(lease, unlease, name)
                except GfaasError as exc:
                    if exc.code != ErrorCode.NO_POOL:
                        raise
                    raise GfaasError(
                        ErrorCode.BAD_REQUEST,
                        f"inputs in CUDA shared memory on {device} are staged in the node's "
                        f"pool there, and it has none: {exc.reason}",
                    ) from None
                staged += leased
                by_name.update(zip(names, leased, strict=True))
            for n, h in by_name.items():
                await regions.copy_in(refs[n], h)
            inputs = [
                msgspec.structs.replace(t, handle=by_name[t.name]) if t.name in by_name else t
                for t in inputs
            ]
            request = msgspec.structs.replace(
                parsed.invoke, inputs=inputs, outputs_by=OutputMode.HANDLE, holder=self.holder
            )
            reply = await self._invoke(name, request, headers, tenant)
            return await self._outputs_from_pool(reply, parsed, tenant)
        finally:
            if staged:
                with anyio.CancelScope(shield=True):
                    await self.broker.release(staged, self.holder, tenant)

    async def _invoke(
        self, name: str, request: InvokeRequest, headers: Mapping[str, str], tenant: str
    ) -> InvokeReply:
        """The invocation, outliving its caller (see _outliving): its outputs come back
        in buffers leased under this ingress's name, which only this request releases."""

        async def invoke() -> InvokeReply:
            return await self.invoke(name, request, headers)

        async def release(reply: InvokeReply) -> None:
            await self._release_outputs(reply, tenant)

        return await self._outliving(invoke, release, name)

    async def _outliving(
        self,
        call: Callable[[], Awaitable[T]],
        undo: Callable[[T], Awaitable[None]],
        function: str,
    ) -> T:
        """`call()` run in ingress's task group. What it brings is leased under this
        ingress's name (input buffers, an invocation's outputs), which only this
        request releases: a caller that gives up first (a gRPC deadline or cancel
        cancels its handler) would drop the answer still on its way and keep those
        buffers leased until their TTL, or for ingress's life. The call outlives it
        instead, and `undo` releases what it brought."""
        group = self.tasks()
        if group is None:
            return await call()
        box: _Call[T] = _Call()
        done = anyio.Event()

        async def run() -> None:
            try:
                box.result = await call()
            except Exception as exc:  # the waiter's to raise, as if it had awaited it
                box.error = exc
            finally:
                done.set()
            if box.abandoned and box.result is not None:
                try:
                    await undo(box.result)
                except Exception as exc:  # in ingress's group: must not end it
                    log.warning("staging.release_failed", function=function, error=repr(exc))

        group.start_soon(run)
        try:
            await done.wait()
        except BaseException:
            box.abandoned = True
            if box.result is not None:  # it came as the wait was cancelled
                with anyio.CancelScope(shield=True):
                    await undo(box.result)
            raise
        if box.error is not None:
            raise box.error
        if box.result is None:  # the group was cancelled: ingress is stopping
            raise GfaasError(ErrorCode.UNAVAILABLE, "ingress stopped during the invocation")
        return box.result

    async def _release_outputs(self, reply: InvokeReply, tenant: str) -> None:
        """Each at the broker of its node: the function may have run on another's."""
        handles = [t.handle for t in reply.outputs if t.handle is not None]
        if handles:
            await self.brokers.release(handles, self.holder, tenant)

    async def _outputs_from_pool(
        self, reply: InvokeReply, parsed: InferRequest, tenant: str
    ) -> InvokeReply:
        """Outputs asked for in shared memory (either kind) are written there; the rest
        become values."""
        handles = [t.handle for t in reply.outputs if t.handle is not None]
        wanted = {o.name: o.shm for o in parsed.outputs or () if o.shm is not None}
        regions = self.regions.of(tenant)
        try:
            outputs: list[Tensor] = []
            for t in reply.outputs:
                ref = wanted.get(t.name)
                if t.handle is None:
                    if ref is not None:
                        # Asked for by handle, it came by value: answering as if it
                        # were in the region would leave the caller its old bytes.
                        raise GfaasError(
                            ErrorCode.INTERNAL,
                            f"output {t.name!r} came back by value, not in the pool: "
                            "it was not written to its shared-memory region",
                        )
                    outputs.append(t)
                    continue
                if ref is not None:
                    if self.brokers.here(t.handle):
                        await regions.copy_out(t.handle, ref)
                    else:  # another node's pool: through its broker, chunk by chunk
                        chunks = self.brokers.read_chunks(t.handle, tenant)
                        await regions.copy_out_chunks(chunks, t.handle.nbytes, ref)
                    outputs.append(msgspec.structs.replace(t, handle=None))
                else:
                    data = await self.brokers.read(t.handle, tenant)
                    outputs.append(msgspec.structs.replace(t, handle=None, data=data))
            return msgspec.structs.replace(reply, outputs=outputs)
        finally:
            if handles:
                with anyio.CancelScope(shield=True):
                    await self._release_outputs(reply, tenant)

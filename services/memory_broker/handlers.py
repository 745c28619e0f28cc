"""The broker's operations: each from its typed request (and the caller's tenant) to
its typed reply, and the op table naming those types.

A refusal is a GfaasError; decoding requests by the table and turning refusals into
replies is the wiring's (app.py), once for every op, so nothing here knows about the
bus beyond the size of its messages.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from services.memory_broker.links import Links
from services.memory_broker.pools import NodePools
from shared import tracing
from shared.config import PAYLOAD_HEADROOM
from shared.dataplane.backend import tensor_from_handle
from shared.dataplane.client import (
    MAX_HANDLES_PER_REQUEST,
    MAX_LEASES_PER_REQUEST,
    check_count,
    check_reply_fits,
    handle_bound,
)
from shared.errors import GfaasError
from shared.schema import (
    BytesReply,
    CheckRequest,
    CopyRequest,
    ErrorCode,
    HandlesReply,
    LeaseRequest,
    ParkRequest,
    ReadRequest,
    ReleaseRequest,
    RetainRequest,
    TransferRequest,
    UnparkRequest,
)

R = TypeVar("R", bound=msgspec.Struct)
Reply = HandlesReply | BytesReply


@dataclass(frozen=True)
class Op(Generic[R]):
    """One broker operation: what it decodes, what it answers (also when refusing),
    what runs it, and whether it runs beside the others instead of in arrival order
    (copies take long)."""

    request: type[R]
    reply: type[Reply]
    run: Callable[[R, str], Awaitable[Reply]]
    concurrent: bool = False


class Handlers:
    def __init__(self, pools: NodePools, links: Links, *, max_payload: int) -> None:
        self.pools = pools
        self.links = links
        # The bus's message limit: replies are bounded by it before anything is done.
        self.max_payload = max_payload
        # Largest `read` chunk: what fits one reply on this server.
        self.max_read = max_payload - PAYLOAD_HEADROOM
        self.copies = 0

    def ops(self) -> dict[str, Op[Any]]:
        """The op table, by the last token of `gfaas.v1.broker.<node>.<op>`."""
        return {
            "lease": Op(LeaseRequest, HandlesReply, self.lease),
            "check": Op(CheckRequest, HandlesReply, self.check),
            "retain": Op(RetainRequest, HandlesReply, self.retain),
            "release": Op(ReleaseRequest, HandlesReply, self.release),
            "transfer": Op(TransferRequest, HandlesReply, self.transfer),
            "park": Op(ParkRequest, HandlesReply, self.park),
            "unpark": Op(UnparkRequest, HandlesReply, self.unpark),
            "copy": Op(CopyRequest, HandlesReply, self.copy, concurrent=True),
            "read": Op(ReadRequest, BytesReply, self.read),
        }

    async def lease(self, req: LeaseRequest, tenant: str) -> HandlesReply:
        # Bounded before anything is allocated: leases whose reply cannot be sent
        # would be held, unknown to anyone, until their TTL.
        # A lease under no name could be released by nobody (nor reclaimed).
        owner = _named(req.owner, "owner")
        check_count(len(req.sizes), MAX_LEASES_PER_REQUEST, "leases")
        check_count(len(req.check), MAX_HANDLES_PER_REQUEST, "handles to check")
        if not req.sizes or any(n < 0 for n in req.sizes):
            raise GfaasError(ErrorCode.BAD_REQUEST, f"lease sizes must be >= 0: {req.sizes}")
        per_handle = handle_bound(
            pool=self.pools.node,
            device=req.device,
            tenant=tenant,
            lease_id_len=len(self.pools.table.id_prefix) + 32,
        )
        check_reply_fits(len(req.sizes), per_handle, self.max_payload, "leases")
        self.pools.check(req.check, tenant)
        if req.retain:
            self.pools.retain(req.check, req.retain, tenant)
        try:
            handles = await self.pools.lease_or_spill(
                req.sizes, req.device, owner, tenant, req.ttl_s, time.monotonic()
            )
        except BaseException:
            if req.retain:  # all or none: no lease, no references
                for handle in req.check:
                    # One gone meanwhile (freed, expired) must not keep the others.
                    with contextlib.suppress(GfaasError):
                        self.pools.release([handle], req.retain, tenant, time.monotonic())
            raise
        return HandlesReply(handles=handles)

    async def check(self, req: CheckRequest, tenant: str) -> HandlesReply:
        check_count(len(req.handles), MAX_HANDLES_PER_REQUEST, "handles")
        self.pools.check(req.handles, tenant)
        if req.holder:  # the checked handles stay live while the holder reads them
            self.pools.retain(req.handles, req.holder, tenant)
        return HandlesReply()

    async def retain(self, req: RetainRequest, tenant: str) -> HandlesReply:
        check_count(len(req.handles), MAX_HANDLES_PER_REQUEST, "handles")
        self.pools.retain(req.handles, _named(req.holder, "holder"), tenant)
        return HandlesReply()

    async def release(self, req: ReleaseRequest, tenant: str) -> HandlesReply:
        check_count(len(req.handles), MAX_HANDLES_PER_REQUEST, "handles")
        self.pools.release(req.handles, _named(req.holder, "holder"), tenant, time.monotonic())
        return HandlesReply()

    async def transfer(self, req: TransferRequest, tenant: str) -> HandlesReply:
        check_count(len(req.handles), MAX_HANDLES_PER_REQUEST, "handles")
        self.pools.transfer(req.handles, _named(req.holder, "holder"), _named(req.to, "to"), tenant)
        return HandlesReply()

    async def park(self, req: ParkRequest, tenant: str) -> HandlesReply:
        check_count(len(req.handles), MAX_HANDLES_PER_REQUEST, "handles")
        now = time.monotonic()
        next_use = now + req.next_use_s if req.next_use_s >= 0 else math.inf
        self.pools.park(req.handles, _named(req.holder, "holder"), tenant, next_use)
        return HandlesReply()

    async def unpark(self, req: UnparkRequest, tenant: str) -> HandlesReply:
        check_count(len(req.handles), MAX_HANDLES_PER_REQUEST, "handles")
        holder = _named(req.holder, "holder")
        return HandlesReply(handles=await self.pools.unpark(req.handles, holder, tenant))

    async def read(self, req: ReadRequest, tenant: str) -> BytesReply:
        """A slice of a lease's bytes, for a consumer on another node."""
        self.pools.check([req.handle], tenant)
        h = req.handle
        end = h.nbytes if req.nbytes < 0 else req.offset + req.nbytes
        if req.offset < 0 or end > h.nbytes or end < req.offset:
            raise GfaasError(
                ErrorCode.BAD_REQUEST,
                f"read [{req.offset}, {end}) is outside the handle's {h.nbytes} bytes",
            )
        if end - req.offset > self.max_read:
            raise GfaasError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"read of {end - req.offset} bytes exceeds {self.max_read}; read in chunks",
            )
        view = tensor_from_handle(h, "uint8", [h.nbytes])[req.offset : end]
        return BytesReply(data=bytes(view.cpu().numpy()))

    async def copy(self, req: CopyRequest, tenant: str) -> HandlesReply:
        """Leased bytes to a new lease on another device, through the link's scheduler.

        Both blocks are pinned until the copier is done with them: a source released
        (or expired, reclaimed) meanwhile keeps its block, so nobody else is leased
        there while its bytes are still being read out for this tenant."""
        owner = _named(req.owner, "owner")  # as for `lease`: else nobody releases it
        if not 0 < req.weight < math.inf:  # NaN too: it would win every turn of the link
            raise GfaasError(
                ErrorCode.BAD_REQUEST, f"copy weight must be positive and finite: {req.weight}"
            )
        for key, ms in (("budget_ms", req.budget_ms), ("compute_ms", req.compute_ms)):
            if not 0 <= ms < math.inf:  # NaN too: a budget it makes spent takes the link
                raise GfaasError(
                    ErrorCode.BAD_REQUEST, f"copy {key} must be zero or more, and finite: {ms}"
                )
        table = self.pools.table
        source = self.pools.lease_of(req.source, tenant)  # may the tenant read it here?
        now = time.monotonic()
        (dst,) = self.pools.lease([req.source.nbytes], req.device, owner, tenant, 0.0, now)
        table.pin(source.lease_id)
        table.pin(dst.lease_id)
        try:
            # The transfer over the link, inside the op's span.
            with tracing.tracer().start_as_current_span(
                "broker link copy",
                attributes={
                    "gfaas.bytes": req.source.nbytes,
                    "gfaas.from_device": req.source.device,
                    "gfaas.to_device": req.device,
                },
            ):
                await self.links.copy(
                    req.source,
                    dst,
                    weight=req.weight,
                    flow=req.flow or owner,
                    budget_s=req.budget_ms / 1000.0,
                    compute_s=req.compute_ms / 1000.0,
                )
            # The destination lives until its TTL under the owner's name, which nobody
            # else knows its id to release; a handle to a lease gone meanwhile is no use.
            self.pools.table.check(dst, tenant)
        except BaseException:
            with contextlib.suppress(GfaasError):  # it may have gone meanwhile
                self.pools.release([dst], owner, tenant, time.monotonic())
            raise
        finally:
            table.unpin(source.lease_id)
            table.unpin(dst.lease_id)
        self.copies += 1
        return HandlesReply(handles=[dst])


def _named(value: str, what: str) -> str:
    if not value:
        raise GfaasError(ErrorCode.BAD_REQUEST, f"{what} must be named")
    return value

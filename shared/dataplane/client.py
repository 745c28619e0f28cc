"""The memory broker's requests over NATS, and moving tensors in and out of leases.

Workers, ingress (workflows) and the Python client use this; none of them imports
the broker's modules. Every operation is one request on `gfaas.v1.broker.<node>.<op>`
carrying the tenant in a header, answered with a HandlesReply (a BytesReply for
`read`); a refusal comes back as a GfaasError with the broker's reason.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import nats.errors
import numpy as np
from nats.aio.client import Client as NATS

from shared import subjects, tracing
from shared.config import PAYLOAD_HEADROOM
from shared.dataplane.backend import BackendError, tensor_from_handle
from shared.dataplane.board import BoardReader
from shared.dataplane.leases import LeaseError
from shared.errors import GfaasError
from shared.schema import (
    DEFAULT_TENANT,
    H_TENANT,
    BytesReply,
    CheckRequest,
    CopyRequest,
    DType,
    ErrorCode,
    Handle,
    HandlesReply,
    LeaseRequest,
    ParkRequest,
    ReadRequest,
    ReleaseRequest,
    RetainRequest,
    Tensor,
    TransferRequest,
    UnparkRequest,
    decode,
    encode,
    is_valid_token,
)

if TYPE_CHECKING:
    import torch

Reply = TypeVar("Reply", HandlesReply, BytesReply)

# Most leases one lease request may ask for, and most handles one request may name
# (a lease's `check`, retain, release, ...). Every lease comes back as a handle of a
# few hundred bytes in one reply: a broker that allocated more than a message can
# carry could not answer, and would hold the leases until their TTL.
MAX_LEASES_PER_REQUEST = 1024
MAX_HANDLES_PER_REQUEST = 1024
# The longest field values a broker puts in a handle, for bounding a reply before
# anything is allocated: shared-memory names are at most 201 characters and a CUDA
# IPC handle is 128 hex digits; lease ids are the broker's instance (node, host,
# pid) and 32 random hex digits.
_SEGMENT_MAX = 201
_LEASE_ID_MAX = 160
_INT_MAX = 2**63 - 1
# A HandlesReply's own bytes around its handles (the map, the list header, an error).
_REPLY_ENVELOPE = 512
# How often a client checks that the board's name still names the board it maps (a
# stat), besides the retired mark it reads on every check.
BOARD_RECHECK_S = 1.0


def handle_bound(*, pool: str, device: str, tenant: str, lease_id_len: int = _LEASE_ID_MAX) -> int:
    """The most bytes one encoded handle for `tenant` on `pool`/`device` can take."""
    worst = Handle(
        backend="x" * 8,
        pool=pool,
        segment="x" * _SEGMENT_MAX,
        device=device,
        offset=_INT_MAX,
        nbytes=_INT_MAX,
        lease_id="x" * lease_id_len,
        generation=_INT_MAX,
        tenant=tenant or "x",
        slab_size=_INT_MAX,
        slot=_INT_MAX,
    )
    return len(encode(worst))


def check_count(count: int, limit: int, what: str) -> None:
    """Refuse (bad_request, naming the limit) a request naming more than `limit` items."""
    if count > limit:
        raise GfaasError(
            ErrorCode.BAD_REQUEST,
            f"{count} {what} in one broker request; the limit is {limit} per request",
        )


def check_reply_fits(count: int, per_handle: int, max_payload: int, what: str) -> None:
    """Refuse (bad_request, naming the limit) a request whose reply of `count` handles
    could exceed one message of `max_payload` bytes."""
    need = _REPLY_ENVELOPE + count * per_handle
    if need > max_payload:
        fits = max(0, (max_payload - _REPLY_ENVELOPE) // per_handle)
        raise GfaasError(
            ErrorCode.BAD_REQUEST,
            f"{count} {what}: the reply could take {need} bytes, over the bus's "
            f"{max_payload}-byte message limit; ask for at most {fits} per request",
        )


class NoBroker(GfaasError):
    """No memory broker runs on the node asked (none subscribed: not up yet, gone, or
    a node that never had one), as against one that is slow to answer."""

    def __init__(self, node: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, f"no memory broker is running on node {node!r}")


class BrokerClient:
    def __init__(self, nc: NATS, node: str, *, timeout: float = 5.0, board: str = "") -> None:
        """`board`: the node's lease board (`board_name`), to verify handles locally."""
        if not is_valid_token(node):
            # A node comes from a handle's `pool` off the wire: the caller's mistake.
            raise GfaasError(ErrorCode.BAD_REQUEST, f"a handle's pool {node!r} is not a node name")
        self.nc = nc
        self.node = node
        self.timeout = timeout
        self._board_name = board
        self._board: BoardReader | None = None
        self._board_recheck_at = 0.0
        self.local_checks = 0
        self.remote_checks = 0

    def unverified(self, handles: Sequence[Handle], tenant: str) -> list[Handle]:
        """The handles the lease board cannot vouch for; only these need the broker.

        The board only ever says yes: any doubt (no board, a reused slot, another
        tenant) leaves the handle to the broker, whose answer is authoritative."""
        board = self._reader()
        if board is None:
            return list(handles)
        doubtful: list[Handle] = []
        for handle in handles:
            try:
                board.verify(handle, tenant)
            except LeaseError:
                doubtful.append(handle)
        if doubtful and board.replaced():
            # A board made anew under its name that nobody could retire: map that one.
            self._drop_board()
        self.local_checks += len(handles) - len(doubtful)
        return doubtful

    def _reader(self) -> BoardReader | None:
        """The board, mapped; None when there is none. A board its broker retired (it
        shut down, or a restarted one made a new board: the old mapping still shows
        the dead broker's leases) is dropped and the current one mapped."""
        board = self._board
        if board is not None:
            now = time.monotonic()
            if board.retired or (now >= self._board_recheck_at and board.replaced()):
                self._drop_board()
            elif now >= self._board_recheck_at:
                self._board_recheck_at = now + BOARD_RECHECK_S
        if self._board is None and self._board_name:
            try:
                self._board = BoardReader.open(self._board_name)
            except BackendError:
                return None
            self._board_recheck_at = time.monotonic() + BOARD_RECHECK_S
        return self._board

    def _drop_board(self) -> None:
        if self._board is not None:
            self._board.close()
            self._board = None

    async def lease(
        self,
        sizes: Sequence[int],
        *,
        owner: str,
        device: str = "cpu",
        tenant: str = DEFAULT_TENANT,
        ttl_s: float = 0.0,
        check: Sequence[Handle] = (),
        retain: str = "",
    ) -> list[Handle]:
        """Pooled buffers, one per size; `check` handles are checked first (one trip),
        and with `retain` each also gets one reference of that holder (see `check`)."""
        # Refused here, before anything is sent: the broker would refuse it too.
        check_count(len(sizes), MAX_LEASES_PER_REQUEST, "leases")
        check_count(len(check), MAX_HANDLES_PER_REQUEST, "handles to check")
        per_handle = handle_bound(pool=self.node, device=device, tenant=tenant)
        check_reply_fits(len(sizes), per_handle, self.nc.max_payload, "leases")
        # The board cannot take a reference: handles to retain all go to the broker.
        doubtful = list(check) if retain else self.unverified(check, tenant)
        self.remote_checks += len(doubtful)
        request = LeaseRequest(
            sizes=list(sizes),
            device=device,
            owner=owner,
            ttl_s=ttl_s,
            check=doubtful,
            retain=retain,
        )
        return await self._call("lease", request, tenant)

    async def check(self, handles: Sequence[Handle], tenant: str, *, retain: str = "") -> None:
        """Raise GfaasError unless `tenant` may read every handle.

        With `retain`, the broker also takes one reference of that holder on each (all
        or none), so nobody's release frees them while the holder reads; the holder
        releases them after. That needs the broker, so the board is not asked."""
        check_count(len(handles), MAX_HANDLES_PER_REQUEST, "handles")
        doubtful = list(handles) if retain else self.unverified(handles, tenant)
        if doubtful:
            self.remote_checks += len(doubtful)
            await self._call("check", CheckRequest(handles=doubtful, holder=retain), tenant)

    async def retain(self, handles: Sequence[Handle], holder: str, tenant: str) -> None:
        check_count(len(handles), MAX_HANDLES_PER_REQUEST, "handles")
        await self._call("retain", RetainRequest(handles=list(handles), holder=holder), tenant)

    async def release(
        self, handles: Sequence[Handle], holder: str, tenant: str, *, wait: bool = True
    ) -> None:
        """Drop `holder`'s references. `wait=False` publishes without waiting: the
        broker handles its requests in order, so nothing sent later overtakes it."""
        request = ReleaseRequest(handles=list(handles), holder=holder)
        await self._send("release", request, tenant, wait)

    async def transfer(
        self, handles: Sequence[Handle], holder: str, to: str, tenant: str, *, wait: bool = True
    ) -> None:
        """Move `holder`'s references to `to` (see `release` for `wait`)."""
        request = TransferRequest(handles=list(handles), holder=holder, to=to)
        await self._send("transfer", request, tenant, wait)

    async def park(
        self,
        handles: Sequence[Handle],
        holder: str,
        tenant: str,
        *,
        next_use_s: float = -1.0,
        wait: bool = True,
    ) -> None:
        """Nobody reads these until `holder` unparks them; the next reader is due in
        `next_use_s` (-1: not known). The broker may spill them to host memory when
        their device fills, and brings back first what is due first."""
        request = ParkRequest(handles=list(handles), holder=holder, next_use_s=next_use_s)
        await self._send("park", request, tenant, wait)

    async def unpark(self, handles: Sequence[Handle], holder: str, tenant: str) -> list[Handle]:
        """Readable again: the handles where the bytes are now (they may have moved)."""
        check_count(len(handles), MAX_HANDLES_PER_REQUEST, "handles")
        request = UnparkRequest(handles=list(handles), holder=holder)
        return await self._call("unpark", request, tenant)

    async def _send(
        self,
        op: str,
        request: ReleaseRequest | TransferRequest | ParkRequest,
        tenant: str,
        wait: bool,
    ) -> None:
        check_count(len(request.handles), MAX_HANDLES_PER_REQUEST, "handles")
        if wait:
            await self._call(op, request, tenant)
        else:
            subject = subjects.broker(self.node, op)
            # The caller's trace context: the broker's span of the op joins its trace.
            headers = tracing.inject({H_TENANT: tenant})
            await self.nc.publish(subject, encode(request), headers=headers)

    async def copy(self, request: CopyRequest, tenant: str) -> Handle:
        (handle,) = await self._call("copy", request, tenant)
        return handle

    async def read(self, handle: Handle, tenant: str, *, chunk: int) -> bytes:
        """A lease's bytes in messages of at most `chunk` bytes: the fallback for a
        consumer on another node, which cannot map this node's pool."""
        return b"".join([part async for part in self.read_chunks(handle, tenant, chunk=chunk)])

    async def read_chunks(
        self, handle: Handle, tenant: str, *, chunk: int
    ) -> AsyncGenerator[bytes, None]:
        """A lease's bytes in order, one message of at most `chunk` bytes at a time (for
        a consumer that writes each where it goes, never holding them all)."""
        chunk = max(chunk, 1)
        for offset in range(0, handle.nbytes, chunk):
            n = min(chunk, handle.nbytes - offset)
            request = ReadRequest(handle=handle, offset=offset, nbytes=n)
            data = (await self._request("read", request, tenant, BytesReply)).data
            if len(data) != n:
                raise GfaasError(
                    ErrorCode.INTERNAL,
                    f"memory broker {self.node!r} answered {len(data)} bytes for a read "
                    f"of {n} at offset {offset}",
                )
            yield data

    async def _call(self, op: str, request: Any, tenant: str) -> list[Handle]:
        return (await self._request(op, request, tenant, HandlesReply)).handles

    async def _request(self, op: str, request: Any, tenant: str, kind: type[Reply]) -> Reply:
        subject = subjects.broker(self.node, op)
        try:
            msg = await self.nc.request(
                subject,
                encode(request),
                timeout=self.timeout,
                headers=tracing.inject({H_TENANT: tenant}),
            )
        # A broker not running (not up yet, restarting) or not answering is a service
        # the call needs that is missing, not a fault inside gfaas nor the caller's:
        # `unavailable` (HTTP 503, gRPC UNAVAILABLE), which callers may retry.
        except nats.errors.NoRespondersError:
            raise NoBroker(self.node) from None
        except nats.errors.TimeoutError:
            raise GfaasError(
                ErrorCode.UNAVAILABLE, f"memory broker {self.node!r} did not answer {op}"
            ) from None
        try:
            reply = decode(msg.data, kind)
        except msgspec.MsgspecError as exc:
            raise GfaasError(ErrorCode.INTERNAL, f"bad broker reply: {exc}") from None
        if reply.error is not None:
            raise GfaasError.from_info(reply.error)
        return reply


def by_pool(handles: Sequence[Handle]) -> dict[str, list[Handle]]:
    """`handles` by the node whose pool holds them (`Handle.pool`)."""
    found: dict[str, list[Handle]] = {}
    for handle in handles:
        found.setdefault(handle.pool, []).append(handle)
    return found


class Brokers:
    """Every node's broker as seen from one service, by the node a handle names.

    A lease is known only to the broker of the node whose pool holds it, and that
    pool can be mapped only there: a function (or a workflow's stage) run by a worker
    of another node leaves its outputs in that node's pool. So each op on a handle
    goes to `of(handle.pool)`, and its bytes are read in place when the pool is this
    node's, through that node's broker in chunks when it is not."""

    def __init__(self, local: BrokerClient, *, read_chunk: int = 0) -> None:
        """`read_chunk`: the most bytes one read of another node's lease asks for
        (0: the bus's limit, less room for headers, as the brokers' own limit)."""
        self.local = local
        self._read_chunk = read_chunk
        self._others: dict[str, BrokerClient] = {}

    @property
    def read_chunk(self) -> int:
        if not self._read_chunk:
            self._read_chunk = max(self.local.nc.max_payload - PAYLOAD_HEADROOM, 1)
        return self._read_chunk

    def of(self, pool: str) -> BrokerClient:
        """The broker of the node whose pool is `pool` (a handle's `pool`)."""
        if not pool or pool == self.local.node:
            return self.local
        found = self._others.get(pool)
        if found is None:
            found = self._others[pool] = BrokerClient(self.local.nc, pool)
        return found

    def here(self, handle: Handle) -> bool:
        """Whether the handle's pool is this node's (its bytes can be mapped here)."""
        return self.of(handle.pool) is self.local

    async def release(
        self, handles: Sequence[Handle], holder: str, tenant: str, *, wait: bool = True
    ) -> None:
        """Drop `holder`'s references on `handles`, each at its own node's broker, in
        as many requests as the broker's limit per request takes."""
        for pool, group in by_pool(handles).items():
            for start in range(0, len(group), MAX_HANDLES_PER_REQUEST):
                chunk = group[start : start + MAX_HANDLES_PER_REQUEST]
                await self.of(pool).release(chunk, holder, tenant, wait=wait)

    async def read(self, handle: Handle, tenant: str) -> bytes:
        """A lease's bytes: in place on this node, through its node's broker otherwise."""
        if self.here(handle):
            return read_bytes(handle).tobytes()
        return await self.of(handle.pool).read(handle, tenant, chunk=self.read_chunk)

    def read_chunks(self, handle: Handle, tenant: str) -> AsyncGenerator[bytes, None]:
        """Another node's lease's bytes in order, in chunks, through its broker."""
        return self.of(handle.pool).read_chunks(handle, tenant, chunk=self.read_chunk)


def open_tensor(t: Tensor) -> torch.Tensor:
    """A zero-copy view of a by-handle tensor (check the lease with the broker first).

    Handle inputs are shared with every other consumer of the same output (fan-out):
    handlers treat them as read-only.
    """
    assert t.handle is not None
    try:
        return tensor_from_handle(t.handle, t.dtype, t.shape)
    except BackendError as exc:
        raise GfaasError(ErrorCode.INVALID_INPUT, f"input {t.name!r}: {exc}") from None


def read_bytes(handle: Handle) -> np.ndarray[Any, Any]:
    """A lease's bytes on the host: a zero-copy view of host memory, a copy off a GPU."""
    host: np.ndarray[Any, Any] = tensor_from_handle(handle, "uint8", [handle.nbytes]).cpu().numpy()
    return host


def write_bytes(handle: Handle, data: Any) -> None:
    """Copy `data` (anything with the buffer protocol, `handle.nbytes` long) into the lease."""
    view = tensor_from_handle(handle, "uint8", [handle.nbytes])
    source = np.frombuffer(data, np.uint8)
    if view.device.type == "cpu":
        view.numpy()[:] = source
    else:
        import torch

        view.copy_(torch.from_numpy(source.copy()))


def move_into(handle: Handle, t: Tensor) -> Tensor:
    """A by-value wire tensor's bytes copied into a leased buffer, as a by-handle tensor."""
    write_bytes(handle, t.data)
    return Tensor(name=t.name, dtype=t.dtype, shape=t.shape, handle=handle)


def write_into(handle: Handle, name: str, value: torch.Tensor, dtype: DType) -> Tensor:
    """Copy `value` into the leased buffer and describe it as a by-handle tensor.

    A value that already is the view of this lease (a handler that wrote its output
    straight into the buffer) is not copied again.
    """
    shape = list(value.shape)
    view = tensor_from_handle(handle, dtype, shape)
    if view.numel() and view.data_ptr() != value.data_ptr():
        view.copy_(value.reshape(view.shape))
    return Tensor(name=name, dtype=dtype, shape=shape, handle=handle)

"""NATS connection lifetime and the few publish helpers every service shares."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import anyio
import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared import __version__, metrics, subjects
from shared.config import Settings, nats_servers
from shared.logs import get_logger
from shared.schema import (
    H_INVOCATION,
    H_REPLY,
    H_STATUS,
    RESERVED_REPLY_PREFIX,
    ErrorCode,
    InvocationMeta,
    InvokeReply,
    ServiceStatus,
    decode,
    encode,
    error_reply,
)

log = get_logger("bus")

DRAIN_TIMEOUT_S = 5.0

E = TypeVar("E", bound=msgspec.Struct)


async def _connect_once(url: str, name: str, options: Mapping[str, Any]) -> NATS:
    async def on_error(exc: Exception) -> None:
        log.warning("nats.error", client=name, error=repr(exc))

    async def on_disconnect() -> None:
        log.info("nats.disconnected", client=name)

    async def on_reconnect() -> None:
        log.info("nats.reconnected", client=name)

    return await nats.connect(
        # Every server of a cluster: the client fails over to another when its own goes.
        servers=nats_servers(url),
        name=name,
        connect_timeout=2,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **options,
    )


@asynccontextmanager
async def connected(
    url: str, name: str, *, wait_s: float = 30.0, settings: Settings | None = None
) -> AsyncIterator[NATS]:
    """A connection that waits for the server at start (compose starts us in any order)
    and is drained on exit: subscriptions stop, pending messages are handled, then close.

    `url` may list a cluster's servers comma-separated; reconnects go on forever,
    to whichever of them answers. `settings` gives the service's NATS identity and
    TLS (shared.auth.connect_options)."""
    from shared.auth import settings_connect_options

    options = settings_connect_options(settings) if settings is not None else {}
    deadline = time.monotonic() + wait_s
    while True:
        try:
            nc = await _connect_once(url, name, options)
            break
        except (OSError, nats.errors.NoServersError, nats.errors.TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise ConnectionError(f"cannot reach NATS at {url}: {exc}") from exc
            await anyio.sleep(0.25)
    try:
        yield nc
    finally:
        with anyio.move_on_after(DRAIN_TIMEOUT_S, shield=True):
            if not nc.is_closed:
                try:
                    await nc.drain()
                except Exception as exc:  # closing anyway; a drain error must not mask others
                    log.warning("nats.drain_failed", client=name, error=repr(exc))
                    await _close_undrained(nc)
        if not nc.is_closed:
            # The drain ran out of time (a handler still busy): cancelled, it never
            # reaches its close, and the connection stayed up, its subscriptions
            # still taking messages for a service that had stopped.
            log.warning("nats.drain_timeout", client=name, timeout_s=DRAIN_TIMEOUT_S)
            with anyio.move_on_after(DRAIN_TIMEOUT_S, shield=True):
                await _close_undrained(nc)


async def _close_undrained(nc: NATS) -> None:
    """Close a connection that could not be drained, typically one reconnecting
    through a bus outage (nats-py refuses to drain those)."""
    if not nc.is_connected:
        # What was published during the outage waits for a reconnect that is not
        # coming now. nats-py's close writes it to the dead socket's transport, which
        # uvloop (our loop) refuses with a RuntimeError: the close stopped half-way
        # (subscription tasks left running) and every stop during an outage ended
        # in a traceback. It could not be delivered anyway.
        nc._pending.clear()
        nc._pending_data_size = 0
    await nc.close()


async def send_reply(
    nc: NATS,
    subject: str,
    reply: InvokeReply,
    *,
    max_payload: int,
    headers: Mapping[str, str] | None = None,
) -> int:
    """Publish an InvokeReply; an oversize one becomes a payload_too_large error.

    nats-py reports an oversize publish as a timeout on the caller's side, never to
    the publisher, so the size is checked here.
    """
    body = encode(reply)
    if len(body) > max_payload:
        body = encode(
            error_reply(
                reply.invocation_id,
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"reply of {len(body)} bytes exceeds the {max_payload}-byte limit; "
                "large outputs move by handle",
            )
        )
        reply = InvokeReply(invocation_id=reply.invocation_id)  # for the status header
        status = "error"
    else:
        status = "error" if reply.error else "ok"
    out = {H_INVOCATION: reply.invocation_id, H_STATUS: status}
    if headers:
        out.update(headers)
    await nc.publish(subject, body, headers=out)
    return len(body)


def header_bytes(headers: Mapping[str, str]) -> int:
    """The size of `headers` on the wire (nats-py's NATS/1.0 block): the server counts
    it with the body against max_payload, and closes the connection of a publish
    past it."""
    return len(b"NATS/1.0\r\n\r\n") + sum(
        len(k.encode()) + len(v.encode()) + len(b": \r\n") for k, v in headers.items()
    )


def decode_event(msg: Msg, kind: type[E]) -> E | None:
    """An internal event's body, or None (logged) when it does not decode: nobody
    waits for an answer, and a bad event must not stop its subscriber."""
    try:
        return decode(msg.data, kind)
    except msgspec.MsgspecError as exc:
        log.warning("event.malformed", subject=msg.subject, kind=kind.__name__, error=str(exc))
        return None


def on_event(
    kind: type[E], handle: Callable[[E], Awaitable[None]]
) -> Callable[[Msg], Awaitable[None]]:
    """A subscription callback that decodes one kind of event (a malformed one is
    logged and dropped, as decode_event does) and hands it to a handler."""

    async def callback(msg: Msg) -> None:
        event = decode_event(msg, kind)
        if event is not None:
            await handle(event)

    return callback


async def reply_error(
    nc: NATS,
    subject: str,
    invocation_id: str,
    code: ErrorCode,
    reason: str,
    *,
    headers: Mapping[str, str] | None = None,
) -> None:
    if not subject:
        log.info("error.no_reply_subject", code=code, reason=reason)
        return
    out = {H_INVOCATION: invocation_id, H_STATUS: "error"}
    if headers:
        out.update(headers)
    await nc.publish(subject, encode(error_reply(invocation_id, code, reason)), headers=out)


def reply_of(msg: Msg) -> str:
    """Where an invocation's answer goes: its reply subject, or the reserved one a
    forwarder carried in `H_REPLY` (only a service import's reply subject is taken
    from there, so the header cannot aim an answer anywhere else)."""
    if msg.reply:
        return msg.reply
    carried = (msg.headers or {}).get(H_REPLY, "")
    return carried if carried.startswith(RESERVED_REPLY_PREFIX) else ""


async def routed(nc: NATS, msg: Msg) -> InvocationMeta | None:
    """An internal invocation message's routing headers (past ingress: the scheduler's
    and workers' intake), or None once it was answered `bad_request` for them."""
    try:
        meta = InvocationMeta.from_headers(msg.headers)
        bad = meta.routing_problem()
    except ValueError as exc:
        bad = str(exc)
    if not bad:
        return meta
    iid = (msg.headers or {}).get(H_INVOCATION, "")
    await reply_error(nc, reply_of(msg), iid, ErrorCode.BAD_REQUEST, bad)
    return None


async def serve_status(
    nc: NATS,
    service: str,
    instance: str,
    details: Callable[[], dict[str, Any]],
) -> Subscription:
    """Answer `gfaas.v1.status.<service>`: every instance answers, each naming itself
    (`Client.statuses` gathers them)."""
    started = time.monotonic()

    async def on_request(msg: Msg) -> None:
        status = ServiceStatus(
            service=service,
            instance=instance,
            version=__version__,
            uptime_s=round(time.monotonic() - started, 3),
            # Every service's status says where its metrics are (shared.metrics).
            details={**details(), "metrics_port": metrics.port_of(service, instance)},
        )
        await msg.respond(encode(status))

    return await nc.subscribe(subjects.status(service), cb=on_request)


class BusHealth:
    """Whether this service has been hearing the bus lately, from its own beats echoed
    back to it: a peer that fell silent only while we heard nobody (NATS down, our
    connection re-establishing) is not known to be dead.

    `heard_self` on each own echo received; `silence(since, now)` counts a peer's
    silence only from when the bus last came back."""

    def __init__(self, period_s: float, on_back: Callable[[float], None] | None = None) -> None:
        self.period_s = period_s
        self.gap_s = 3.0 * period_s
        self.last: float | None = None
        self.back_at = 0.0
        # Called when the bus comes back after a silence: peers' last-heard times
        # should not count the silence against them.
        self.on_back = on_back

    def heard_self(self, now: float) -> None:
        if self.last is None or now - self.last > self.gap_s:
            self.back_at = now
            if self.last is not None and self.on_back is not None:
                self.on_back(now)
        self.last = now

    def healthy(self, now: float) -> bool:
        return self.last is not None and now - self.last <= self.gap_s

    def silence(self, since: float, now: float) -> float:
        """How long a peer last heard at `since` has been silent while the bus was
        up: 0 while it is not."""
        if not self.healthy(now):
            return 0.0
        return now - max(since, self.back_at)


async def watch_bus(nc: NATS, health: BusHealth, instance: str) -> None:
    """Echo to ourselves every period, feeding `health`; runs until cancelled."""

    async def on_echo(_msg: Msg) -> None:
        health.heard_self(time.monotonic())

    sub = await nc.subscribe(subjects.echo(instance), cb=on_echo)
    try:
        while True:
            await nc.publish(subjects.echo(instance), b"")
            await anyio.sleep(health.period_s)
    finally:
        with anyio.CancelScope(shield=True):
            await sub.unsubscribe()


class NoResponders(Exception):
    """Nobody subscribes to the subject a request went to."""


class Bus(Protocol):
    """What a service's handlers may do on the bus (NatsBus is it; tests pass fakes)."""

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        reply: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None: ...

    async def request(
        self, subject: str, data: bytes, *, timeout: float, headers: Mapping[str, str] | None = None
    ) -> bytes:
        """The reply's body; raises NoResponders or TimeoutError."""
        ...

    async def reply_error(
        self, subject: str, invocation_id: str, code: ErrorCode, reason: str
    ) -> None: ...


class NatsBus:
    """The few bus operations handlers need, so that they never import nats: publish,
    request-reply (raising NoResponders or TimeoutError) and error replies."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        reply: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        out = dict(headers or {})
        if reply.startswith(RESERVED_REPLY_PREFIX):
            # The server would refuse it as our reply; the receiver finds it here.
            out[H_REPLY] = reply
            reply = ""
        await self.nc.publish(subject, data, reply=reply, headers=out or None)

    async def request(
        self, subject: str, data: bytes, *, timeout: float, headers: Mapping[str, str] | None = None
    ) -> bytes:
        try:
            msg = await self.nc.request(subject, data, timeout=timeout, headers=dict(headers or {}))
        except nats.errors.NoRespondersError:
            raise NoResponders(subject) from None
        except nats.errors.TimeoutError:
            raise TimeoutError(f"no reply on {subject} within {timeout:.3f}s") from None
        return msg.data

    async def reply_error(
        self, subject: str, invocation_id: str, code: ErrorCode, reason: str
    ) -> None:
        await reply_error(self.nc, subject, invocation_id, code, reason)

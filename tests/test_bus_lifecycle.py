"""shared.bus.connected's exit: the connection is closed, whatever state the bus is in."""

from __future__ import annotations

import anyio
import pytest
from nats.aio.msg import Msg

from shared import bus
from shared.bus import connected
from shared.natsd import NatsServer

pytestmark = [pytest.mark.nats, pytest.mark.anyio]


# The services run on uvloop (shared.service.backend_options), whose transports refuse
# writes once closed, where asyncio's ignore them.
@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})])
async def test_leaving_a_connection_while_the_bus_is_down_closes_it(
    nats_server: NatsServer,
) -> None:
    async with connected(nats_server.url, "test-outage") as nc:

        async def on_msg(_msg: object) -> None:
            pass

        sub = await nc.subscribe("test.outage", cb=on_msg)
        nats_server.kill()
        with anyio.fail_after(5):
            while nc.is_connected:
                await anyio.sleep(0.05)
        # Published during the outage: buffered for a reconnect that will not come.
        await nc.publish("test.outage", b"beat")
    # SIGTERM during an outage: leaving must not raise (a traceback at every stop)
    # and must close the connection, its subscriptions' tasks with it.
    assert nc.is_closed
    await anyio.sleep(0.1)  # the close cancels them; they end at their next step
    assert sub._wait_for_msgs_task is None or sub._wait_for_msgs_task.done()


async def test_a_drain_that_runs_out_of_time_still_closes_the_connection(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bus, "DRAIN_TIMEOUT_S", 0.5)
    handled: list[bytes] = []
    async with connected(nats_server.url, "test-slow-drain") as nc:

        async def on_msg(msg: Msg) -> None:
            handled.append(msg.data)
            await anyio.sleep(30)  # a handler busier than the drain waits for

        await nc.subscribe("test.slow", cb=on_msg)
        await nc.publish("test.slow", b"first")
        with anyio.fail_after(5):
            while not handled:
                await anyio.sleep(0.02)
    # Closed, not left up taking messages for a service that stopped.
    assert nc.is_closed

"""Direct sends: the scheduler lends an ingress worker slots for a warm function,
and ingress sends that function's invocations straight to the worker.

Against the real server and services: invocations of a warm function skip the
scheduler and still answer; work that must queue takes the lent slots back; a
worker that dies with direct invocations on it has its callers answered."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from nats.aio.client import Client as NATS

from gfaas.client import Client
from shared.natsd import NatsServer
from shared.scheduling.grants import HOT_CALLS
from tests.helpers import body, deploy_and_wait, kill_mid_call, request, wait_for_worker
from tests.platform import Platform, doomed_platform, platform_at
from tests.specs import ECHO, SLEEP

pytestmark = [pytest.mark.nats, pytest.mark.anyio]


async def warm_up(nc: NATS, function: str, data: bytes) -> Any:
    """Calls enough to make `function` hot (grants are for hot functions only)."""
    for _ in range(HOT_CALLS):
        _, reply = await request(nc, function, data)
        assert "error" not in reply, reply
    return reply


async def details(client: Client, service: str) -> dict[str, Any]:
    return (await client.status(service)).details


async def test_a_warm_function_goes_straight_to_its_worker(platform: Platform, nc: NATS) -> None:
    client = Client(nc)
    await deploy_and_wait(nc, ECHO)
    for i in range(20):
        _, reply = await request(nc, "echo", body(x=np.full(3, i, np.float32)))
        assert "error" not in reply, reply
        assert np.frombuffer(reply["outputs"][0]["data"], np.float32).tolist() == [i] * 3
    ingress = await details(client, "ingress")
    scheduler = await details(client, "scheduler")
    # The third call through the scheduler made it hot and earned a grant: capacity
    # 8, one slot taken, half of the 7 free ones lent (the function allows 4).
    (grant,) = scheduler["grants"]
    assert (grant["function"], grant["worker"], grant["slots"]) == ("echo", "w0", 3)
    assert ingress["direct"]["grants"] == {"echo": {"worker": "w0", "slots": 3}}
    assert ingress["direct"]["sent"] >= 15
    assert scheduler["assigned"] <= 20 - ingress["direct"]["sent"]
    assert ingress["direct"]["in_flight"] == 0
    # Execution times still reach the scheduler from the runs it never saw.
    assert scheduler["exec_ms"]["echo"] > 0


async def test_queued_work_takes_the_lent_slots_back(platform: Platform, nc: NATS) -> None:
    client = Client(nc)
    await deploy_and_wait(nc, SLEEP)
    await warm_up(nc, "sleep", body(seconds=np.array(0.0)))
    (grant,) = (await details(client, "scheduler"))["grants"]
    assert grant["slots"] == 3  # of the 8 slots: 3 lent, 5 left to the scheduler
    # Twelve at once: 3 go direct, 5 through the scheduler, 4 must queue there, which
    # revokes the grant; its slots come back when the direct ones end.
    replies: list[Any] = []

    async def call() -> None:
        replies.append((await request(nc, "sleep", body(seconds=np.array(0.3))))[1])

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(12):
            tg.start_soon(call)
    assert [r.get("error") for r in replies] == [None] * 12
    assert time.monotonic() - started < 5
    ingress = await details(client, "ingress")
    assert ingress["direct"]["sent"] >= 1
    scheduler = await details(client, "scheduler")
    assert scheduler["pending"] == 0
    assert scheduler["grants_revoked"] == 1
    # The revoked grant was given back (nothing left under it), so no slot is held.
    assert all(not g["revoked"] for g in scheduler["grants"]), scheduler["grants"]
    worker = await details(client, "gpu-worker")
    assert worker["failed"] == 0  # never more sent to the worker than it has slots


@pytest.mark.slow  # a process killed (chaos): in CI, not the quick run
async def test_a_killed_worker_answers_its_direct_callers(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    with doomed_platform(nats_server.url, tmp_path) as (_, proc):
        client = Client(nc)
        await deploy_and_wait(nc, SLEEP)
        await wait_for_worker(client, "doomed")
        await warm_up(nc, "sleep", body(seconds=np.array(0.0)))
        with anyio.fail_after(5):
            while not (await details(client, "ingress"))["direct"]["grants"]:
                await anyio.sleep(0.02)

        async def sent_directly() -> bool:
            return bool((await details(client, "ingress"))["direct"]["in_flight"])

        reply, elapsed = await kill_mid_call(nc, proc, sent_directly)
        assert reply["error"]["code"] == "worker_lost", reply
        assert "doomed" in reply["error"]["reason"]
        assert elapsed < 10
        ingress = await details(client, "ingress")
        assert ingress["direct"]["in_flight"] == 0
        assert ingress["direct"]["grants"] == {}


async def test_grants_off_sends_everything_through_the_scheduler(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    with platform_at(nats_server.url, tmp_path / "s", grant_ttl_s=0.0):
        client = Client(nc)
        await deploy_and_wait(nc, ECHO)
        for _ in range(5):
            _, reply = await request(nc, "echo", body(x=np.ones(2, np.float32)))
            assert "error" not in reply, reply
        assert (await details(client, "ingress"))["direct"]["sent"] == 0
        scheduler = await details(client, "scheduler")
        assert scheduler["grants"] == []
        assert scheduler["assigned"] == 5


async def test_a_draining_worker_takes_back_its_grants_and_no_call_is_lost(
    nats_server: NatsServer, nc: NATS, tmp_path: Path
) -> None:
    with platform_at(nats_server.url, tmp_path / "s", workers=2) as p:
        client = Client(nc)
        await deploy_and_wait(nc, ECHO)
        with anyio.fail_after(10):
            while len((await details(client, "scheduler"))["workers"]) < 2:
                await anyio.sleep(0.05)
        granted = (await warm_up(nc, "echo", body(x=np.ones(2, np.float32))))["worker"]
        assert (await details(client, "ingress"))["direct"]["grants"]["echo"]["worker"] == granted
        stopped = anyio.Event()
        workers: list[str] = []

        async def calls() -> None:
            while not stopped.is_set() or len(workers) < 20:
                _, r = await request(nc, "echo", body(x=np.ones(2, np.float32)), timeout=3)
                assert "error" not in r, r
                workers.append(r["worker"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(calls)
            await anyio.sleep(0.2)
            await anyio.to_thread.run_sync(p.stop, f"worker-{granted[1:]}")
            workers.clear()
            stopped.set()
        # Every call after the stop was answered, by the worker still running.
        assert set(workers) == {"w0", "w1"} - {granted}


async def test_grants_go_back_when_their_ingress_stops_or_falls_silent(
    platform: Platform, nc: NATS
) -> None:
    client = Client(nc)
    await deploy_and_wait(nc, ECHO)
    # A stand-in ingress, as plain nats-py: it asks the scheduler directly, says it is
    # alive for a while, then falls silent as a crashed process would.
    grants = await nc.subscribe("gfaas.v1.ingress.ingress-fake.grant")
    await nc.publish("gfaas.v1.alive.ingress-fake", b"")
    headers = {
        "Gfaas-Invocation-Id": "fake-1",
        "Gfaas-Function": "echo",
        "Gfaas-Origin": "ingress-fake",
    }
    for n in range(HOT_CALLS):  # a hot function: lent slots once warm
        headers["Gfaas-Invocation-Id"] = f"fake-{n}"
        msg = await nc.request(
            "gfaas.v1.schedule", body(x=np.ones(2, np.float32)), headers=headers, timeout=5
        )
        assert msg.headers is not None
        assert msg.headers["Gfaas-Status"] == "ok"
    await grants.next_msg(timeout=2)
    await grants.unsubscribe()
    assert [g["ingress"] for g in (await details(client, "scheduler"))["grants"]] == [
        "ingress-fake"
    ]
    with anyio.fail_after(5):  # worker_timeout_s is 1 s here
        while (await details(client, "scheduler"))["grants"]:
            await anyio.sleep(0.1)

    # The real ingress gives its grants back when it stops.
    await warm_up(nc, "echo", body(x=np.ones(2, np.float32)))
    assert (await details(client, "scheduler"))["grants"]
    await anyio.to_thread.run_sync(platform.stop, "ingress")
    with anyio.fail_after(2):
        while (await details(client, "scheduler"))["grants"]:
            await anyio.sleep(0.05)

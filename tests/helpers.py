"""Small helpers for integration tests that speak the wire protocol directly."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
import numpy as np
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from gfaas.client import Client
from shared.schema import FunctionSpec, InvokeReply


def tensor(name: str, x: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {"name": name, "dtype": str(x.dtype), "shape": list(x.shape), "data": x.tobytes()}


def body(**inputs: np.ndarray[Any, Any]) -> bytes:
    return msgspec.msgpack.encode({"inputs": [tensor(n, x) for n, x in inputs.items()]})


async def request(nc: NATS, function: str, data: bytes, timeout: float = 10.0) -> tuple[Msg, Any]:
    msg = await nc.request(f"gfaas.v1.invoke.{function}", data, timeout=timeout)
    return msg, msgspec.msgpack.decode(msg.data)


async def deploy_and_wait(
    nc: NATS, *specs: FunctionSpec, timeout: float = 5.0, handler_check: bool = True
) -> None:
    """Deploy and wait until ingress knows every function (its registry watch caught up).
    `handler_check` False deploys handlers a worker would refuse (to test the call)."""
    client = Client(nc)
    for spec in specs:
        await client.deploy(spec, handler_check=handler_check)
    with anyio.fail_after(timeout):
        while True:
            status = await client.status("ingress")
            known = set(status.details.get("functions", []))
            if all(s.name in known for s in specs):
                return
            await anyio.sleep(0.02)


async def wait_for_worker(client: Client, worker_id: str) -> None:
    """Until the scheduler has heard the worker's heartbeat."""
    with anyio.fail_after(30):
        while worker_id not in (await client.status("scheduler")).details["workers"]:
            await anyio.sleep(0.05)


async def kill_mid_call(
    nc: NATS, proc: subprocess.Popen[bytes], running: Callable[[], Awaitable[bool]]
) -> tuple[Any, float]:
    """Call `sleep` for 30 s and SIGKILL `proc` once `running()` says the call runs
    there: the caller's reply, and how long it took to come."""
    result: dict[str, Any] = {}

    async def call() -> None:
        started = time.monotonic()
        _, reply = await request(nc, "sleep", body(seconds=np.array(30.0)), timeout=20)
        result["reply"], result["elapsed"] = reply, time.monotonic() - started

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        with anyio.fail_after(10):
            while not await running():
                await anyio.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    return result["reply"], result["elapsed"]


async def final_result(client: Client, invocation_id: str, timeout: float = 20) -> InvokeReply:
    """An async invocation's result once it is neither pending nor unknown."""
    with anyio.fail_after(timeout):
        while True:
            reply = await client.result(invocation_id)
            if reply.error is None or reply.error.code not in ("pending", "not_found"):
                return reply
            await anyio.sleep(0.02)


async def agent_details(client: Client) -> dict[str, Any]:
    """The node agent's status (the worker whose details have "agent"), not one of the
    instances that also answer as gpu-workers."""
    for status in await client.status_all("gpu-worker", timeout=1.0):
        if "agent" in status.details:
            return dict(status.details["agent"])
    raise AssertionError("no agent answered")


async def leases_on(nc: NATS, node: str) -> int:
    """Live leases at `node`'s broker (brokers in one test process share an instance
    name, which Client.status_all keys answers by)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish("gfaas.v1.status.memory-broker", b"", reply=inbox)
        while True:
            status = msgspec.msgpack.decode((await sub.next_msg(timeout=2)).data)
            if status["details"]["node"] == node:
                return int(status["details"]["leases"])
    finally:
        await sub.unsubscribe()

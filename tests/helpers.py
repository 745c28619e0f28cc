"""Small helpers for integration tests that speak the wire protocol directly."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import numpy as np
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from gfaas.client import Client
from shared.schema import FunctionSpec


def tensor(name: str, x: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {"name": name, "dtype": str(x.dtype), "shape": list(x.shape), "data": x.tobytes()}


def body(**inputs: np.ndarray[Any, Any]) -> bytes:
    return msgspec.msgpack.encode({"inputs": [tensor(n, x) for n, x in inputs.items()]})


async def request(nc: NATS, function: str, data: bytes, timeout: float = 10.0) -> tuple[Msg, Any]:
    msg = await nc.request(f"gfaas.v1.invoke.{function}", data, timeout=timeout)
    return msg, msgspec.msgpack.decode(msg.data)


async def deploy_and_wait(nc: NATS, *specs: FunctionSpec, timeout: float = 5.0) -> None:
    """Deploy and wait until ingress knows every function (its registry watch caught up)."""
    client = Client(nc)
    for spec in specs:
        await client.deploy(spec)
    with anyio.fail_after(timeout):
        while True:
            status = await client.status("ingress")
            known = set(status.details.get("functions", []))
            if all(s.name in known for s in specs):
                return
            await anyio.sleep(0.02)

"""The Python client: invoke functions, deploy specs, push models, read status.

Everything it does is plain NATS on documented subjects (docs/protocol.md); any
nats client can do the same.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import numpy as np
from nats.aio.client import Client as NATS

from shared import jetstream, subjects
from shared.config import PAYLOAD_HEADROOM
from shared.errors import GfaasError
from shared.modelstore import ModelStore
from shared.registry import Registry
from shared.schema import (
    H_CALLBACK,
    H_INVOCATION,
    H_MSG_ID,
    H_TENANT,
    ErrorCode,
    FunctionSpec,
    InvokeReply,
    InvokeRequest,
    ServiceStatus,
    Tensor,
    decode,
    encode,
    new_invocation_id,
)
from shared.tensors import from_value, to_numpy

Inputs = Mapping[str, Any] | Sequence[Tensor]


def _tensors(inputs: Inputs) -> list[Tensor]:
    if isinstance(inputs, Mapping):
        return [from_value(name, value) for name, value in inputs.items()]
    return list(inputs)


def outputs_of(reply: InvokeReply) -> dict[str, np.ndarray[Any, Any]]:
    """The reply's tensors as numpy arrays, or the reply's error raised."""
    if reply.error is not None:
        raise GfaasError.from_info(reply.error)
    return {t.name: to_numpy(t) for t in reply.outputs}


class Client:
    def __init__(self, nc: NATS, *, tenant: str = "", timeout: float = 30.0) -> None:
        self.nc = nc
        self.tenant = tenant
        self.timeout = timeout

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, url: str = "nats://127.0.0.1:4222", **kwargs: Any
    ) -> AsyncIterator[Client]:
        nc = await nats.connect(url, name="gfaas-client", connect_timeout=5)
        try:
            yield cls(nc, **kwargs)
        finally:
            await nc.drain()

    def _headers(self, invocation_id: str) -> dict[str, str]:
        headers = {H_INVOCATION: invocation_id}
        if self.tenant:
            headers[H_TENANT] = self.tenant
        return headers

    def _body(self, request: InvokeRequest) -> bytes:
        body = encode(request)
        limit = self.nc.max_payload - PAYLOAD_HEADROOM
        if len(body) > limit:
            raise GfaasError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"request of {len(body)} bytes exceeds the bus limit of {limit} bytes",
            )
        return body

    async def invoke_reply(
        self,
        function: str,
        inputs: Inputs,
        *,
        timeout: float | None = None,
        invocation_id: str = "",
    ) -> InvokeReply:
        invocation_id = invocation_id or new_invocation_id()
        timeout = timeout or self.timeout
        body = self._body(InvokeRequest(inputs=_tensors(inputs), timeout_ms=int(timeout * 1000)))
        try:
            msg = await self.nc.request(
                subjects.invoke(function),
                body,
                timeout=timeout,
                headers=self._headers(invocation_id),
            )
        except nats.errors.NoRespondersError:
            raise GfaasError(ErrorCode.NO_WORKER, "no ingress is running") from None
        except nats.errors.TimeoutError:
            raise GfaasError(ErrorCode.DEADLINE_EXCEEDED, f"no reply within {timeout}s") from None
        return decode(msg.data, InvokeReply)

    async def invoke(
        self, function: str, inputs: Inputs, *, timeout: float | None = None
    ) -> dict[str, np.ndarray[Any, Any]]:
        return outputs_of(await self.invoke_reply(function, inputs, timeout=timeout))

    async def invoke_async(
        self,
        function: str,
        inputs: Inputs,
        *,
        invocation_id: str = "",
        callback: str = "",
    ) -> str:
        """Queue an invocation in JetStream; returns its id (the dedup key)."""
        invocation_id = invocation_id or new_invocation_id()
        headers = self._headers(invocation_id) | {H_MSG_ID: invocation_id}
        if callback:
            headers[H_CALLBACK] = callback
        body = self._body(InvokeRequest(inputs=_tensors(inputs)))
        await self.nc.jetstream().publish(subjects.invoke_async(function), body, headers=headers)
        return invocation_id

    async def result(self, invocation_id: str, *, timeout: float = 5.0) -> InvokeReply:
        msg = await self.nc.request(subjects.result(invocation_id), b"", timeout=timeout)
        return decode(msg.data, InvokeReply)

    async def status(self, service: str, *, timeout: float = 2.0) -> ServiceStatus:
        msg = await self.nc.request(subjects.status(service), b"", timeout=timeout)
        return decode(msg.data, ServiceStatus)

    async def registry(self) -> Registry:
        return await Registry.open(self.nc.jetstream())

    async def deploy(self, spec: FunctionSpec) -> None:
        await (await self.registry()).put(spec)

    async def remove(self, name: str) -> bool:
        return await (await self.registry()).delete(name)

    async def functions(self) -> list[FunctionSpec]:
        return await (await self.registry()).fetch_all()

    async def push_model(self, name: str, path: Path) -> int:
        return await (await ModelStore.open(self.nc.jetstream())).push(name, path)

    async def models(self) -> list[tuple[str, int]]:
        return await (await ModelStore.open(self.nc.jetstream())).list()

    async def ensure_resources(self) -> None:
        js = self.nc.jetstream()
        await jetstream.ensure_invocations_stream(js)
        await jetstream.results_kv(js)


def spec_json(spec: FunctionSpec) -> str:
    return json.dumps(msgspec.to_builtins(spec), indent=2)

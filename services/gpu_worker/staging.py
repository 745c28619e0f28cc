"""The data plane around one run: by-handle inputs and outputs, through the node's broker.

Inputs that live on another node come by value in chunks; inputs in another
device's pool are copied here; by-handle inputs are checked and retained for as
long as the handler reads them; by-handle outputs are leased (before the run when
the spec fixes their shapes, so the handler can write straight into them) and
handed to the caller's holder. Everything taken here is given back when the run ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import torch

from shared.dataplane.client import BrokerClient, NoBroker, open_tensor, write_into
from shared.errors import GfaasError
from shared.ids import output_holder
from shared.logs import get_logger
from shared.schema import (
    CopyRequest,
    ErrorCode,
    FunctionSpec,
    Handle,
    InvocationMeta,
    InvokeRequest,
    OutputMode,
    Tensor,
)
from shared.tensors import (
    as_torch,
    dtype_of,
    from_mapping,
    nbytes_of,
    to_torch,
    validate_outputs,
)

log = get_logger("gpu_worker")

# Room for the reply's envelope and names when judging whether outputs fit by value.
BY_VALUE_MARGIN = 4096


@dataclass
class Staged:
    """One run's inputs on this device, and the output buffers leased for it (by
    output name; the ones `Staging.outputs` uses leave the dict)."""

    request: InvokeRequest
    inputs: dict[str, torch.Tensor]
    prepared: dict[str, Handle]


class Staging:
    def __init__(
        self,
        broker: BrokerClient,
        *,
        worker_id: str,
        device: str,
        node: str,
        max_payload: int,
        remote: Callable[[str], BrokerClient],
    ) -> None:
        self.broker = broker
        self.worker_id = worker_id
        self.device = device
        self.node = node
        self.max_payload = max_payload
        # The broker of another node, for inputs that live there (read in chunks).
        self._remote_broker = remote
        self._remote: dict[str, BrokerClient] = {}
        self.remote_reads = 0
        # Where by-handle outputs are leased: this device's pool (host memory for CPU).
        self.pool_device = device if device.startswith("cuda") else "cpu"

    @asynccontextmanager
    async def staged(
        self, meta: InvocationMeta, request: InvokeRequest, spec: FunctionSpec
    ) -> AsyncIterator[Staged]:
        """The inputs as tensors on this device, for as long as the handler needs them."""
        request = await self._fetch_remote(meta, request)
        by_handle = [t.handle for t in request.inputs if t.handle is not None]
        # From here this worker holds a reference on each input (dropped below).
        prepared = await self._prepare_outputs(meta, request, spec, by_handle)
        moved: list[Handle] = []
        try:
            request, moved = await self._to_this_device(meta, request, spec)
            inputs = {
                t.name: (open_tensor(t).to(self.device) if t.handle else to_torch(t, self.device))
                for t in request.inputs
            }
            yield Staged(request, inputs, prepared)
        finally:
            if moved:
                await self.broker.release(moved, self.worker_id, meta.tenant, wait=False)
            # Whatever the handler did not use (or a failure left) goes back; then this
            # worker's references on its inputs, the handler being done reading. Two
            # requests: an input whose TTL ran out must not keep the buffers leased.
            with anyio.CancelScope(shield=True):
                if prepared:
                    await self.broker.release(
                        list(prepared.values()), self.worker_id, meta.tenant, wait=False
                    )
                if by_handle:
                    await self.broker.release(by_handle, self.worker_id, meta.tenant, wait=False)

    async def _to_this_device(
        self, meta: InvocationMeta, request: InvokeRequest, spec: FunctionSpec
    ) -> tuple[InvokeRequest, list[Handle]]:
        """On a GPU, inputs in another device's pool (host memory from a CPU stage,
        another GPU) are copied here by the broker: chunked on that link's fair
        scheduler, with the rest of the SLO as budget. Returns the copies to release."""
        if not self.pool_device.startswith("cuda"):
            return request, []
        elsewhere = [
            t
            for t in request.inputs
            if t.handle is not None and t.handle.device != self.pool_device
        ]
        if not elsewhere:
            return request, []
        budget_ms = max(min(meta.remaining_s(), spec.slo_ms / 1000.0), 0.0) * 1000.0
        moved: dict[str, Handle] = {}
        try:
            for t in elsewhere:
                assert t.handle is not None
                moved[t.name] = await self.broker.copy(
                    CopyRequest(
                        source=t.handle,
                        device=self.pool_device,
                        owner=self.worker_id,
                        budget_ms=budget_ms,
                        flow=spec.name,
                    ),
                    meta.tenant,
                )
        except BaseException:
            if moved:
                with anyio.CancelScope(shield=True):
                    await self.broker.release(list(moved.values()), self.worker_id, meta.tenant)
            raise
        inputs = [
            msgspec.structs.replace(t, handle=moved[t.name]) if t.name in moved else t
            for t in request.inputs
        ]
        return msgspec.structs.replace(request, inputs=inputs), list(moved.values())

    async def _fetch_remote(self, meta: InvocationMeta, request: InvokeRequest) -> InvokeRequest:
        """Inputs whose handles live on another node come by value, in chunks from that
        node's broker (it cannot be mapped from here): same API, slower path."""
        if all(t.handle is None or t.handle.pool == self.node for t in request.inputs):
            return request
        inputs: list[Tensor] = []
        for t in request.inputs:
            h = t.handle
            if h is None or h.pool == self.node:
                inputs.append(t)
                continue
            remote = self._remote.get(h.pool)
            if remote is None:
                remote = self._remote[h.pool] = self._remote_broker(h.pool)
            try:
                data = await remote.read(h, meta.tenant, chunk=self.max_payload)
            except NoBroker as exc:
                # The handle names a node whose broker is not there: the input's
                # fault as the caller sent it (a node that never ran one, say). One
                # slow to answer is not: that stays `unavailable`, retried.
                raise GfaasError(
                    ErrorCode.INVALID_INPUT,
                    f"input {t.name!r} lives on node {h.pool!r}: {exc.reason}",
                ) from None
            self.remote_reads += 1
            inputs.append(msgspec.structs.replace(t, handle=None, data=data))
        return msgspec.structs.replace(request, inputs=inputs)

    async def _lease(
        self, sizes: list[int], tenant: str, check: list[Handle], *, retain: str = ""
    ) -> list[Handle]:
        """Output buffers in the pool of this worker's device; in host memory when the
        node's broker pools no GPU memory (it runs without cupy, say)."""
        try:
            return await self.broker.lease(
                sizes,
                owner=self.worker_id,
                device=self.pool_device,
                tenant=tenant,
                check=check,
                retain=retain,
            )
        except GfaasError as exc:
            if self.pool_device == "cpu" or exc.code != ErrorCode.NO_POOL:
                raise
            log.warning("pool.host_fallback", device=self.pool_device, reason=exc.reason)
            self.pool_device = "cpu"
            return await self._lease(sizes, tenant, check, retain=retain)

    async def _prepare_outputs(
        self,
        meta: InvocationMeta,
        request: InvokeRequest,
        spec: FunctionSpec,
        inputs: list[Handle],
    ) -> dict[str, Handle]:
        """Check the input handles, take this worker's reference on each, and lease
        the output buffers, in one broker trip.

        The broker is the authority: stale, forged or foreign input handles stop here.
        The references keep the inputs' bytes in place while the handler reads them,
        whoever else releases them meanwhile (a workflow run whose other stage failed,
        a caller that gave up); held under this worker's name, so the broker drops
        them should its heartbeats stop. Outputs are prepared (so the handler can write
        straight into them) only when they go by handle and the spec fixes every
        dimension."""
        fixed = bool(spec.outputs) and all(d >= 0 for t in spec.outputs for d in t.shape)
        if request.outputs_by is not OutputMode.HANDLE or not fixed:
            if inputs:
                await self.broker.check(inputs, meta.tenant, retain=self.worker_id)
            return {}
        sizes = [nbytes_of(t.dtype, t.shape) for t in spec.outputs]
        handles = await self._lease(sizes, meta.tenant, inputs, retain=self.worker_id)
        return {t.name: h for t, h in zip(spec.outputs, handles, strict=True)}

    async def outputs(
        self,
        meta: InvocationMeta,
        request: InvokeRequest,
        spec: FunctionSpec,
        raw: Mapping[str, Any],
        prepared: dict[str, Handle],
    ) -> list[Tensor]:
        """The handler's result as the reply's tensors: by value, or by handle when
        asked (or, for `auto`, when it would not fit the bus's payload limit). Checked
        against the spec's declared outputs first (a handler_error otherwise), before
        any buffer is leased or written. A 0-d output (numpy or torch) stays 0-d."""
        mode = request.outputs_by
        if mode is OutputMode.VALUE:
            tensors = from_mapping(raw, keep_rank=True)
            validate_outputs(spec, {t.name: (t.dtype, t.shape) for t in tensors})
            return tensors
        values = {name: as_torch(name, value, keep_rank=True) for name, value in raw.items()}
        validate_outputs(spec, {n: (dtype_of(n, v), v.shape) for n, v in values.items()})
        if mode is OutputMode.AUTO:
            size = sum(v.numel() * v.element_size() for v in values.values())
            if size + BY_VALUE_MARGIN <= self.max_payload:
                return from_mapping(values)
        return await self._by_handle(meta, request, values, prepared)

    async def _by_handle(
        self,
        meta: InvocationMeta,
        request: InvokeRequest,
        values: Mapping[str, torch.Tensor],
        prepared: dict[str, Handle],
    ) -> list[Tensor]:
        """Outputs in pooled buffers; the caller gets the references, not the bytes.

        A prepared buffer of the right size is used (and not copied into again when
        the handler wrote there); the rest are leased now. Used buffers leave
        `prepared`, so the caller releases only what was not used."""
        chosen: dict[str, Handle] = {}
        for name, v in values.items():
            h = prepared.get(name)
            if h is not None and h.nbytes == v.numel() * v.element_size():
                chosen[name] = prepared.pop(name)
        # From here what `chosen` holds is released below on any failure, the lease
        # for the rest included: the used buffers left `prepared`, so nobody else would
        # (a quota or an exhausted pool refusing the undeclared outputs kept them).
        try:
            missing = [name for name in values if name not in chosen]
            if missing:
                sizes = [values[n].numel() * values[n].element_size() for n in missing]
                fresh = await self._lease(sizes, meta.tenant, [])
                chosen.update(zip(missing, fresh, strict=True))
            handles = [chosen[name] for name in values]
            outputs = [
                write_into(chosen[name], name, v, dtype_of(name, v)) for name, v in values.items()
            ]
            if meta.remaining_s() <= 0:
                # Its caller stopped waiting at the deadline: outputs handed over now
                # could be held by a holder nobody releases (a workflow run that ended).
                raise GfaasError(
                    ErrorCode.DEADLINE_EXCEEDED,
                    f"{meta.function} finished past its deadline: its outputs are not handed over",
                )
            holder = output_holder(request.holder, meta.invocation_id)
            # Not awaited: the broker applies it before anything the caller sends
            # after reading this reply (one ordered stream of broker requests).
            await self.broker.transfer(handles, self.worker_id, holder, meta.tenant, wait=False)
        except BaseException:
            if chosen:
                with anyio.CancelScope(shield=True):
                    await self.broker.release(list(chosen.values()), self.worker_id, meta.tenant)
            raise
        return outputs

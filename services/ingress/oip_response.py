"""Open Inference Protocol responses: inference results (JSON or Triton's binary
tensor data), model and server metadata, the repository index, error bodies. Pure
conversions; the requests they answer are parsed in oip.py."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from services.ingress.oip import (
    _NUMPY,
    EXTENSIONS,
    MODEL_VERSION,
    PLATFORM,
    SERVER_NAME,
    InferRequest,
    RequestedOutput,
    ShmRef,
    datatype_of,
)
from services.ingress.stats import ModelStats
from shared.errors import GfaasError, bad_request
from shared.schema import ErrorCode, FunctionSpec, Tensor, TensorSpec
from shared.tensors import nbytes_of

_json = msgspec.json.Encoder()

# -- response JSON ----------------------------------------------------------------------


class _TensorMeta(msgspec.Struct):
    name: str
    datatype: str
    shape: list[int]


class _ModelMeta(msgspec.Struct):
    name: str
    versions: list[str]
    platform: str
    inputs: list[_TensorMeta]
    outputs: list[_TensorMeta]


class _ServerMeta(msgspec.Struct):
    name: str
    version: str
    extensions: list[str]


class _IndexEntry(msgspec.Struct, omit_defaults=True):
    name: str
    version: str
    state: str
    reason: str = ""


class _ResponseOutput(msgspec.Struct, omit_defaults=True):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    data: list[Any] | msgspec.UnsetType = msgspec.UNSET


class _Response(msgspec.Struct):
    model_name: str
    model_version: str
    id: str
    outputs: list[_ResponseOutput]


@dataclass(frozen=True, slots=True)
class EncodedResponse:
    body: bytes
    # Length of the JSON part when binary tensors follow it; None for plain JSON.
    header_length: int | None

    @property
    def media_type(self) -> str:
        return "application/json" if self.header_length is None else "application/octet-stream"


# -- responses -------------------------------------------------------------------------


def check_requested_outputs(
    request: InferRequest, model_name: str, produced: Collection[str] | None
) -> None:
    """Refuse outputs the model does not produce before any work is scheduled;
    `produced`: every output it does, None when they are not all known (a function
    declaring none)."""
    if request.outputs is None or produced is None:
        return
    for output in request.outputs:
        if output.name not in produced:
            raise bad_request(
                f"model {model_name!r} has no output {output.name!r} "
                f"(outputs: {', '.join(sorted(produced))})"
            )


def check_produced(
    request: InferRequest,
    model_name: str,
    produced: Collection[str] | None,
    outputs: Sequence[Tensor],
) -> None:
    """Refuse a reply that lacks an output asked for which the model produces (it
    declares it): the model's failure, not the caller's request. An output the model
    is not known to produce is left to requested_outputs, the caller's to answer for."""
    if request.outputs is None or produced is None:
        return
    got = {t.name for t in outputs}
    for output in request.outputs:
        if output.name in produced and output.name not in got:
            raise GfaasError(
                ErrorCode.HANDLER_ERROR,
                f"model {model_name!r} declares output {output.name!r} but did not "
                f"produce it (it produced: {', '.join(sorted(got)) or 'none'})",
            )


def requested_outputs(
    model_name: str, request: InferRequest, outputs: Sequence[Tensor]
) -> list[tuple[Tensor, RequestedOutput | None]]:
    """The outputs to answer with, in the order asked (all of them when the request
    names none), each with what was asked of it; one it did not produce is refused.
    Shared by the HTTP and gRPC fronts."""
    if request.outputs is None:
        return [(t, None) for t in outputs]
    by_name = {t.name: t for t in outputs}
    chosen: list[tuple[Tensor, RequestedOutput | None]] = []
    for wanted in request.outputs:
        tensor = by_name.get(wanted.name)
        if tensor is None:
            raise bad_request(
                f"model {model_name!r} produced no output {wanted.name!r} "
                f"(it produced: {', '.join(by_name) or 'none'})"
            )
        chosen.append((tensor, wanted))
    return chosen


def encode_infer_response(
    model_name: str, request: InferRequest, outputs: Sequence[Tensor], *, response_id: str
) -> EncodedResponse:
    """The OIP response for a function's outputs, filtered and encoded as requested."""
    chosen: list[tuple[Tensor, bool | ShmRef]] = [
        (t, request.binary_outputs if w is None else (w.shm or w.binary))
        for t, w in requested_outputs(model_name, request, outputs)
    ]

    entries: list[_ResponseOutput] = []
    blobs: list[bytes] = []
    for tensor, how in chosen:
        entry = _ResponseOutput(
            name=tensor.name, datatype=datatype_of(tensor.dtype), shape=list(tensor.shape)
        )
        if isinstance(how, ShmRef):
            # The bytes are already in the caller's region (written by ingress).
            entry.parameters = {
                "shared_memory_region": how.region,
                "shared_memory_byte_size": nbytes_of(tensor.dtype, tensor.shape),
            }
            entries.append(entry)
            continue
        array = _output_array(tensor)
        if how:
            entry.parameters = {"binary_data_size": len(tensor.data)}
            blobs.append(tensor.data)
        else:
            entry.data = array.tolist()
        entries.append(entry)
    header = _json.encode(
        _Response(
            model_name=model_name, model_version=MODEL_VERSION, id=response_id, outputs=entries
        )
    )
    if not blobs:
        return EncodedResponse(body=header, header_length=None)
    return EncodedResponse(body=b"".join([header, *blobs]), header_length=len(header))


def _output_array(tensor: Tensor) -> np.ndarray[Any, Any]:
    where = f"output {tensor.name!r}"
    if tensor.handle is not None and not tensor.data:
        raise GfaasError(ErrorCode.INTERNAL, f"{where} came back by handle, not by value")
    np_dtype = _NUMPY[tensor.dtype]
    expected = math.prod(tensor.shape) * np_dtype.itemsize
    if len(tensor.data) != expected:
        raise GfaasError(
            ErrorCode.INTERNAL,
            f"{where}: {len(tensor.data)} bytes for {tensor.dtype}{list(tensor.shape)} "
            f"({expected} expected)",
        )
    return np.frombuffer(tensor.data, dtype=np_dtype)


def _tensor_meta(specs: Iterable[TensorSpec]) -> list[_TensorMeta]:
    return [
        _TensorMeta(name=s.name, datatype=datatype_of(s.dtype), shape=list(s.shape)) for s in specs
    ]


def model_metadata(spec: FunctionSpec) -> bytes:
    return _json.encode(
        _ModelMeta(
            name=spec.name,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            inputs=_tensor_meta(spec.inputs),
            outputs=_tensor_meta(spec.outputs),
        )
    )


def server_metadata(version: str, extensions: Iterable[str] = EXTENSIONS) -> bytes:
    return _json.encode(_ServerMeta(name=SERVER_NAME, version=version, extensions=list(extensions)))


def repository_index(
    specs: Iterable[FunctionSpec], *, not_ready: Callable[[str], str | None], ready_only: bool
) -> bytes:
    """Every model, READY or UNAVAILABLE with the reason `not_ready` gives (the rule
    ModelReady answers by)."""
    entries = []
    for s in sorted(specs, key=lambda s: s.name):
        reason = not_ready(s.name)
        state = "READY" if reason is None else "UNAVAILABLE"
        entries.append(
            _IndexEntry(name=s.name, version=MODEL_VERSION, state=state, reason=reason or "")
        )
    if ready_only:
        entries = [e for e in entries if e.state == "READY"]
    return _json.encode(entries)


def error_body(reason: str) -> bytes:
    return _json.encode({"error": reason})


# -- Triton's model configuration and statistics extensions --------------------------------


def _config_tensors(specs: Iterable[TensorSpec]) -> list[dict[str, object]]:
    return [
        {"name": t.name, "data_type": f"TYPE_{datatype_of(t.dtype)}", "dims": list(t.shape)}
        for t in specs
    ]


def model_config(spec: FunctionSpec) -> bytes:
    """Triton's model configuration, from the spec: no batching of gfaas's own (a
    function sees the batch its caller sent), inputs and outputs as Triton types."""
    return _json.encode(
        {
            "name": spec.name,
            "platform": PLATFORM,
            "backend": PLATFORM,
            "max_batch_size": 0,
            "input": _config_tensors(spec.inputs),
            "output": _config_tensors(spec.outputs),
            "parameters": {
                "slo_ms": {"string_value": f"{spec.slo_ms:g}"},
                "timeout_ms": {"string_value": str(spec.timeout_ms)},
                "concurrency": {"string_value": str(spec.concurrency)},
            },
        }
    )


def model_statistics(entries: Iterable[tuple[str, ModelStats]]) -> bytes:
    """Triton's statistics extension body. gfaas times each inference whole (success
    and fail); the phases it does not measure apart are zero."""
    zero = {"count": 0, "ns": 0}
    stats = []
    for name, s in entries:
        count = s.success.count
        stats.append(
            {
                "name": name,
                "version": MODEL_VERSION,
                "last_inference": s.last_inference_ms,
                "inference_count": count,
                "execution_count": count,
                "inference_stats": {
                    "success": {"count": count, "ns": s.success.ns},
                    "fail": {"count": s.fail.count, "ns": s.fail.ns},
                    "queue": zero,
                    "compute_input": zero,
                    "compute_infer": zero,
                    "compute_output": zero,
                    "cache_hit": zero,
                    "cache_miss": zero,
                },
                "batch_stats": [],
            }
        )
    return _json.encode({"model_stats": stats})

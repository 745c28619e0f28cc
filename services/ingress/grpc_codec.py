"""gRPC Open Inference Protocol messages <-> gfaas: the protobuf side of oip.py and
oip_response.py. Pure conversions, no I/O; grpc_front.py calls these and maps the
GfaasError they raise to a gRPC status.

A request's tensors come as `raw_input_contents` (one little-endian blob per input
that is not in shared memory, in the order the inputs are listed) or as typed
`contents`; responses always carry `raw_output_contents`, one per output (empty for
an output written to shared memory) so that a client's index of outputs matches.
The checks the HTTP side makes (element counts, sizes, datatypes, unsupported
parameters, shared-memory references) are the same functions of oip.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import msgspec
import numpy as np
from google.protobuf import json_format

from services.ingress import oip, oip_response, proto
from services.ingress.oip import _NUMPY, MODEL_VERSION, PLATFORM, SERVER_NAME
from services.ingress.oip_shm import CUDA_IPC_HANDLE_BYTES, CudaRegionStatus, RegionStatus
from services.ingress.stats import ModelStats
from shared.errors import bad_request
from shared.schema import FunctionSpec, InvokeRequest, Tensor, TensorSpec
from shared.tensors import nbytes_of

ModelInferResponse: Final = proto.message("ModelInferResponse")
ModelMetadataResponse: Final = proto.message("ModelMetadataResponse")
ServerMetadataResponse: Final = proto.message("ServerMetadataResponse")
RepositoryIndexResponse: Final = proto.message("RepositoryIndexResponse")
ModelConfigResponse: Final = proto.message("ModelConfigResponse")
ModelStatisticsResponse: Final = proto.message("ModelStatisticsResponse")
SystemSharedMemoryStatusResponse: Final = proto.message("SystemSharedMemoryStatusResponse")
CudaSharedMemoryStatusResponse: Final = proto.message("CudaSharedMemoryStatusResponse")

# The typed `contents` field each datatype's values travel in (FP16 has none: raw only).
_CONTENTS: Final = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def parameters(entries: Mapping[str, Any]) -> dict[str, Any]:
    """An `InferParameter` map as plain values, the shape oip.py's checks read."""
    values: dict[str, Any] = {}
    for key, param in entries.items():
        which = param.WhichOneof("parameter_choice")
        values[key] = None if which is None else getattr(param, which)
    return values


# -- ModelInfer ---------------------------------------------------------------------------


def parse_infer_request(request: Any) -> oip.InferRequest:
    """A `ModelInferRequest` as gfaas tensors, checked as oip.parse_infer_request checks."""
    params = parameters(request.parameters)
    oip._reject_unsupported_request_parameters(params)
    raw: Sequence[bytes] = request.raw_input_contents
    seen: set[str] = set()
    tensors: list[Tensor] = []
    shm_inputs: dict[str, oip.ShmRef] = {}
    used = 0
    for item in request.inputs:
        where = f"input {item.name!r}"
        if item.name in seen:
            raise bad_request(f"{where} is given more than once")
        seen.add(item.name)
        shape = list(item.shape)
        if any(d < 0 for d in shape):
            raise bad_request(f"{where}: shape {shape} has a negative dimension")
        input_params = parameters(item.parameters)
        has_contents = item.HasField("contents")
        if "shared_memory_region" in input_params:
            if has_contents:
                raise bad_request(f"{where}: has contents and a shared-memory region; give one")
            shm = oip._Input(
                name=item.name, shape=shape, datatype=item.datatype, parameters=input_params
            )
            tensors.append(oip._shm_input(shm)[0])
            shm_inputs[item.name] = oip.shm_ref(input_params, where)
            continue
        if raw:
            if has_contents:
                raise bad_request(f"{where}: has contents and raw_input_contents; give one")
            if used >= len(raw):
                raise bad_request(
                    f"raw_input_contents has {len(raw)} entries; every input not in shared "
                    "memory needs one, in the order of `inputs`"
                )
            tensors.append(_raw_tensor(item.name, item.datatype, shape, raw[used]))
            used += 1
        else:
            tensors.append(_typed_tensor(item.name, item.datatype, shape, item.contents))
    if used != len(raw):
        raise bad_request(
            f"raw_input_contents has {len(raw)} entries for {used} inputs not in shared memory"
        )

    outputs = None
    if request.outputs:
        outputs = tuple(
            oip._requested_output(
                oip._Output(name=o.name, parameters=parameters(o.parameters)), True
            )
            for o in request.outputs
        )
        names = [o.name for o in outputs]
        if len(set(names)) != len(names):
            raise bad_request(f"an output is requested more than once: {names}")
    invoke = InvokeRequest(inputs=tensors, timeout_ms=oip._timeout_ms(params))
    return oip.InferRequest(
        id=request.id, invoke=invoke, outputs=outputs, binary_outputs=True, shm_inputs=shm_inputs
    )


def with_deadline(parsed: oip.InferRequest, remaining_s: float | None) -> oip.InferRequest:
    """The caller's gRPC deadline as the invocation's, unless the request gave a timeout."""
    if remaining_s is None or parsed.invoke.timeout_ms:
        return parsed
    timeout_ms = max(1, math.floor(remaining_s * 1000))
    invoke = msgspec.structs.replace(parsed.invoke, timeout_ms=timeout_ms)
    return dataclasses.replace(parsed, invoke=invoke)


def _raw_tensor(name: str, datatype: str, shape: list[int], data: bytes) -> Tensor:
    where = f"input {name!r}"
    dtype = oip._dtype_for(datatype, where)
    expected = math.prod(shape) * _NUMPY[dtype].itemsize
    if len(data) != expected:
        raise bad_request(
            f"{where}: {len(data)} bytes of raw_input_contents do not match "
            f"{datatype}{shape} ({expected} bytes)"
        )
    if datatype == "BOOL" and data and np.frombuffer(data, dtype=np.uint8).max() > 1:
        raise bad_request(f"{where}: BOOL raw data must be bytes 0 or 1")
    return Tensor(name=name, dtype=dtype, shape=shape, data=bytes(data))


def _typed_tensor(name: str, datatype: str, shape: list[int], contents: Any) -> Tensor:
    where = f"input {name!r}"
    dtype = oip._dtype_for(datatype, where)
    np_dtype = _NUMPY[dtype]
    count = math.prod(shape)
    field = _CONTENTS.get(datatype)
    if field is None:
        raise bad_request(f"{where}: {datatype} has no typed contents; send raw_input_contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise bad_request(
            f"{where}: {len(values)} elements in contents.{field} for shape {shape} "
            f"({count} expected)"
        )
    if np_dtype.kind in "iu" and count:
        info = np.iinfo(np_dtype)
        low, high = min(values), max(values)
        if low < info.min or high > info.max:
            raise bad_request(
                f"{where}: values outside the {datatype} range [{info.min}, {info.max}]"
            )
    # In range, so the conversion is exact (protobuf widened narrow ints to 32 bits).
    converted: np.ndarray[Any, Any] = np.array(list(values), dtype=np_dtype)
    return Tensor(name=name, dtype=dtype, shape=shape, data=converted.tobytes())


def encode_infer_response(
    model_name: str, request: oip.InferRequest, outputs: Sequence[Tensor], *, response_id: str
) -> Any:
    """The `ModelInferResponse` for a function's outputs, filtered as requested."""
    chosen: list[tuple[Tensor, oip.ShmRef | None]] = [
        (t, w.shm if w is not None else None)
        for t, w in oip_response.requested_outputs(model_name, request, outputs)
    ]
    response = ModelInferResponse(
        model_name=model_name, model_version=MODEL_VERSION, id=response_id
    )
    for tensor, shm in chosen:
        entry = response.outputs.add(
            name=tensor.name, datatype=oip.datatype_of(tensor.dtype), shape=list(tensor.shape)
        )
        if shm is not None:
            # The bytes are already in the caller's region (written by ingress).
            entry.parameters["shared_memory_region"].string_param = shm.region
            entry.parameters["shared_memory_byte_size"].int64_param = nbytes_of(
                tensor.dtype, tensor.shape
            )
            response.raw_output_contents.append(b"")
            continue
        oip_response._output_array(tensor)  # checks the bytes match dtype and shape
        response.raw_output_contents.append(tensor.data)
    return response


# -- metadata, index, configuration, statistics --------------------------------------------


def _tensor_meta(entries: Any, specs: Iterable[TensorSpec]) -> None:
    for s in specs:
        entries.add(name=s.name, datatype=oip.datatype_of(s.dtype), shape=list(s.shape))


def model_metadata(spec: FunctionSpec) -> Any:
    response = ModelMetadataResponse(name=spec.name, versions=[MODEL_VERSION], platform=PLATFORM)
    _tensor_meta(response.inputs, spec.inputs)
    _tensor_meta(response.outputs, spec.outputs)
    return response


def server_metadata(version: str, extensions: Iterable[str]) -> Any:
    return ServerMetadataResponse(name=SERVER_NAME, version=version, extensions=list(extensions))


def repository_index(
    specs: Iterable[FunctionSpec], *, not_ready: Callable[[str], str | None], ready_only: bool
) -> Any:
    entries = msgspec.json.decode(
        oip_response.repository_index(specs, not_ready=not_ready, ready_only=ready_only)
    )
    response = RepositoryIndexResponse()
    for entry in entries:
        response.models.add(**entry)
    return response


def model_config(spec: FunctionSpec) -> Any:
    # The HTTP body is Triton's ModelConfig in its JSON mapping: one definition of both.
    config = msgspec.json.decode(oip_response.model_config(spec))
    return json_format.ParseDict({"config": config}, ModelConfigResponse())


def model_statistics(entries: Iterable[tuple[str, ModelStats]]) -> Any:
    body = msgspec.json.decode(oip_response.model_statistics(entries))
    return json_format.ParseDict(body, ModelStatisticsResponse())


# -- the shared-memory extensions ----------------------------------------------------------


def shm_status(regions: Iterable[RegionStatus]) -> Any:
    response = SystemSharedMemoryStatusResponse()
    for r in regions:
        response.regions[r.name].CopyFrom(
            SystemSharedMemoryStatusResponse.RegionStatus(
                name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size
            )
        )
    return response


def cuda_status(regions: Iterable[CudaRegionStatus]) -> Any:
    response = CudaSharedMemoryStatusResponse()
    for r in regions:
        response.regions[r.name].CopyFrom(
            CudaSharedMemoryStatusResponse.RegionStatus(
                name=r.name, device_id=r.device_id, byte_size=r.byte_size
            )
        )
    return response


def cuda_raw_handle(raw: bytes) -> bytes:
    """The register request's handle: over gRPC the raw cudaIpcMemHandle_t, not base64."""
    if len(raw) != CUDA_IPC_HANDLE_BYTES:
        raise bad_request(
            f"raw_handle is {len(raw)} bytes; a CUDA IPC handle (cudaIpcMemHandle_t) "
            f"is {CUDA_IPC_HANDLE_BYTES}"
        )
    return bytes(raw)

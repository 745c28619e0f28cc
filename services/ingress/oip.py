"""Open Inference Protocol (KServe v2 / Triton HTTP) requests -> gfaas wire messages;
the responses are oip_response.py's, the shared-memory extensions' bodies oip_shm.py's.

Pure conversions, no I/O: the HTTP app (services/ingress/http.py) reads bodies and
headers, calls these, and maps the GfaasError they raise to a status code. Includes
Triton's binary tensor data extension: a JSON header of `Inference-Header-Content-Length`
bytes, then each binary tensor's raw little-endian bytes in the order the JSON lists them.

Shape and dtype against the function's spec are checked by ingress admission; here
only the request's own consistency is (element counts, byte sizes, datatypes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Final

import msgspec
import numpy as np

from shared.errors import GfaasError, bad_request
from shared.schema import DType, InvokeRequest, Tensor

SERVER_NAME: Final = "gfaas"
PLATFORM: Final = "gfaas"
# gfaas keeps one live deployment per function; OIP wants version strings, so every
# function is served as version "1".
MODEL_VERSION: Final = "1"
EXTENSIONS: Final = (
    "binary_tensor_data",
    "model_repository",
    "system_shared_memory",
    "statistics",
    "model_configuration",
)
# Advertised only where ingress can open CUDA IPC handles (see http.create_app).
CUDA_EXTENSION: Final = "cuda_shared_memory"

HEADER_LENGTH: Final = "Inference-Header-Content-Length"

_TO_DTYPE: Final[dict[str, DType]] = {
    "BOOL": DType.BOOL,
    "UINT8": DType.UINT8,
    "UINT16": DType.UINT16,
    "UINT32": DType.UINT32,
    "UINT64": DType.UINT64,
    "INT8": DType.INT8,
    "INT16": DType.INT16,
    "INT32": DType.INT32,
    "INT64": DType.INT64,
    "FP16": DType.FLOAT16,
    "FP32": DType.FLOAT32,
    "FP64": DType.FLOAT64,
}
_TO_OIP: Final[dict[DType, str]] = {d: oip for oip, d in _TO_DTYPE.items()}
_NUMPY: Final[dict[DType, np.dtype[Any]]] = {d: np.dtype(d.value).newbyteorder("<") for d in DType}
_UNSUPPORTED: Final = {
    "BYTES": "BYTES (string) tensors are not supported by gfaas; send numeric tensors",
    "BF16": "BF16 tensors are not supported by gfaas; send FP16 or FP32",
}
# Element kinds JSON data may decode to, per target kind. Like Triton, numbers are not
# coerced across kinds: 1.5 for an INT32 input is an error, not a silent truncation.
_JSON_KINDS: Final = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}
_KIND_WORDS: Final = {"b": "booleans", "u": "integers", "i": "integers", "f": "numbers"}


def datatype_of(dtype: DType) -> str:
    """The OIP datatype name ("FP32") of a gfaas DType ("float32")."""
    return _TO_OIP[dtype]


# -- request JSON, as the protocol defines it (unknown fields tolerated: clients send
#    extras such as "model_name") ------------------------------------------------------

# Dimensions, sizes and the timeout are int64 on the wire (msgpack to the workers, the
# gRPC front's fields): a larger number must be refused here, not overflow encoding.
INT64_MAX: Final = 2**63 - 1
_Dim = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]


class _Input(msgspec.Struct):
    name: str
    shape: list[_Dim]
    datatype: str
    parameters: dict[str, Any] = {}
    data: Any = msgspec.UNSET


class _Output(msgspec.Struct):
    name: str
    parameters: dict[str, Any] = {}


class _Request(msgspec.Struct):
    inputs: list[_Input]
    id: str = ""
    parameters: dict[str, Any] = {}
    outputs: list[_Output] | None = None


class _IndexRequest(msgspec.Struct):
    ready: bool = False


_json = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(_Request)
_index_decoder = msgspec.json.Decoder(_IndexRequest)


# -- parsed request ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShmRef:
    """Bytes in a registered shared-memory region, system or CUDA (one namespace for both,
    as the shared-memory extensions define it)."""

    region: str
    offset: int
    byte_size: int


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool
    shm: ShmRef | None = None


@dataclass(frozen=True, slots=True)
class InferRequest:
    """One OIP inference request, converted."""

    id: str
    invoke: InvokeRequest
    # None: every output the function produces, in its order.
    outputs: tuple[RequestedOutput, ...] | None
    # For outputs the request does not list (`parameters.binary_data_output`).
    binary_outputs: bool
    # Inputs whose bytes are in registered shared memory (their Tensor has no data yet).
    shm_inputs: Mapping[str, ShmRef] = field(default_factory=dict)

    @property
    def uses_shm(self) -> bool:
        return bool(self.shm_inputs) or any(o.shm for o in self.outputs or ())


def parse_header_length(value: str | None, body_length: int) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise bad_request(f"{HEADER_LENGTH} must be an integer, got {value!r}") from None
    if not 0 < length <= body_length:
        raise bad_request(
            f"{HEADER_LENGTH} {length} is outside the {body_length}-byte body (must be 1..body)"
        )
    return length


def parse_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """An OIP inference request body (JSON, or JSON + binary tensors) as gfaas tensors.

    `header_length` is the parsed `Inference-Header-Content-Length` (see
    parse_header_length); without it the whole body is JSON.
    """
    view = memoryview(body)
    header = view if header_length is None else view[:header_length]
    binary = view[len(header) :]
    try:
        request = _request_decoder.decode(header)
    except msgspec.ValidationError as exc:  # before DecodeError: it is a subclass
        raise bad_request(f"invalid inference request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"malformed inference request JSON: {exc}") from None
    except RecursionError:
        raise too_deep("inference request") from None

    _reject_unsupported_request_parameters(request.parameters)
    seen: set[str] = set()
    tensors: list[Tensor] = []
    shm_inputs: dict[str, ShmRef] = {}
    offset = 0
    for item in request.inputs:
        if item.name in seen:
            raise bad_request(f"input {item.name!r} is given more than once")
        seen.add(item.name)
        if "shared_memory_region" in item.parameters:
            tensor, shm_inputs[item.name] = _shm_input(item)
        else:
            tensor, offset = _input_tensor(
                item, binary, offset, has_header=header_length is not None
            )
        tensors.append(tensor)
    if offset != len(binary):
        raise bad_request(
            f"{len(binary) - offset} bytes of binary data after the last binary input "
            f"(inputs declare {offset} bytes in binary_data_size)"
        )

    binary_default = _bool_parameter(request.parameters, "binary_data_output", "request")
    outputs = None
    # An empty list asks for nothing in particular, as an absent one: every output, as
    # the gRPC front (an empty repeated field) and Triton (no requested outputs: all
    # of the model's) do; KServe v2: "if not specified all outputs ... are returned".
    if request.outputs:
        outputs = tuple(_requested_output(o, binary_default) for o in request.outputs)
        names = [o.name for o in outputs]
        if len(set(names)) != len(names):
            raise bad_request(f"an output is requested more than once: {names}")
    invoke = InvokeRequest(inputs=tensors, timeout_ms=_timeout_ms(request.parameters))
    return InferRequest(
        id=request.id,
        invoke=invoke,
        outputs=outputs,
        binary_outputs=binary_default,
        shm_inputs=shm_inputs,
    )


def shm_ref(parameters: Mapping[str, Any], where: str) -> ShmRef:
    """The shared-memory parameters of an input or output; both name and size are required."""
    region = parameters.get("shared_memory_region")
    size = parameters.get("shared_memory_byte_size")
    offset = parameters.get("shared_memory_offset", 0)
    if not isinstance(region, str) or not region:
        raise bad_request(f"{where}: shared_memory_region must be a region name")
    for key, value in (("shared_memory_byte_size", size), ("shared_memory_offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
            raise bad_request(
                f"{where}: {key} must be an integer in [0, 2**63-1], got {_short(value)}"
            )
    assert isinstance(size, int)
    assert isinstance(offset, int)
    return ShmRef(region=region, offset=offset, byte_size=size)


def _shm_input(item: _Input) -> tuple[Tensor, ShmRef]:
    where = f"input {item.name!r}"
    dtype = _dtype_for(item.datatype, where)
    ref = shm_ref(item.parameters, where)
    expected = math.prod(item.shape) * _NUMPY[dtype].itemsize
    if ref.byte_size != expected:
        raise bad_request(
            f"{where}: shared_memory_byte_size {ref.byte_size} does not match "
            f"{item.datatype}{item.shape} ({expected} bytes)"
        )
    if item.data is not msgspec.UNSET or "binary_data_size" in item.parameters:
        raise bad_request(f"{where}: has data and a shared-memory region; give one")
    return Tensor(name=item.name, dtype=dtype, shape=list(item.shape)), ref


def _reject_unsupported_request_parameters(parameters: Mapping[str, Any]) -> None:
    if parameters.get("sequence_id") not in (None, 0, ""):
        raise bad_request("sequence batching (parameters.sequence_id) is not supported by gfaas")


def _timeout_ms(parameters: Mapping[str, Any]) -> int:
    # Triton's `timeout` parameter is in microseconds; gfaas deadlines are milliseconds.
    value = parameters.get("timeout")
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
        raise bad_request(
            f"parameters.timeout must be an integer in [0, 2**63-1] (µs), got {_short(value)}"
        )
    # Integer ceiling: float division of a large int overflows or rounds.
    return -(-value // 1000)


def _short(value: Any) -> str:
    """A value for an error message, cut short (a 400-digit number, say)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _bool_parameter(parameters: Mapping[str, Any], key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise bad_request(f"{where} parameters.{key} must be a boolean, got {value!r}")
    return value


def _requested_output(output: _Output, binary_default: bool) -> RequestedOutput:
    where = f"output {output.name!r}"
    if "classification" in output.parameters:
        raise bad_request(f"{where}: parameters.classification is not supported by gfaas")
    shm = shm_ref(output.parameters, where) if "shared_memory_region" in output.parameters else None
    binary = (
        _bool_parameter(output.parameters, "binary_data", where)
        if "binary_data" in output.parameters
        else binary_default
    )
    return RequestedOutput(name=output.name, binary=binary and shm is None, shm=shm)


def _dtype_for(datatype: str, where: str) -> DType:
    dtype = _TO_DTYPE.get(datatype)
    if dtype is None:
        if datatype in _UNSUPPORTED:
            raise bad_request(f"{where}: {_UNSUPPORTED[datatype]}")
        raise bad_request(f"{where}: unknown datatype {datatype!r} (one of {', '.join(_TO_DTYPE)})")
    return dtype


def _input_tensor(
    item: _Input, binary: memoryview, offset: int, *, has_header: bool
) -> tuple[Tensor, int]:
    where = f"input {item.name!r}"
    dtype = _dtype_for(item.datatype, where)
    np_dtype = _NUMPY[dtype]
    count = math.prod(item.shape)
    expected = count * np_dtype.itemsize
    size = item.parameters.get("binary_data_size")
    if size is None:
        if item.data is msgspec.UNSET:
            raise bad_request(
                f"{where}: no data (give `data`, or binary data with binary_data_size)"
            )
        data = _json_data(item.data, np_dtype, item.datatype, item.shape, where)
        return Tensor(name=item.name, dtype=dtype, shape=list(item.shape), data=data), offset

    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise bad_request(f"{where}: binary_data_size must be a non-negative integer, got {size!r}")
    if item.data is not msgspec.UNSET:
        raise bad_request(f"{where}: has both `data` and binary_data_size; give one")
    if not has_header:
        raise bad_request(f"{where}: binary_data_size given without an {HEADER_LENGTH} header")
    if size != expected:
        raise bad_request(
            f"{where}: binary_data_size {size} does not match {item.datatype}{item.shape} "
            f"({expected} bytes)"
        )
    end = offset + size
    if end > len(binary):
        raise bad_request(
            f"{where}: binary data ends at byte {end} but only {len(binary)} bytes follow "
            "the JSON header"
        )
    chunk = binary[offset:end]
    if item.datatype == "BOOL" and size and np.frombuffer(chunk, dtype=np.uint8).max() > 1:
        raise bad_request(f"{where}: BOOL binary data must be bytes 0 or 1")
    tensor = Tensor(name=item.name, dtype=dtype, shape=list(item.shape), data=bytes(chunk))
    return tensor, end


def _json_data(
    data: Any, np_dtype: np.dtype[Any], datatype: str, shape: Sequence[int], where: str
) -> bytes:
    if not isinstance(data, list):
        raise bad_request(f"{where}: data must be a JSON array, got {type(data).__name__}")
    try:
        values = np.asarray(data).reshape(-1)
    except ValueError:
        raise bad_request(
            f"{where}: data is a ragged array; nest it evenly or flatten it"
        ) from None
    count = math.prod(shape)
    if values.size != count:
        raise bad_request(
            f"{where}: {values.size} elements for shape {list(shape)} ({count} expected)"
        )
    if count == 0:
        return b""
    kind = np_dtype.kind
    if values.dtype.kind not in _JSON_KINDS[kind]:
        raise bad_request(f"{where}: {datatype} data must be {_KIND_WORDS[kind]}")
    # numpy reads `true` among numbers as 1 (Python's bool is an int): [true, 2] was an
    # INT64 [1, 2]. Booleans belong to BOOL tensors alone.
    if kind != "b" and bool in _element_types(data):
        raise bad_request(f"{where}: {datatype} data must be {_KIND_WORDS[kind]}, not booleans")
    if kind in "iu":
        info = np.iinfo(np_dtype)
        low, high = int(values.min()), int(values.max())
        if low < info.min or high > info.max:
            raise bad_request(
                f"{where}: values outside the {datatype} range [{info.min}, {info.max}]"
            )
    # JSON numbers are finite: an infinity after the cast is a value the type cannot
    # hold (above 65504 in FP16), which would have gone on as inf.
    with np.errstate(over="ignore"):
        converted: np.ndarray[Any, Any] = values.astype(np_dtype)
    if kind == "f" and not np.isfinite(converted).all():
        largest = float(np.finfo(np_dtype).max)
        raise bad_request(f"{where}: values outside the {datatype} range (|x| <= {largest:g})")
    return converted.tobytes()


def _element_types(data: list[Any]) -> set[type]:
    """The types of the elements of nested lists `data` (level by level, each in one
    C-speed pass; no recursion, however deep the nesting)."""
    found: set[type] = set()
    levels = [data]
    while levels:
        level = levels.pop()
        types = set(map(type, level))
        if list in types:
            types.discard(list)
            levels.extend(item for item in level if type(item) is list)
        found |= types
    return found


def parse_index_request(body: bytes) -> bool:
    """The `ready` flag of a repository index request; an empty body means false."""
    if not body.strip():
        return False
    try:
        return _index_decoder.decode(body).ready
    except msgspec.MsgspecError as exc:
        raise bad_request(f"invalid repository index request: {exc}") from None
    except RecursionError:
        raise too_deep("repository index request") from None


def too_deep(what: str) -> GfaasError:
    """msgspec decodes `Any` values (and skips unknown fields) recursively and raises
    RecursionError, not a DecodeError, past the interpreter's depth: a few kB of "[[[["
    would otherwise be a 500."""
    return bad_request(f"malformed {what} JSON: too deeply nested")

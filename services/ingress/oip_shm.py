"""The OIP shared-memory extensions' bodies (Triton's system and CUDA shared memory):
register requests and region status. Pure conversions, as oip.py."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Annotated, Final

import msgspec

from services.ingress.oip import INT64_MAX, too_deep
from shared.errors import bad_request

# sizeof(cudaIpcMemHandle_t): what a CUDA shared-memory register request carries.
CUDA_IPC_HANDLE_BYTES: Final = 64

# Sizes, offsets and device ids are 64-bit on the wire (the gRPC status messages): a
# larger one registered over HTTP, whose JSON has no bound, made every later gRPC
# status of the tenant's regions fail INTERNAL, and a CUDA region's bounds were
# checked against it.
_Dim = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
_json = msgspec.json.Encoder()


class _RegisterRequest(msgspec.Struct):
    key: str
    byte_size: _Dim
    offset: _Dim = 0


class RegionStatus(msgspec.Struct):
    name: str
    key: str
    offset: int
    byte_size: int


def parse_register_request(body: bytes) -> tuple[str, int, int]:
    """(key, offset, byte_size) of a system-shared-memory register request."""
    try:
        request = msgspec.json.decode(body, type=_RegisterRequest)
    except msgspec.MsgspecError as exc:
        raise bad_request(f"invalid shared-memory register request: {exc}") from None
    except RecursionError:  # unknown fields are skipped recursively (oip.too_deep)
        raise too_deep("shared-memory register request") from None
    return request.key, request.offset, request.byte_size


class _RawHandle(msgspec.Struct):
    b64: str


class _CudaRegisterRequest(msgspec.Struct):
    raw_handle: _RawHandle
    device_id: _Dim
    byte_size: _Dim


class CudaRegionStatus(msgspec.Struct):
    name: str
    device_id: int
    byte_size: int


def parse_cuda_register_request(body: bytes) -> tuple[bytes, int, int]:
    """(raw IPC handle, device_id, byte_size) of a CUDA-shared-memory register request.

    Everything that can be checked without a GPU is checked here, so a malformed
    request gets its own reason on any node, before a handle is opened.
    """
    try:
        request = msgspec.json.decode(body, type=_CudaRegisterRequest)
    except msgspec.MsgspecError as exc:
        raise bad_request(f"invalid CUDA shared-memory register request: {exc}") from None
    except RecursionError:
        raise too_deep("CUDA shared-memory register request") from None
    try:
        raw = base64.b64decode(request.raw_handle.b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"raw_handle.b64 is not valid base64: {exc}") from None
    if len(raw) != CUDA_IPC_HANDLE_BYTES:
        raise bad_request(
            f"raw_handle is {len(raw)} bytes; a CUDA IPC handle (cudaIpcMemHandle_t) "
            f"is {CUDA_IPC_HANDLE_BYTES}"
        )
    return raw, request.device_id, request.byte_size


def shm_status(regions: Iterable[RegionStatus | CudaRegionStatus]) -> bytes:
    return _json.encode(list(regions))

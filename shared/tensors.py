"""Wire tensors <-> numpy/torch, and validation of inputs against a function's spec."""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.errors import GfaasError
from shared.schema import DType, ErrorCode, FunctionSpec, Tensor, TensorSpec, WorkflowSpec

if TYPE_CHECKING:
    import torch

_NUMPY: dict[DType, np.dtype[Any]] = {d: np.dtype(d.value).newbyteorder("<") for d in DType}
_FROM_NUMPY: dict[str, DType] = {np.dtype(d.value).name: d for d in DType}


@functools.cache
def _from_torch() -> dict[torch.dtype, DType]:
    # Built on first use: a client that only sends numpy never imports torch (it
    # costs a CLI command about a second).
    import torch

    ours: dict[DType, torch.dtype] = {
        DType.BOOL: torch.bool,
        DType.UINT8: torch.uint8,
        DType.UINT16: torch.uint16,
        DType.UINT32: torch.uint32,
        DType.UINT64: torch.uint64,
        DType.INT8: torch.int8,
        DType.INT16: torch.int16,
        DType.INT32: torch.int32,
        DType.INT64: torch.int64,
        DType.FLOAT16: torch.float16,
        DType.FLOAT32: torch.float32,
        DType.FLOAT64: torch.float64,
    }
    return {v: k for k, v in ours.items()}


def _is_torch(value: Any) -> bool:
    """Whether `value` is a torch tensor; one cannot exist before torch is imported."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def itemsize(dtype: DType) -> int:
    return _NUMPY[dtype].itemsize


def nbytes_of(dtype: DType, shape: Sequence[int]) -> int:
    return itemsize(dtype) * math.prod(shape)


def to_numpy(t: Tensor) -> np.ndarray[Any, Any]:
    expected = nbytes_of(t.dtype, t.shape)
    if len(t.data) != expected:
        raise GfaasError(
            ErrorCode.INVALID_INPUT,
            f"tensor {t.name!r}: {len(t.data)} bytes for {t.dtype}{list(t.shape)} "
            f"(expected {expected})",
        )
    return np.frombuffer(t.data, dtype=_NUMPY[t.dtype]).reshape(t.shape)


def to_torch(t: Tensor, device: str = "cpu") -> torch.Tensor:
    # A writable copy: handlers may modify inputs in place, and wire bytes are immutable.
    import torch

    array = to_numpy(t).copy()
    tensor = torch.from_numpy(array)
    return tensor if device == "cpu" else tensor.to(device, non_blocking=True)


def shape_of(spec: FunctionSpec, output: str) -> list[int]:
    """The declared shape of one of the spec's outputs."""
    for t in spec.outputs:
        if t.name == output:
            return list(t.shape)
    raise KeyError(output)


def dtype_of(name: str, tensor: torch.Tensor) -> DType:
    dtype = _from_torch().get(tensor.dtype)
    if dtype is None:
        raise GfaasError(ErrorCode.HANDLER_ERROR, f"output {name!r}: dtype {tensor.dtype}")
    return dtype


def _contiguous(value: Any, keep_rank: bool) -> np.ndarray[Any, Any]:
    """`value` as a C-contiguous array, not copied when it is one. np.ascontiguousarray
    makes a 0-d array (a scalar) 1-d; with `keep_rank` it stays 0-d, as a 0-d torch
    tensor does (a handler's output of declared shape [])."""
    if keep_rank:
        array = np.asarray(value)
        return array if array.flags.c_contiguous else np.ascontiguousarray(array)
    return np.ascontiguousarray(value)


def as_torch(name: str, value: Any, *, keep_rank: bool = False) -> torch.Tensor:
    """A handler's output as a contiguous torch tensor (numpy arrays are not copied)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().contiguous()
    array = _contiguous(value, keep_rank)
    if array.dtype.name not in _FROM_NUMPY:
        raise GfaasError(ErrorCode.HANDLER_ERROR, f"output {name!r}: dtype {array.dtype}")
    return torch.from_numpy(array)


def from_value(name: str, value: Any, *, keep_rank: bool = False) -> Tensor:
    """A wire tensor from a torch tensor or a numpy array (or anything np.asarray takes);
    `keep_rank`: a 0-d one keeps its shape [] (else it becomes [1])."""
    if _is_torch(value):
        tensor = value.detach()
        dtype = dtype_of(name, tensor)
        cpu = tensor.to("cpu").contiguous()
        data = cpu.numpy().tobytes() if cpu.numel() else b""
        return Tensor(name=name, dtype=dtype, shape=list(cpu.shape), data=data)
    array = _contiguous(value, keep_rank)
    dt = _FROM_NUMPY.get(array.dtype.name)
    if dt is None:
        raise GfaasError(ErrorCode.HANDLER_ERROR, f"output {name!r}: dtype {array.dtype}")
    return Tensor(
        name=name,
        dtype=dt,
        shape=list(array.shape),
        data=array.astype(_NUMPY[dt], copy=False).tobytes(),
    )


def from_mapping(values: Mapping[str, Any], *, keep_rank: bool = False) -> list[Tensor]:
    return [from_value(name, value, keep_rank=keep_rank) for name, value in values.items()]


def _check_shape(spec: TensorSpec, shape: Sequence[int]) -> str | None:
    if len(shape) != len(spec.shape):
        return f"rank {len(shape)} (shape {list(shape)}), expected {spec.shape}"
    for got, want in zip(shape, spec.shape, strict=True):
        if got < 0 or (want != -1 and got != want):
            return f"shape {list(shape)}, expected {spec.shape}"
    return None


# The most dimensions an input may have: numpy 1.x's NPY_MAXDIMS (2.x allows 64), so a
# handler on either can hold it.
MAX_RANK = 32
# The most bytes an array may span counting its non-zero dimensions: numpy and torch
# refuse a shape past it even with a zero dimension ([0, 2**63-1] has no bytes, yet
# "array is too big"), so such a shape is the caller's error, found here, not a
# ValueError inside the worker.
_MAX_EXTENT = 2**63 - 1


def shape_problem(dtype: DType, shape: Sequence[int]) -> str | None:
    """Why no array of `dtype` can have `shape` (None: one can)."""
    if len(shape) > MAX_RANK:
        return f"rank {len(shape)} is over the {MAX_RANK} dimensions an array may have"
    if any(d < 0 for d in shape):
        return "negative dimension"
    extent = itemsize(dtype) * math.prod(d for d in shape if d)
    if extent > _MAX_EXTENT:
        return f"shape {list(shape)} is too large for any {dtype} array"
    return None


def validate_inputs(
    spec: FunctionSpec | WorkflowSpec,
    inputs: Sequence[Tensor],
    *,
    unstaged: Collection[str] = (),
) -> None:
    """Raise INVALID_INPUT unless `inputs` match the spec's names, dtypes and shapes.
    Inputs named in `unstaged` have no bytes yet (they are still in the caller's
    shared memory, sized by their reference): their size is not checked."""
    for t in inputs:
        problem = shape_problem(t.dtype, t.shape)
        if problem:
            raise GfaasError(ErrorCode.INVALID_INPUT, f"{t.name!r}: {problem}")
        if t.name in unstaged:
            continue
        size = len(t.data) if t.handle is None else t.handle.nbytes
        if size != nbytes_of(t.dtype, t.shape):
            where = "handle names" if t.handle is not None else "data has"
            raise GfaasError(
                ErrorCode.INVALID_INPUT,
                f"{t.name!r}: {where} {size} bytes for {t.dtype}{list(t.shape)}",
            )
    if not spec.inputs:
        return
    given = {t.name: t for t in inputs}
    if len(given) != len(inputs):
        raise GfaasError(ErrorCode.INVALID_INPUT, "duplicate input names")
    wanted = {s.name for s in spec.inputs}
    unknown = sorted(set(given) - wanted)
    if unknown:
        raise GfaasError(
            ErrorCode.INVALID_INPUT,
            f"{spec.name} has no input(s) {unknown}; inputs are {sorted(wanted)}",
        )
    for s in spec.inputs:
        found = given.get(s.name)
        if found is None:
            raise GfaasError(ErrorCode.INVALID_INPUT, f"missing input {s.name!r}")
        t = found
        if t.dtype != s.dtype:
            raise GfaasError(
                ErrorCode.INVALID_INPUT, f"input {s.name!r}: dtype {t.dtype}, expected {s.dtype}"
            )
        problem = _check_shape(s, t.shape)
        if problem:
            raise GfaasError(ErrorCode.INVALID_INPUT, f"input {s.name!r}: {problem}")


def validate_outputs(
    spec: FunctionSpec, produced: Mapping[str, tuple[DType, Sequence[int]]]
) -> None:
    """Raise HANDLER_ERROR unless a handler's outputs (name -> dtype, shape) are the
    ones its spec declares, as OIP metadata shows them: every declared output, of its
    dtype and a shape the declared one allows (-1: any size), and none it does not
    declare. A spec that declares no outputs lets the handler return any. Reads only
    dtypes and shapes: nothing is copied."""
    if not spec.outputs:
        return
    declared = {s.name: s for s in spec.outputs}
    model = f"model {spec.name!r}"
    unknown = sorted(set(produced) - set(declared))
    if unknown:
        raise GfaasError(
            ErrorCode.HANDLER_ERROR,
            f"{model} returned output(s) {unknown} it does not declare "
            f"(it declares: {', '.join(sorted(declared))})",
        )
    for s in spec.outputs:
        found = produced.get(s.name)
        if found is None:
            # As the OIP fronts word it (oip_response.check_produced).
            raise GfaasError(
                ErrorCode.HANDLER_ERROR,
                f"{model} declares output {s.name!r} but did not produce it "
                f"(it produced: {', '.join(sorted(produced)) or 'none'})",
            )
        dtype, shape = found
        if dtype != s.dtype:
            raise GfaasError(
                ErrorCode.HANDLER_ERROR,
                f"{model} returned output {s.name!r} as {dtype}{list(shape)}, "
                f"declared {s.dtype}{s.shape}",
            )
        problem = _check_shape(s, shape)
        if problem:
            raise GfaasError(
                ErrorCode.HANDLER_ERROR, f"{model} returned output {s.name!r} with {problem}"
            )

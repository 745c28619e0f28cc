"""Pipelined swap-in: copy a model's weights group by group while it already runs.

The model is built on the meta device (no random initialisation), given empty
storage on the target device, and its parameters and buffers are copied from the
host tier in groups of about `group_bytes`, in registration order, on a copy
thread. While the copy runs, every torch operation the model executes waits for
the groups of the model's tensors it reads, so layer i computes while the groups
after it are still copying, and the first request pays little more than the
transfer. On CUDA the copies run on their own stream from pinned memory and the
compute stream waits on CUDA events (see cuda.py).

Waiting per operation, not per module, is what makes it correct: a module may read
a child's weights without calling the child (`nn.MultiheadAttention` passes
`out_proj.weight` to a functional kernel; `nn.TransformerEncoderLayer`'s fast path
reads every weight of the layer in one fused call), so a hook on each module that
waits for that module's own tensors lets such reads see weights not yet copied.
Every module's first call enters a torch function mode (`_Guard`) for the length
of the outermost module call on that thread; the mode looks at each operation's
tensor arguments and waits for the last group among them. Metadata reads (shape,
dtype, device) never wait. The mode also turns torch's fused fast paths off for
the first calls (they check `has_torch_function`); once every group has landed the
mode is no longer entered and warm calls run exactly as without swap-in.

What the mode cannot see: weights read by code outside torch's dispatch (a
pybind11 or Triton kernel given `data_ptr()`), by TorchScript (a model holding a
ScriptModule is copied in whole before it returns), or by a handler that calls
`model.forward` or reads a weight before calling any module. Such models should be
built with `pipelined=False`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from shared.modelswap.host_tier import HostModel

if TYPE_CHECKING:
    from shared.schema import DeviceWeights

DEFAULT_GROUP_BYTES = 2 * 1024 * 1024  # FaaSwap's throughput elbow; bench/swap.py measures it

# Reads of a tensor's metadata: they never need its values, so they never wait.
_METADATA: frozenset[Any] = frozenset(
    [
        getattr(torch.Tensor, name).__get__
        for name in (
            "shape",
            "dtype",
            "device",
            "layout",
            "ndim",
            "requires_grad",
            "is_nested",
            "is_cuda",
            "is_cpu",
            "is_meta",
            "is_sparse",
            "is_quantized",
            "is_leaf",
            "grad_fn",
            "itemsize",
            "nbytes",
        )
        if hasattr(torch.Tensor, name)
    ]
    + [
        getattr(torch.Tensor, name)
        for name in ("size", "dim", "numel", "element_size", "stride", "get_device")
    ]
)


class SwapError(RuntimeError):
    pass


def group_parameters(tensors: list[tuple[str, torch.Tensor]], group_bytes: int) -> list[list[str]]:
    """Consecutive tensors packed into groups of about `group_bytes` (at least one each)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return [g for g in groups if g]


@dataclass
class SwapIn:
    """A swap-in in progress (or done): wait on it, or let the model's guard wait."""

    model: nn.Module
    groups: list[list[str]]
    ready: list[threading.Event]
    device: str = "cpu"
    started_at: float = field(default_factory=time.perf_counter)
    # When the last group landed (on CUDA: the copy stream synchronised), or failed.
    finished_at: float = 0.0
    error: BaseException | None = None
    # Set once `finished_at` is: every weight is on the device, or the copy failed.
    landed: threading.Event = field(default_factory=threading.Event)
    _hooks: list[Any] = field(default_factory=list)
    _device_events: list[Any] = field(default_factory=list)
    # id() of each of the model's tensors -> the group that copies it (last, if tied).
    _group_of: dict[int, int] = field(default_factory=dict)
    # Landed without error: the guard has nothing left to wait for.
    _clear: bool = False
    _local: threading.local = field(default_factory=threading.local)

    @property
    def done(self) -> bool:
        """Every group has landed (on CUDA: copied, not only queued), or the copy failed."""
        return self.landed.is_set()

    def wait_group(self, index: int) -> None:
        self.ready[index].wait()
        if self.error is not None:
            raise SwapError(f"swap-in failed: {self.error!r}") from self.error
        if self._device_events:
            torch.cuda.current_stream().wait_event(self._device_events[index])

    def wait(self) -> None:
        for i in range(len(self.ready)):
            self.wait_group(i)
        self.landed.wait()

    def wait_landed(self, timeout: float | None = None) -> bool:
        """Block until every group has landed (or the copy failed); False on timeout."""
        return self.landed.wait(timeout)

    def detach_hooks(self) -> None:
        """Call between requests once done: later forwards skip the checks entirely."""
        if not self.done:
            raise SwapError("swap-in still running")
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    @property
    def seconds(self) -> float:
        """From the start of the copy to the last group landing (so far, if running)."""
        return (self.finished_at or time.perf_counter()) - self.started_at


def _copy_group(group: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy one group on the CPU (a module-level function so tests can throttle it)."""
    for dst, src in group:
        dst.copy_(src)


def _copy_groups(
    swap: SwapIn, pairs: list[list[tuple[torch.Tensor, torch.Tensor]]], device: str
) -> None:
    # A model built under inference mode has inference tensors: only code in that
    # mode may write them.
    inference = any(dst.is_inference() for group in pairs[:1] for dst, _ in group[:1])
    try:
        if device.startswith("cuda"):
            from shared.modelswap.cuda import copy_groups_cuda

            with torch.inference_mode(inference):
                copy_groups_cuda(swap, pairs, device)
        else:
            with torch.no_grad(), torch.inference_mode(inference):
                for event, group in zip(swap.ready, pairs, strict=True):
                    _copy_group(group)
                    event.set()
    except BaseException as exc:
        swap.error = exc
        for event in swap.ready:
            event.set()
        raise
    finally:
        swap.finished_at = time.perf_counter()
        swap._clear = swap.error is None
        swap.landed.set()


def skeleton(factory: Callable[[], nn.Module]) -> nn.Module:
    """`factory()`'s model on the meta device: its modules and shapes, no storage and
    no initialisation. It needs no weights, so a worker builds it while they are
    still on their way (SAGE's parallel setup: shared.function.WeightsArrival)."""
    with torch.device("meta"), _NoInit():
        return factory()


def instantiate(
    factory: Callable[[], nn.Module] | nn.Module,
    host: HostModel,
    device: str,
    *,
    group_bytes: int = DEFAULT_GROUP_BYTES,
    pipelined: bool = True,
    shared: bool = False,
    device_weights: DeviceWeights | None = None,
) -> tuple[nn.Module, SwapIn]:
    """Build `factory()`'s model on `device` with weights from the host tier
    (`factory` may be its `skeleton` already).

    With `pipelined`, returns at once and the model may be called immediately;
    otherwise returns after every weight has been copied. With `shared`, nothing is
    copied (SAGE's shared read-only weights): on a CPU the model's parameters and
    buffers are read-only views of the host tier's segment, the one copy every
    process on the node that shares the model maps; on a GPU, views of the device's
    one copy that `device_weights` exports (shared.modelswap.device_share).
    """
    model = factory if isinstance(factory, nn.Module) else skeleton(factory)
    own = {name for name in model.state_dict(keep_vars=True)}
    missing = sorted(own - host.tensors.keys())
    unexpected = sorted(host.tensors.keys() - own)
    if missing or unexpected:
        raise SwapError(
            f"weights of {host.name!r} do not fit the model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    # The copies below broadcast: weights of another shape ([1, n] into [m, n], a
    # bias of one into one of m) would be spread over the model's silently, where
    # `load_state_dict` (the file path) refuses them. Dtypes may differ: the copy
    # casts, as `load_state_dict` does (the shared path checks them too).
    for name, tensor in model.state_dict(keep_vars=True).items():
        stored = host.tensors[name]
        if stored.shape != tensor.shape:
            raise SwapError(
                f"weights of {host.name!r} do not fit the model: {name} is "
                f"{list(stored.shape)}, the model wants {list(tensor.shape)}"
            )
    if shared:
        model = _share(model, host, device, device_weights).eval()
        return model, _landed(model, device)
    _materialise(model, device, {})
    model.eval()
    named = list(model.state_dict(keep_vars=True).items())
    groups = group_parameters([(n, host.tensors[n]) for n, _ in named], group_bytes)
    tensors = dict(named)
    pairs = [[(tensors[n].data, host.tensors[n]) for n in group] for group in groups]
    swap = SwapIn(
        model=model, groups=groups, ready=[threading.Event() for _ in groups], device=device
    )
    for index, group in enumerate(groups):
        for name in group:
            swap._group_of[id(tensors[name])] = index
    if device.startswith("cuda"):
        from shared.modelswap.cuda import pin

        pin(host)
    # TorchScript runs its ops where the guard cannot see them: copy first.
    if pipelined and not any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        _install_hooks(model, swap)
        thread = threading.Thread(
            target=_copy_groups, args=(swap, pairs, device), name="swap-in", daemon=True
        )
        thread.start()
    else:
        _copy_groups(swap, pairs, device)
        swap.wait()
    return model, swap


def _materialise(model: nn.Module, device: str, given: Mapping[str, torch.Tensor]) -> None:
    """Give a model built on the meta device its tensors on `device`, in one walk:
    those in `given` (by state-dict name) as they are, the rest empty. What
    `to_empty` does, without its per-tensor memory-format machinery (0.26 ms a
    tensor: half a second for a 1,000-layer MLP) or `load_state_dict(assign=True)`'s
    prefix filtering (quadratic in the modules: 0.9 s for the same model). Tensors
    shared by several modules stay shared."""
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(meta) -> (meta, real)

    def real(key: str, tensor: torch.Tensor, parameter: bool) -> torch.Tensor:
        if id(tensor) in made:
            return made[id(tensor)][1]
        value = given.get(key)
        if value is None:
            value = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        if parameter:
            # Inference never needs gradients, and read-only views must not get any.
            value = nn.Parameter(value, requires_grad=tensor.requires_grad and key not in given)
        made[id(tensor)] = (tensor, value)
        return value

    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = cast(nn.Parameter, real(dot + name, param, True))
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = real(dot + name, buffer, False)


def _share(
    model: nn.Module, host: HostModel, device: str, device_weights: DeviceWeights | None
) -> nn.Module:
    """`model` with the node's one copy of its weights as its weights (no copy): the
    host tier's read-only views on a CPU, the device copy's on a GPU."""
    if device == "cpu":
        views = host.readonly_tensors()
    elif device_weights is not None:
        from shared.modelswap.device_share import shared_views

        views = shared_views(host, device_weights)
    else:
        raise SwapError(f"weights on {device} are shared through a device copy: none was given")
    for name, tensor in model.state_dict(keep_vars=True).items():
        view = views[name]
        if view.dtype != tensor.dtype or view.shape != tensor.shape:
            raise SwapError(
                f"weights of {host.name!r} do not fit the model: {name} is "
                f"{view.dtype} {list(view.shape)}, the model wants "
                f"{tensor.dtype} {list(tensor.shape)}"
            )
    # Non-persistent buffers are not in the state dict: they get empty storage, as
    # `to_empty` would give them.
    _materialise(model, device, views)
    return model


def _landed(model: nn.Module, device: str) -> SwapIn:
    """A swap-in with nothing to copy: landed the moment it is made."""
    swap = SwapIn(model=model, groups=[], ready=[], device=device)
    swap.finished_at = swap.started_at
    swap._clear = True
    swap.landed.set()
    return swap


def _last_group(value: object, group_of: Mapping[int, int]) -> int:
    """The last group holding a tensor in `value` (an argument: tensor, list, dict)."""
    if isinstance(value, torch.Tensor):
        return group_of.get(id(value), -1)
    if isinstance(value, list | tuple):
        return max((_last_group(v, group_of) for v in value), default=-1)
    if isinstance(value, dict):
        return max((_last_group(v, group_of) for v in value.values()), default=-1)
    return -1


# In-place fills that weight initialisation calls: torch.nn.init's (a mode sees the
# outermost call only, not the tensor methods inside it) and the tensor methods that
# modules' own `reset_parameters` call directly.
_FILLS: frozenset[Any] = frozenset(
    [
        *(
            getattr(torch.nn.init, name)
            for name in dir(torch.nn.init)
            if name.endswith("_") and not name.startswith("_")
        ),
        *(
            getattr(torch.Tensor, name)
            for name in (
                "uniform_",
                "normal_",
                "fill_",
                "zero_",
                "random_",
                "exponential_",
                "bernoulli_",
                "log_normal_",
                "cauchy_",
                "geometric_",
            )
        ),
    ]
)


class _NoInit(TorchFunctionMode):  # type: ignore[misc]  # torch.overrides is untyped
    """Skip initialising weights on the meta device. It computes nothing, yet each
    fill goes through the decompositions: about 60 us each, half of building a
    1,000-layer MLP. Its values would be replaced by the host tier's anyway. A mode
    is per thread, so other threads' models are initialised as usual."""

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _FILLS:
            # torch.nn.init's functions are handed their tensor by keyword.
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


class _Guard(TorchFunctionMode):  # type: ignore[misc]  # torch.overrides is untyped
    """While a swap-in runs: each operation first waits for the weights it reads."""

    def __init__(self, swap: SwapIn) -> None:
        super().__init__()
        self.swap = swap
        # Groups are copied (and their events recorded) in order: having waited for
        # group i, the waiting stream has every group up to i.
        self.waited: dict[Any, int] = {}

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        swap = self.swap
        if not swap._clear and func not in _METADATA:
            need = max(_last_group(args, swap._group_of), _last_group(kwargs, swap._group_of))
            if need >= 0:
                stream = torch.cuda.current_stream() if swap.device.startswith("cuda") else None
                if need > self.waited.get(stream, -1):
                    swap.wait_group(need)
                    self.waited[stream] = need
        return func(*args, **kwargs)


def _install_hooks(model: nn.Module, swap: SwapIn) -> None:
    """Enter the guard for the outermost call of any of the model's modules.

    Every module gets the hooks, so a handler that calls a submodule directly is
    guarded as well. A per-thread stack of the modules entered keeps the guard
    until the outermost one returns (or raises: the exit hook is `always_call`)."""

    def enter(module: nn.Module, _args: Any) -> None:
        local = swap._local
        stack: list[int] | None = getattr(local, "stack", None)
        if not stack:
            if swap._clear:
                return
            local.guard = _Guard(swap)
            local.guard.__enter__()
            stack = local.stack = []
        stack.append(id(module))

    def leave(module: nn.Module, _args: Any, _output: Any) -> None:
        local = swap._local
        stack: list[int] | None = getattr(local, "stack", None)
        if not stack or stack[-1] != id(module):
            return
        stack.pop()
        if not stack:
            guard, local.guard = local.guard, None
            guard.__exit__(None, None, None)

    for module in model.modules():
        swap._hooks.append(module.register_forward_pre_hook(enter, prepend=True))
        swap._hooks.append(module.register_forward_hook(leave, always_call=True))

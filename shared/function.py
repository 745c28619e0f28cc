"""What a function's handler receives: the contract between user code and a worker.

A spec's `handler = "module:attr"` names either
- a class: built once per worker as `cls(ctx)` (load weights there) and then called
  per request as `obj(inputs) -> outputs`; or
- a plain function `fn(inputs) -> outputs` with no state.
`inputs` maps input names to torch tensors on `ctx.device`; outputs map names to
torch tensors or numpy arrays: when the spec declares outputs, exactly those, each of
its dtype and a shape the declared one allows (-1: any size), or the call is a
`handler_error` (shared.tensors.validate_outputs). Whether tensors came by value or
by handle is invisible to the handler.

A class with a torch model should build it with `ctx.build(factory)`: the model is
then created without random initialisation and its weights swapped in from the
node's host tier, group by group, while the first request already runs.

When an invocation's outputs go by handle and the spec gives an output's full shape,
the worker leases its buffer before the handler runs: `output_buffer(name)` returns
it, and a handler that writes its result there (`torch.mul(x, 2, out=buf)`) hands
it on without a single copy. Elsewhere it returns None.

A handler that finds its inputs unusable in a way the spec cannot express (too few
classes for a top-k, say) raises `InvalidInput("why")`: the caller gets
`invalid_input` with that reason, not a `handler_error`.

`resolve` imports what a spec names and `contract_problem` checks it against this
contract without building anything: the worker does both before it loads a
handler, and a deploy has them done in a sandbox process (`shared.handler_check`).

Handlers come only from the node's allow-list of packages (`GFAAS_HANDLER_PACKAGES`):
`resolve` refuses anything else (`subprocess:run`, `os:system`, `builtins:eval`)
before importing it, and refuses a target defined outside those packages (a module
re-exporting `os.system`), so a spec written straight into the registry cannot run
arbitrary code either.
"""

from __future__ import annotations

import importlib
import inspect
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import GfaasError, described
from shared.schema import DeviceWeights, ErrorCode, FunctionSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from shared.modelswap import HostModel, SwapIn


class InvalidInput(ValueError):
    """Raised by a handler: the caller's inputs are wrong, and the message says how."""


class WeightsArrival:
    """A function's weights on their way while its handler is built (SAGE's parallel
    setup): the worker fetches them into the host tier (and, on a GPU, has the
    device's copy made) while the build thread imports the handler and builds the
    model's skeleton; the build waits here only when it needs the weights themselves.

    The worker calls exactly one of `arrive` and `fail`, whatever happens to its
    fetch (a cancelled one included): a build thread waits with no timeout."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._failed: str = ""
        self.host: HostModel | None = None
        self.weights_path: Path | None = None
        self.device_weights: DeviceWeights | None = None
        # Wall-clock times, for the instance's start-up timeline: when the weights
        # arrived, and when the build had done all it could without them.
        self.arrived_at = 0.0
        self.built_at = 0.0

    def arrive(
        self,
        host: HostModel | None,
        weights_path: Path | None,
        device_weights: DeviceWeights | None = None,
    ) -> None:
        self.host, self.weights_path, self.device_weights = host, weights_path, device_weights
        self.arrived_at = time.time()
        self._done.set()

    def fail(self, why: str) -> None:
        if not self._done.is_set():
            self._failed = why or "the fetch stopped"
            self._done.set()

    def wait(self) -> None:
        """Until they are here (the build thread); a GfaasError if they never come."""
        if not self.built_at:
            self.built_at = time.time()
        self._done.wait()
        if self._failed:
            raise GfaasError(
                ErrorCode.MODEL_UNAVAILABLE, f"the weights did not arrive: {self._failed}"
            )


@dataclass(frozen=True, kw_only=True)
class LoadContext:
    spec: FunctionSpec
    device: str
    # The pushed weights file, where the node has it on disk; `weights_file()` fetches
    # it when it does not (the host tier was filled from the loading-optimised blob).
    weights_path: Path | None = None
    fetch_file: Callable[[], Path] | None = None
    threads: int = 1
    host: HostModel | None = None
    group_bytes: int = 2 * 1024 * 1024
    pipelined: bool = True
    # Build on the host tier's read-only copy of the weights instead of copying them
    # (CPU instances: see shared.modelswap.instantiate).
    shared: bool = False
    # On a GPU, the device's one copy of the weights that `shared` builds on (the
    # agent's export: shared.modelswap.device_share).
    device_weights: DeviceWeights | None = None
    # Set while the weights are still being fetched: `host`, `weights_path` and
    # `device_weights` come from it once they are here (`host_model`, `build` and
    # `weights_file` wait for them).
    arrival: WeightsArrival | None = None
    swaps: list[SwapIn] = field(default_factory=list)

    def _arrived(self) -> None:
        arrival = self.arrival
        if arrival is None:
            return
        arrival.wait()
        # Frozen for handlers; the context takes in what arrived, once.
        object.__setattr__(self, "host", arrival.host)
        object.__setattr__(self, "weights_path", arrival.weights_path)
        object.__setattr__(self, "device_weights", arrival.device_weights)
        object.__setattr__(self, "arrival", None)

    def host_model(self) -> HostModel | None:
        """The weights in the node's host tier (None: the spec has no model, or this
        node reads the file instead); it waits for them to arrive."""
        self._arrived()
        return self.host

    def weights_file(self) -> Path | None:
        """The model's weights as the file that was pushed (None: the spec has no
        model). For handlers that read the file themselves; `build` needs none."""
        self._arrived()
        if self.weights_path is None and self.fetch_file is not None:
            # Fetched once; frozen otherwise, the context caches what it fetched.
            object.__setattr__(self, "weights_path", self.fetch_file())
        return self.weights_path

    def build(self, factory: Callable[[], nn.Module]) -> nn.Module:
        """`factory()`'s model on this device, with the function's weights."""
        import torch

        from shared.modelswap import instantiate, skeleton

        # The skeleton first, while the weights may still be on their way.
        built: Callable[[], nn.Module] | nn.Module = factory
        if self.arrival is not None:
            built = skeleton(factory)
            self._arrived()
        if self.host is not None:
            model, swap = instantiate(
                built,
                self.host,
                self.device,
                group_bytes=self.group_bytes,
                pipelined=self.pipelined,
                shared=self.shared,
                device_weights=self.device_weights,
            )
            self.swaps.append(swap)
            return model
        model = factory()
        weights = self.weights_file()
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        return model.to(self.device).eval()


_OUTPUT_BUFFERS: ContextVar[Mapping[str, torch.Tensor]] = ContextVar("gfaas_output_buffers")


def output_buffer(name: str) -> torch.Tensor | None:
    """The pooled buffer prepared for output `name` of the running invocation, if any."""
    return _OUTPUT_BUFFERS.get({}).get(name)


@contextmanager
def output_buffers(buffers: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Run a handler with `buffers` offered through `output_buffer` (the worker's side)."""
    token = _OUTPUT_BUFFERS.set(buffers)
    try:
        yield
    finally:
        _OUTPUT_BUFFERS.reset(token)


def handler_packages(setting: str) -> tuple[str, ...]:
    """The allow-list a `handler_packages` setting names ("examples,tests"); a
    ValueError for an entry that is no dotted module name."""
    packages = tuple(p.strip() for p in setting.split(",") if p.strip())
    for package in packages:
        if not _dotted(package):
            raise ValueError(f"handler package {package!r} is not a dotted module name")
    return packages


def _dotted(name: str) -> bool:
    # Dunders are the interpreter's (`__import__`, `__loader__`), never a handler.
    parts = name.split(".")
    return all(p.isidentifier() and not p.startswith("__") for p in parts)


def _within(module: str, packages: Sequence[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def handler_refusal(ref: str, packages: Sequence[str]) -> str | None:
    """Why this node refuses to import `ref` at all, or None: its module must be one
    of `packages` or under one, and both halves plain dotted names."""
    module_name, colon, attr = ref.partition(":")
    if not colon or not _dotted(module_name) or not _dotted(attr):
        return f"handler {ref!r} must be 'module:attr', both dotted Python names without dunders"
    if not _within(module_name, packages):
        allowed = ", ".join(packages) or "none"
        return (
            f"handler {ref!r} is not allowed on this node: module {module_name!r} is in "
            f"none of its handler packages ({allowed}; GFAAS_HANDLER_PACKAGES)"
        )
    return None


def resolve(ref: str, *, packages: Sequence[str]) -> Any:
    """What `ref` ("module:attr", attr dotted or not) names, its module imported here;
    a `handler_error` naming the problem when it cannot be. Only a module within
    `packages` is imported, and only a target defined there is returned."""
    refusal = handler_refusal(ref, packages)
    if refusal is not None:
        raise GfaasError(ErrorCode.HANDLER_ERROR, refusal)
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # whatever the module raises at import
        raise GfaasError(
            ErrorCode.HANDLER_ERROR,
            f"handler {ref!r} cannot be imported: {described(exc)}",
        ) from None
    try:
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise GfaasError(
            ErrorCode.HANDLER_ERROR,
            f"handler {ref!r} cannot be imported: {module_name!r} has no attribute {attr!r}",
        ) from None
    # What can be called must be code of those packages, not something they import
    # (`examples.noop:os.system`); what cannot be called fails the contract anyway.
    home = getattr(obj, "__module__", None)
    if callable(obj) and not (isinstance(home, str) and _within(home, packages)):
        raise GfaasError(
            ErrorCode.HANDLER_ERROR,
            f"handler {ref!r} is not allowed on this node: it is defined in {home!r}, "
            f"outside its handler packages ({', '.join(packages)}; GFAAS_HANDLER_PACKAGES)",
        )
    return obj


def contract_problem(ref: str, target: Any) -> str | None:
    """Why `target` (what `ref` names) is no handler, or None: a function taking
    `inputs`, or a class built as `cls(ctx)` whose instances take `inputs`. Nothing
    is built or called."""
    if inspect.isclass(target):
        name = target.__name__
        problem = _arity_problem(target, "a handler class takes ctx")
        if problem is not None:
            return f"handler {ref!r}: {name}.__init__ {problem}"
        # Dunders are looked up on the type: instances are callable when a class
        # of the MRO (not the metaclass) defines __call__.
        if not any("__call__" in vars(k) for k in target.__mro__):
            return f"handler {ref!r}: instances of {name} are not callable"
        call = inspect.getattr_static(target, "__call__")
        bound = call.__func__ if isinstance(call, staticmethod | classmethod) else call
        if not isinstance(call, staticmethod):
            bound = types.MethodType(bound, target)  # as called on an instance: self dropped
        problem = _arity_problem(bound, "a handler takes inputs")
        return None if problem is None else f"handler {ref!r}: {name}.__call__ {problem}"
    if not callable(target):
        return f"handler {ref!r} is not callable ({type(target).__name__})"
    problem = _arity_problem(target, "a handler takes inputs")
    return None if problem is None else f"handler {ref!r} {problem}"


def _arity_problem(fn: Any, contract: str) -> str | None:
    """Why `fn` cannot be called with one positional argument, or None (also when its
    signature cannot be read)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without one: nothing to check
        return None
    try:
        signature.bind(None)
    except TypeError as exc:
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        n = sum(p.kind in kinds for p in signature.parameters.values())
        if n == 1:  # positionally right, but something else is required
            return f"cannot be called with one argument ({exc}), {contract}"
        return f"takes {n} positional arguments, {contract}"
    return None


def handler_problem(ref: str, packages: Sequence[str]) -> str | None:
    """Why `ref` names no handler (it is not allowed here, cannot be imported, or
    breaks the contract), or None. Imports its module into this process: the worker
    has a sandbox do it."""
    try:
        return contract_problem(ref, resolve(ref, packages=packages))
    except GfaasError as exc:
        return exc.reason

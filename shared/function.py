"""What a function's handler receives: the contract between user code and a worker.

A spec's `handler = "module:attr"` names either
- a class: built once per worker as `cls(ctx)` (load weights there) and then called
  per request as `obj(inputs) -> outputs`; or
- a plain function `fn(inputs) -> outputs` with no state.
`inputs` maps input names to torch tensors on `ctx.device`; outputs map names to
torch tensors or numpy arrays. Whether tensors came by value or by handle is
invisible to the handler.

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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shared.schema import FunctionSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from shared.modelswap import HostModel, SwapIn


class InvalidInput(ValueError):
    """Raised by a handler: the caller's inputs are wrong, and the message says how."""


@dataclass(frozen=True, kw_only=True)
class LoadContext:
    spec: FunctionSpec
    device: str
    weights_path: Path | None = None
    threads: int = 1
    host: HostModel | None = None
    group_bytes: int = 2 * 1024 * 1024
    pipelined: bool = True
    swaps: list[SwapIn] = field(default_factory=list)

    def build(self, factory: Callable[[], nn.Module]) -> nn.Module:
        """`factory()`'s model on this device, with the function's weights."""
        import torch

        if self.host is not None:
            from shared.modelswap import instantiate

            model, swap = instantiate(
                factory,
                self.host,
                self.device,
                group_bytes=self.group_bytes,
                pipelined=self.pipelined,
            )
            self.swaps.append(swap)
            return model
        model = factory()
        if self.weights_path is not None:
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
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

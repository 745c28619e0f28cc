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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shared.schema import FunctionSpec

if TYPE_CHECKING:
    from torch import nn

    from shared.modelswap import HostModel, SwapIn


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

"""What a function's handler receives: the contract between user code and a worker.

A spec's `handler = "module:attr"` names either
- a class: built once per worker as `cls(ctx)` (load weights there) and then called
  per request as `obj(inputs) -> outputs`; or
- a plain function `fn(inputs) -> outputs` with no state.
`inputs` maps input names to torch tensors on `ctx.device`; outputs map names to
torch tensors or numpy arrays. Whether tensors came by value or by handle is
invisible to the handler.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.schema import FunctionSpec


@dataclass(frozen=True, kw_only=True)
class LoadContext:
    spec: FunctionSpec
    device: str
    weights_path: Path | None = None
    threads: int = 1

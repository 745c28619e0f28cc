"""A no-op function: returns its input. What the overhead benchmark invokes."""

from __future__ import annotations

import torch


def noop(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"y": inputs["x"]}

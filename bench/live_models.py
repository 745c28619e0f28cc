"""The models bench.live_policies deploys: MLPs whose shape comes from their weights.

Imported by the workers (the handler below), so it stays light: torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from shared.function import LoadContext

WIDTH = 512  # 1 MiB of float32 weights per layer


def mlp(layers: int, width: int = WIDTH) -> nn.Sequential:
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods)


def write_mlp(path: Path, layers: int, seed: int) -> int:
    """Seeded weights of an MLP with `layers` layers; returns the bytes of weights."""
    torch.manual_seed(seed)
    model = mlp(layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Mlp:
    """Handler: input `x` float32 [n, 512] -> `y` [n, 512]. Its depth is read from
    its weights, so its build waits for them; the subclasses below know theirs, as
    most handlers do, and build their skeleton while the weights are fetched."""

    layers = 0  # 0: as many as the weights have

    def __init__(self, ctx: LoadContext) -> None:
        layers = self.layers
        if not layers:
            host = ctx.host_model()
            assert host is not None, "an Mlp function needs a model"
            layers = sum(1 for name in host.tensors if name.endswith(".weight"))
        factory: Callable[[], nn.Module] = lambda: mlp(layers)  # noqa: E731
        self.model = ctx.build(factory)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"y": self.model(inputs["x"])}


class Mlp10(Mlp):
    layers = 10


class Mlp100(Mlp):
    layers = 100


class Mlp1000(Mlp):
    layers = 1000

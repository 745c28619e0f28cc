"""Seeded weights for the example models: `python -m examples.weights --out DIR`.

No hub downloads: the models are defined in this repo and their weights are
generated deterministically, then pushed to the object store like real ones.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from examples.text.encoder import TinyEncoder
from examples.vision.classifier import TinyResNet

SEED = 20261122


def _save(model_factory: Callable[[], nn.Module], path: Path) -> Path:
    torch.manual_seed(SEED)
    model = model_factory().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def make_vision_weights(path: Path) -> Path:
    return _save(TinyResNet, path)


def make_text_weights(path: Path) -> Path:
    return _save(TinyEncoder, path)


EXAMPLE_MODELS: dict[str, Callable[[Path], Path]] = {
    "vision-cnn": make_vision_weights,
    "text-encoder": make_text_weights,
}


def write_all(out: Path) -> dict[str, Path]:
    return {name: make(out / f"{name}.pt") for name, make in EXAMPLE_MODELS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(".gfaas/weights"))
    args = parser.parse_args()
    for name, path in write_all(args.out).items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

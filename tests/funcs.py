"""Handlers the integration tests deploy (importable by in-process and subprocess workers)."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from shared.function import LoadContext, output_buffer


def echo(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"y": inputs["x"]}


def add_one(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"y": inputs["x"] + 1}


def sleep(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    time.sleep(float(inputs["seconds"].item()))
    return {"slept": inputs["seconds"]}


def boom(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    raise ValueError("the handler failed on purpose")


def not_a_mapping(inputs: dict[str, torch.Tensor]) -> Any:
    return "not tensors"


def big_output(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"y": torch.zeros(4 * 1024 * 1024, dtype=torch.uint8)}


class Scale:
    """A stateful handler: weights loaded once from the model store."""

    def __init__(self, ctx: LoadContext) -> None:
        assert ctx.weights_path is not None
        self.factor = torch.load(ctx.weights_path, weights_only=True)["factor"]

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"y": inputs["x"] * self.factor}


def double(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Writes straight into the pooled output buffer when the worker prepared one."""
    x = inputs["x"]
    buf = output_buffer("y")
    return {"y": torch.mul(x, 2, out=buf) if buf is not None else x * 2}


def hold(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sleeps with its (prepared, by-handle) output buffer leased."""
    time.sleep(float(inputs["seconds"].item()))
    return {"y": torch.ones(256)}


def slow_echo(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    time.sleep(0.3)
    return {"y": inputs["x"].clone()}


def add(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"y": inputs["a"] + inputs["b"]}


# Opened by tests that need a model load to stay in progress for a while.
BUILD_GATE = threading.Event()


class GatedScale(Scale):
    """`Scale`, whose load waits for BUILD_GATE (at most 10 s)."""

    def __init__(self, ctx: LoadContext) -> None:
        BUILD_GATE.wait(10)
        super().__init__(ctx)

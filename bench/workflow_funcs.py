"""The functions of bench.workflow_e2e: CPU preprocess -> conv model -> conv model -> CPU post.

Shapes are fixed (SIDE x SIDE images), so every spec declares its outputs' full
shapes and, when outputs go by handle, each handler writes its result straight into
the worker's pre-leased buffer (`output_buffer`). Sizes per request: image 0.75 MiB
(uint8), pixels 3 MiB, each feature map 8 MiB (float32), result 32 bytes.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.function import LoadContext, output_buffer
from shared.schema import DType, FunctionKind, FunctionSpec, StageSpec, TensorSpec, WorkflowSpec

SIDE = 512
CHANNELS = 8
MEAN, STD = 0.45, 0.225


def _out(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    buf = output_buffer(name)
    if buf is None:
        return {name: value}
    buf.copy_(value)
    return {name: buf}


def preprocess(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """uint8 [H, W, 3] -> normalised float32 [1, 3, H, W]."""
    image = inputs["image"].permute(2, 0, 1).unsqueeze(0)
    buf = output_buffer("pixels")
    out = buf if buf is not None else torch.empty(image.shape, dtype=torch.float32)
    out.copy_(image)  # uint8 -> float32 into the (pooled) output buffer
    out.div_(255.0).sub_(MEAN).div_(STD)
    return {"pixels": out}


class ConvModel:
    """A 3x3 convolution + ReLU with fixed (seeded) weights, built once per worker."""

    IN = 3

    def __init__(self, ctx: LoadContext) -> None:
        def factory() -> nn.Module:
            torch.manual_seed(self.IN)
            return nn.Conv2d(self.IN, CHANNELS, kernel_size=3, padding=1)

        self.model = ctx.build(factory)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        buf = output_buffer("y")
        with torch.inference_mode():
            y = self.model(inputs["x"])
            if buf is None:
                return {"y": torch.relu_(y)}
            torch.clamp_min(y, 0.0, out=buf)
        return {"y": buf}


class ConvModel2(ConvModel):
    IN = CHANNELS


def postprocess(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Feature map [1, C, H, W] -> per-channel mean [C] (softmax'd): a small output."""
    pooled = inputs["x"].mean(dim=(0, 2, 3))
    return _out("scores", torch.softmax(pooled, dim=0))


def _t(name: str, dtype: DType, shape: list[int]) -> list[TensorSpec]:
    return [TensorSpec(name=name, dtype=dtype, shape=shape)]


FMAP = [1, CHANNELS, SIDE, SIDE]
F32 = DType.FLOAT32


def specs(concurrency: int) -> list[FunctionSpec]:
    mod = "bench.workflow_funcs"
    return [
        FunctionSpec(
            name="e2e-pre",
            handler=f"{mod}:preprocess",
            inputs=_t("image", DType.UINT8, [SIDE, SIDE, 3]),
            outputs=_t("pixels", F32, [1, 3, SIDE, SIDE]),
            concurrency=concurrency,
        ),
        FunctionSpec(
            name="e2e-conv1",
            handler=f"{mod}:ConvModel",
            kind=FunctionKind.GPU,
            inputs=_t("x", F32, [1, 3, SIDE, SIDE]),
            outputs=_t("y", F32, FMAP),
            concurrency=concurrency,
        ),
        FunctionSpec(
            name="e2e-conv2",
            handler=f"{mod}:ConvModel2",
            kind=FunctionKind.GPU,
            inputs=_t("x", F32, FMAP),
            outputs=_t("y", F32, FMAP),
            concurrency=concurrency,
        ),
        FunctionSpec(
            name="e2e-post",
            handler=f"{mod}:postprocess",
            inputs=_t("x", F32, FMAP),
            outputs=_t("scores", F32, [CHANNELS]),
            concurrency=concurrency,
        ),
    ]


WORKFLOW = WorkflowSpec(
    name="e2e-vision",
    inputs=_t("image", DType.UINT8, [SIDE, SIDE, 3]),
    stages=[
        StageSpec(name="pre", function="e2e-pre", inputs={"image": "$in.image"}),
        StageSpec(name="conv1", function="e2e-conv1", inputs={"x": "pre.pixels"}),
        StageSpec(name="conv2", function="e2e-conv2", inputs={"x": "conv1.y"}),
        StageSpec(name="post", function="e2e-post", inputs={"x": "conv2.y"}),
    ],
    outputs={"scores": "post.scores"},
    timeout_ms=60_000,
)

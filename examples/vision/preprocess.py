"""Image-classification step 1 (CPU): uint8 HWC image -> normalised float32 NCHW."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIZE = 64
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def preprocess(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    image = inputs["image"]  # [H, W, 3] uint8
    x = image.permute(2, 0, 1).unsqueeze(0).float() / 255.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return {"pixels": ((x - MEAN) / STD).contiguous()}

"""Image-classification step 3 (CPU): logits -> the five most likely classes."""

from __future__ import annotations

import torch

K = 5


def topk(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    probs = torch.softmax(inputs["logits"].float(), dim=-1)
    values, indices = torch.topk(probs, K, dim=-1)
    return {"classes": indices.to(torch.int64), "probs": values}

"""Image-classification step 3 (CPU): logits -> the five most likely classes."""

from __future__ import annotations

import torch

from shared.function import InvalidInput

K = 5


def topk(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    logits = inputs["logits"]
    if logits.shape[-1] < K:
        raise InvalidInput(f"logits have {logits.shape[-1]} classes; top-{K} needs at least {K}")
    probs = torch.softmax(logits.float(), dim=-1)
    values, indices = torch.topk(probs, K, dim=-1)
    return {"classes": indices.to(torch.int64), "probs": values}

"""A small transformer text encoder: byte tokens -> L2-normalised sentence embedding."""

from __future__ import annotations

import torch
from torch import nn

from examples.text.tokenize import MAX_LEN, VOCAB
from shared.function import LoadContext

D_MODEL = 128


class TinyEncoder(nn.Module):
    def __init__(self, d_model: int = D_MODEL, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(MAX_LEN, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.encoder(self.embed(tokens) + self.pos(positions))
        pooled = self.norm(h).mean(dim=1)
        return nn.functional.normalize(pooled, dim=-1)


class TextEncoder:
    def __init__(self, ctx: LoadContext) -> None:
        self.device = ctx.device
        self.model = ctx.build(TinyEncoder)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = inputs["tokens"].to(self.device).clamp(0, VOCAB - 1)[:, :MAX_LEN]
        return {"embedding": self.model(tokens)}

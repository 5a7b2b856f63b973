"""Small transformer text encoder over the trained WordPiece tokenizer; token 0 is [CLS]."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cirflow.core.config import check_fraction, check_positive
from cirflow.models.layers import Block


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 1000  # set from the trained tokenizer when the model is built
    max_length: int = 32
    dim: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    embed_dim: int = 128

    def __post_init__(self) -> None:
        # layers > 0: without a transformer block the [CLS] token never sees the caption, so every caption
        # would get the same pooled vector.
        check_positive(self, "vocab_size", "max_length", "dim", "layers", "heads", "mlp_ratio", "embed_dim")
        check_fraction(self, "dropout")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")


class TextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos = nn.Parameter(torch.randn(1, config.max_length, config.dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(config.dim, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.layers)
        )
        self.ln = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask (B, L) -> tokens (B, L, dim) and pooled [CLS] vector (B, embed_dim), not normalised."""
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]  # (B, L, dim)
        for block in self.blocks:
            x = block(x, mask)
        x = self.ln(x)
        return x, self.head(x[:, 0])

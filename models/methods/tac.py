"""Twin Attention-based vision Compositor (TAC), shared by CaLa's CTR branch and DRA's implicit relation.

As the official CLIP variant: two single-head attention blocks (nn.MultiheadAttention: in/out projections,
no residual) with separate weights. Branch 1 queries with the reference tokens over the target tokens,
branch 2 the reverse; each block is applied `steps` times with the same weights, the query staying the
original tokens and the keys/values being the previous output (first step: the other image's tokens).
c = mean of the two branches' token 0.

Deliberate fix (methods.md): the original prepended a fresh `torch.randn` "CLS" to both token sets on every
forward pass, so token 0, the output, was a random query; we prepend a learned CLS parameter instead.
"""

from __future__ import annotations

import torch
from torch import nn


class TwinAttentionCompositor(nn.Module):
    def __init__(self, dim: int, steps: int, dropout: float, heads: int = 1) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"TAC needs steps >= 1, got {steps}")
        self.steps = steps
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)  # shared by both token sets, as the original's
        self.reference_query = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.target_query = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def _branch(self, attention: nn.MultiheadAttention, query: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        out = other
        for _ in range(self.steps):  # same weights each step; the query stays the original tokens
            out, _ = attention(query, out, out, need_weights=False)
        return out[:, 0]  # (B, d)

    def forward(self, reference: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """reference (B, N, d), target (B, N, d) -> c (B, d), not normalised."""
        cls = self.cls.expand(reference.shape[0], -1, -1)
        r = torch.cat([cls, reference], dim=1)  # (B, 1 + N, d)
        g = torch.cat([cls, target], dim=1)
        return (self._branch(self.reference_query, r, g) + self._branch(self.target_query, g, r)) / 2

"""CaLa's Hinge-based Cross-Attention (HCA): a two-hop attention from reference to target tokens via the text.

"Hinge" is the text acting as the pivot, not a hinge loss (methods.md). Single head, no residual, LayerNorm
or FFN, biased projections, as in the official CLIP variant:

    A = (R Wq)(T Wk)^T / sqrt(d)      (B, Nr, L)  reference tokens attend to text tokens
    B = (T Wk)(G Wk2)^T / sqrt(d)     (B, L, Ng)  the same text projection attends to target tokens
    G_hat = Dropout(softmax(A B)) (G Wv)          (B, Nr, d); CaLa uses G_hat[:, 0]

Text padding. There is no softmax over the text positions (they are summed out inside A B), so -inf masking
does not apply; the original applies no mask at all. We zero the projected text keys T Wk at padded
positions, which zeroes column j of A and row j of B, so A B = sum over REAL text tokens j of A_ij B_jk:
padding contributes exactly nothing and the result equals running HCA on the unpadded caption. (The sum is
kept, not turned into a mean, as in the original, so longer captions give sharper attention.)
"""

from __future__ import annotations

import math

import torch
from torch import nn


class HingeCrossAttention(nn.Module):
    def __init__(self, image_dim: int, text_dim: int, dropout: float) -> None:
        super().__init__()
        self.query = nn.Linear(image_dim, image_dim)  # Wq on the reference tokens
        self.text_key = nn.Linear(text_dim, image_dim)  # Wk, shared by both hops
        self.target_key = nn.Linear(image_dim, image_dim)  # Wk2
        self.value = nn.Linear(image_dim, image_dim)  # Wv
        self.drop = nn.Dropout(dropout)  # 0.1 in the original, on the attention probabilities

    def forward(self, reference: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        """reference (B, Nr, d), text (B, L, d_text), text_mask (B, L), target (B, Ng, d) -> G_hat (B, Nr, d)."""
        scale = 1.0 / math.sqrt(self.query.out_features)
        k = self.text_key(text) * text_mask[..., None].to(text.dtype)  # (B, L, d); padded rows exactly 0
        a = self.query(reference) @ k.transpose(1, 2) * scale  # (B, Nr, L)
        b = k @ self.target_key(target).transpose(1, 2) * scale  # (B, L, Ng)
        attn = self.drop(torch.softmax(a @ b, dim=-1))  # (B, Nr, Ng)
        return attn @ self.value(target)  # (B, Nr, d)

"""Compact image encoder: a conv pyramid down to a coarse token grid, then a small transformer.

Convolutions find shapes and colours cheaply at full resolution; the transformer over the coarse grid (with
learned position embeddings) relates objects to each other and to their positions. Token 0 is a learned CLS
slot whose output, projected, is the pooled image vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cirflow.core.config import check_fraction, check_positive
from cirflow.models.layers import Block


@dataclass(frozen=True)
class ImageEncoderConfig:
    image_size: int = 64
    widths: tuple[int, ...] = (32, 64, 128)  # channels per conv stage; each stage after the first halves H, W
    # Patchify stem: 64 px -> 16 -> 8 -> 4, a 4x4 token grid. A stride-2 stem (8x8 grid) trained 4x slower
    # on 2 cores for no gain within the demo's budget.
    stem_stride: int = 4
    dim: int = 128  # token width, shared with the text encoder so that token-level modules can mix them
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    embed_dim: int = 128  # pooled vector size, the retrieval space

    def __post_init__(self) -> None:
        # layers > 0: without a transformer block the CLS token never sees the image, so every image would get
        # the same pooled vector.
        check_positive(self, "image_size", "stem_stride", "dim", "layers", "heads", "mlp_ratio", "embed_dim")
        check_fraction(self, "dropout")
        if not self.widths or not all(w > 0 for w in self.widths):
            raise ValueError(f"widths={list(self.widths)} must be one or more positive channel counts")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")
        if self.grid < 1:
            raise ValueError(f"image_size={self.image_size} is too small for {len(self.widths)} conv stages "
                             f"after a stride-{self.stem_stride} stem")

    @property
    def grid(self) -> int:
        """Side of the token grid: the stem divides H and W by stem_stride, each later stage halves them."""
        return self.image_size // (self.stem_stride * 2 ** (len(self.widths) - 1))


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=(kernel - 1) // 2 if stride == 1 else 0, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.GELU())


class ImageEncoder(nn.Module):
    def __init__(self, config: ImageEncoderConfig) -> None:
        super().__init__()
        self.config = config
        stages, c_in = [], 3
        for i, width in enumerate(config.widths):
            stride = config.stem_stride if i == 0 else 2
            # kernel == stride: downsampling sees every pixel once; the 3x3 conv then mixes neighbours.
            stages += [_conv_bn(c_in, width, stride, stride), _conv_bn(width, width, 3, 1)]
            c_in = width
        self.convs = nn.Sequential(*stages)
        self.grid = config.grid
        self.to_tokens = nn.Linear(c_in, config.dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + self.grid * self.grid, config.dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(config.dim, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.layers)
        )
        self.ln = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.embed_dim)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> tokens (B, 1 + g*g, dim) and pooled vector (B, embed_dim), not normalised."""
        x = self.convs(pixels)  # (B, C, g, g)
        x = self.to_tokens(x.flatten(2).transpose(1, 2))  # (B, g*g, dim)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos  # (B, 1 + g*g, dim)
        for block in self.blocks:
            x = block(x)
        x = self.ln(x)
        return x, self.head(x[:, 0])

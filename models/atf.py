"""TMCIR's Adaptive Token Fusion (ATF) composer: merge matching text tokens into visual tokens, then pool.

The paper's exact formula and threshold were not reachable, so the operator below is OUR design (methods.md):

1. S = cos(V, W): (B, Nv, L) cosine similarity of every visual token with every real text token.
2. Merge. Text token j is kept for visual token i when S_ij > theta and j is not padding. Its weight is a
   softmax of S/tau over the kept tokens of row i only (a masked softmax; a row with no kept token gets zero
   weights, not NaN): V'_i = V_i + sum_j w_ij W_j. The visual token keeps its position and slot.
3. Unmatched text. Real text tokens that no visual token kept are pooled (masked mean) into ONE extra token,
   appended after V' and marked with a learned type embedding. When every real token matched (or there is
   no real token), that extra token is masked out of attention, so it cannot inject a zero vector.
   (Appending rather than adding to every token keeps the unmatched text attributable to no image region.)
4. Pool. One pre-norm transformer Block (models.layers) over [V'; pooled text], then LayerNorm and a Linear
   from token width d to D on the first token (V's CLS slot): q = normalize(v + t + proj). The projection
   starts at zero, so an untrained ATF is exactly the `sum` composer and training only adds token-level
   corrections to a known-good baseline.

Everything is a fixed-shape tensor op (the kept and unmatched sets are masks, never boolean indexing; no loop
over the batch), so the composer exports to ONNX with the dynamo exporter and each example's output depends
on that example alone. Ablate theta with `model.composer.atf_threshold` (the paper sweeps a similarity
threshold); theta > 1 disables merging (every text token takes the pooled path).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cirflow.models.layers import Block


class FusionConfig(Protocol):
    """What ATF reads of its config (models.composers.ComposerConfig). A protocol rather than that class:
    models.composers imports this module to register ATF, so this module must not import it back."""

    @property
    def atf_threshold(self) -> float: ...

    @property
    def atf_temperature(self) -> float: ...

    @property
    def atf_heads(self) -> int: ...

    @property
    def atf_mlp_ratio(self) -> float: ...

    @property
    def atf_dropout(self) -> float: ...


def merge_tokens(image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                 threshold: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-3 of the module docstring, parameter-free.

    image_tokens (B, Nv, d), text_tokens (B, L, d), text_mask (B, L) with 1 = real token. Returns the fused
    visual tokens V' (B, Nv, d), the masked mean of the unmatched real text tokens (B, d) (zero when there
    is none) and whether there is any (B,) bool.
    """
    real = text_mask.bool()  # (B, L)
    s = F.normalize(image_tokens, dim=-1) @ F.normalize(text_tokens, dim=-1).transpose(1, 2)  # (B, Nv, L)
    keep = (s > threshold) & real[:, None, :]  # (B, Nv, L)
    logits = (s / temperature).masked_fill(~keep, torch.finfo(s.dtype).min)
    # A row with nothing kept has a uniform softmax over equal minima; multiplying by `keep` zeroes it.
    weights = torch.softmax(logits, dim=-1) * keep  # (B, Nv, L)
    fused = image_tokens + weights @ text_tokens  # (B, Nv, d)
    unmatched = (real & ~keep.any(dim=1)).to(text_tokens.dtype)  # (B, L)
    count = unmatched.sum(dim=1, keepdim=True)  # (B, 1)
    pooled = (unmatched[..., None] * text_tokens).sum(dim=1) / count.clamp(min=1.0)  # (B, d)
    return fused, pooled, count[:, 0] > 0


class AdaptiveTokenFusion(nn.Module):
    """The `atf` composer: (v, t, V, W, mask) -> q, see the module docstring."""

    def __init__(self, embed_dim: int, token_dim: int, config: FusionConfig) -> None:
        super().__init__()
        dim = token_dim
        self.threshold = config.atf_threshold
        self.temperature = config.atf_temperature
        self.dim = dim
        self.text_type = nn.Parameter(torch.zeros(1, 1, dim))  # marks the pooled unmatched-text token
        self.block = Block(dim, config.atf_heads, config.atf_mlp_ratio, config.atf_dropout)
        self.ln = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, embed_dim)
        nn.init.zeros_(self.proj.weight)  # start as the sum composer (see the module docstring)
        nn.init.zeros_(self.proj.bias)

    def forward(self, v: torch.Tensor, t: torch.Tensor, image_tokens: torch.Tensor,
                text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        if image_tokens.shape[-1] != self.dim or text_tokens.shape[-1] != self.dim:
            raise ValueError(f"atf expects token width {self.dim}; "
                             f"got image {image_tokens.shape[-1]}, text {text_tokens.shape[-1]}")
        fused, pooled, has_unmatched = merge_tokens(image_tokens, text_tokens, text_mask, self.threshold,
                                                    self.temperature)
        x = torch.cat([fused, pooled[:, None, :] + self.text_type], dim=1)  # (B, Nv + 1, d)
        visual = torch.ones_like(fused[..., 0], dtype=torch.bool)  # (B, Nv)
        key_mask = torch.cat([visual, has_unmatched[:, None]], dim=1)  # (B, Nv + 1)
        x = self.block(x, key_mask)
        return F.normalize(v + t + self.proj(self.ln(x[:, 0])), dim=-1)  # (B, D)

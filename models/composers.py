"""Composers: (reference image, modification text) features -> query vector q.

Every composer takes the same arguments (pooled vectors and token sequences) so that the model, training
and export treat them alike; each uses what it needs. Inputs v and t arrive L2-normalised; q leaves so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cirflow.core.config import check_fraction, check_positive
from cirflow.models.artemis import Artemis
from cirflow.models.atf import AdaptiveTokenFusion


@dataclass(frozen=True)
class ComposerConfig:
    name: str = "combiner"  # a key of COMPOSERS
    # Combiner sizes relative to the embedding size D. CLIP4Cir used D=640, P=2560 (4D), H=5120 (8D);
    # smaller ratios suit the tiny built-in model, where the combiner would otherwise dwarf the encoders.
    projection_ratio: float = 2.0
    hidden_ratio: float = 4.0
    dropout: float = 0.5  # CLIP4Cir's value; it regularises the over-parameterised fusion MLP
    # ATF (models/atf.py, our design): a text token merges into a visual token when their cosine exceeds
    # atf_threshold (the paper sweeps this; > 1 disables merging); merge weights are softmax(S / temperature).
    atf_threshold: float = 0.2
    atf_temperature: float = 0.1  # sharp enough that the best-matching text token dominates a merge
    atf_heads: int = 4  # the one pooling Block's attention heads (must divide the token width)
    atf_mlp_ratio: float = 2.0  # as the built-in encoders' blocks
    atf_dropout: float = 0.1  # light: the Block is small and sits after the (undropped) merge
    # ARTEMIS (models/artemis.py): the attended target normalised as in the paper (True: the folded query vector
    # ranks approximately and the bundle carries a re-ranker), or not (our variant: the score is one dot product)
    artemis_target_norm: bool = True

    def __post_init__(self) -> None:
        if self.name not in COMPOSERS:
            raise ValueError(f"unknown composer {self.name!r}; choose one of {sorted(COMPOSERS)}")
        check_positive(self, "projection_ratio", "hidden_ratio", "atf_temperature", "atf_heads", "atf_mlp_ratio")
        check_fraction(self, "dropout", "atf_dropout")


class SumComposer(nn.Module):
    """q = normalize(v + t): the element-wise-sum baseline (CLIP4Cir stage 1, CaLa's BLIP-2 runs)."""

    def __init__(self, embed_dim: int, token_dim: int, config: ComposerConfig) -> None:
        super().__init__()

    def forward(self, v: torch.Tensor, t: torch.Tensor, image_tokens: torch.Tensor,
                text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(v + t, dim=-1)


class Combiner(nn.Module):
    """CLIP4Cir's Combiner: an MLP over both projections plus a learned convex mix of v and t."""

    def __init__(self, embed_dim: int, token_dim: int, config: ComposerConfig) -> None:
        super().__init__()
        p = int(embed_dim * config.projection_ratio)
        h = int(embed_dim * config.hidden_ratio)
        self.text_proj = nn.Sequential(nn.Linear(embed_dim, p), nn.ReLU(), nn.Dropout(config.dropout))
        self.image_proj = nn.Sequential(nn.Linear(embed_dim, p), nn.ReLU(), nn.Dropout(config.dropout))
        self.hidden = nn.Sequential(nn.Linear(2 * p, h), nn.ReLU(), nn.Dropout(config.dropout))
        self.out = nn.Linear(h, embed_dim)
        self.gate = nn.Sequential(nn.Linear(2 * p, h), nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(h, 1),
                                  nn.Sigmoid())

    def forward(self, v: torch.Tensor, t: torch.Tensor, image_tokens: torch.Tensor,
                text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        both = torch.cat([self.text_proj(t), self.image_proj(v)], dim=-1)  # (B, 2P)
        lam = self.gate(both)  # (B, 1): how much of the query is the text vs the reference image
        return F.normalize(self.out(self.hidden(both)) + lam * t + (1 - lam) * v, dim=-1)


COMPOSERS: dict[str, type[nn.Module]] = {"sum": SumComposer, "combiner": Combiner, "atf": AdaptiveTokenFusion,
                                         "artemis": Artemis}


def build_composer(embed_dim: int, token_dim: int, config: ComposerConfig) -> nn.Module:
    """`embed_dim`: size of v, t and q; `token_dim`: width of the token sequences (token-level composers)."""
    return COMPOSERS[config.name](embed_dim, token_dim, config)

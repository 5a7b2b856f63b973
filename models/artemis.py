"""ARTEMIS (Delmas et al., ICLR 2022: Attention-based Retrieval with Text-Explicit Matching and Implicit
Similarity) as a composer whose exact score is not one dot product, with the query vector that folds it.

The score, as the official code computes it (naver/artemis, artemis_model.py; r, m, t are the unit vectors of
the reference image, the text and the target image):
- A(m) = softmax(Linear(ReLU(Linear(m)))) over the D dimensions: a text-conditioned attention; two of them,
  A_EM and A_IS, with their own weights; Tr(m) = normalize(Linear(m)).
- Explicit matching  EM = <Tr(m), normalize(A_EM(m) * t)>: the text-modified query against the target seen
  through the text's attention.
- Implicit similarity IS = <normalize(A_IS(m) * r), normalize(A_IS(m) * t)>: reference and target compared
  through another text-conditioned attention.
- score = EM + IS; trained with cross-entropy over the batch's scores times a learned scale (the official
  code's exp(temperature), from 2.65926; here the training's LogitScale, as for every composer).

Rearranged for retrieval. The attentions are elementwise, so each term is a vector linear in t over a norm
that depends on t:  EM = <Tr(m) * a_em, t> / ||a_em * t||,  IS = <normalize(a_is * r) * a_is, t> / ||a_is * t||.
- The numerators fold into query vectors; the denominators do not (they differ per target). The query vector
  searched (forward) is the fold with each denominator replaced by its value for a target spread evenly over
  the dimensions, ||a|| / sqrt(D) (the common 1/sqrt(D) dropped): q = normalize(em / ||a_em|| + is / ||a_is||).
  It ranks the catalog approximately; `score` re-ranks the index's top-N candidates exactly, from
  `query_features` (B, 4, D) = [em numerator, a_em^2, is numerator, a_is^2] and the candidates' stored vectors.
- `target_norm=False` (ComposerConfig.artemis_target_norm) drops the normalisation of the attended target
  (OUR variant, not the paper's): the score is then <em + is, t>, exactly one dot product, and the folded
  vector ranks exactly as the score does: no re-rank is needed.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class ArtemisConfig(Protocol):
    """What ARTEMIS reads of models.composers.ComposerConfig (named here: composers imports this module)."""

    artemis_target_norm: bool


FEATURES = 4  # rows of query_features: em numerator, a_em^2, is numerator, a_is^2
EPS = 1e-12  # F.normalize's floor on a norm: the exact score divides as normalize does


class TextAttention(nn.Module):
    """ARTEMIS's attention mechanism: softmax(Linear(ReLU(Linear(m)))) over the D dimensions."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(m), dim=-1)


class Artemis(nn.Module):
    """The ARTEMIS composer (module docstring). forward: the folded query vector; query_features and score: the
    exact score of candidates, for training and for the re-rank."""

    def __init__(self, embed_dim: int, token_dim: int, config: ArtemisConfig) -> None:
        super().__init__()
        self.transform = nn.Linear(embed_dim, embed_dim)
        self.attention_em = TextAttention(embed_dim)
        self.attention_is = TextAttention(embed_dim)
        self.target_norm = config.artemis_target_norm

    @property
    def folds_exactly(self) -> bool:
        """Whether the query vector ranks as the score does (no re-rank needed)."""
        return not self.target_norm

    def forward(self, v: torch.Tensor, t: torch.Tensor, image_tokens: torch.Tensor,
                text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        em, a_em, is_, a_is = self._parts(v, t)
        if not self.target_norm:
            return F.normalize(em + is_, dim=-1)
        return F.normalize(em / a_em.norm(dim=-1, keepdim=True) + is_ / a_is.norm(dim=-1, keepdim=True), dim=-1)

    def query_features(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, 4, D): the EM numerator Tr(m) * a_em, a_em^2, the IS numerator normalize(a_is * r) * a_is, a_is^2."""
        em, a_em, is_, a_is = self._parts(v, t)
        return torch.stack([em, a_em * a_em, is_, a_is * a_is], dim=1)

    def _parts(self, v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The EM numerator, a_em, the IS numerator, a_is (each (B, D)); m is the text vector t here, r the
        reference's v."""
        a_em, a_is = self.attention_em(t), self.attention_is(t)
        return F.normalize(self.transform(t), dim=-1) * a_em, a_em, F.normalize(a_is * v, dim=-1) * a_is, a_is

    def score(self, features: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(B, N) exact scores of each query's candidates: features (B, 4, D), candidates (B, N, D), or (1, N, D)
        for one candidate set shared by every query (a training batch's images)."""
        em, a_em2, is_, a_is2 = features.unbind(1)
        candidates = candidates.expand(features.shape[0], -1, -1)  # shape[0], not len(): stays symbolic in export
        em_num = torch.einsum("bnd,bd->bn", candidates, em)
        is_num = torch.einsum("bnd,bd->bn", candidates, is_)
        if not self.target_norm:
            return em_num + is_num
        squared = candidates * candidates
        em_den = torch.einsum("bnd,bd->bn", squared, a_em2).sqrt().clamp(min=EPS)
        is_den = torch.einsum("bnd,bd->bn", squared, a_is2).sqrt().clamp(min=EPS)
        return em_num / em_den + is_num / is_den


def reference_score(composer: Artemis, r: torch.Tensor, m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The official code's compute_score_artemis, written as it is there (scores of pair i with target i): the
    oracle the rearranged score is tested against."""
    a_em, a_is = composer.attention_em(m), composer.attention_is(m)
    target_em, target_is = a_em * t, a_is * t
    if composer.target_norm:
        target_em, target_is = F.normalize(target_em, dim=-1), F.normalize(target_is, dim=-1)
    em = (F.normalize(composer.transform(m), dim=-1) * target_em).sum(-1)
    return em + (F.normalize(a_is * r, dim=-1) * target_is).sum(-1)

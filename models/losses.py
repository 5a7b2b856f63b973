"""Contrastive losses shared by every training recipe."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def info_nce(queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """InfoNCE(a, b; s): cross-entropy over logits s * <a_i, k_j>; query i's positive is key i.

    `keys` may hold more rows than `queries` (extra hard negatives after the B positives).
    """
    logits = scale * queries @ keys.T  # (B, K)
    return F.cross_entropy(logits, torch.arange(queries.shape[0], device=queries.device))


class LogitScale(nn.Module):
    """A learned InfoNCE scale kept in log space and clamped, as in CLIP; fixed when not learned."""

    def __init__(self, init: float, learn: bool, maximum: float) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)), requires_grad=learn)
        self.maximum = maximum

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.maximum)


def batch_contrastive(similarities: torch.Tensor, positive: torch.Tensor, excluded: torch.Tensor,
                      scale: torch.Tensor | float, symmetric: bool = False) -> torch.Tensor:
    """InfoNCE of each query against every distinct image of the batch.

    similarities (B, U): each query's score of each distinct image (q @ g^T, or a composer's exact score:
    CIRModel.query_scores); positive (B,) and excluded (B,) columns. The excluded key (the query's
    own reference, which the CIRR protocol removes from rankings) is masked out; an image that is the target of
    several queries appears once in `keys`, so it is never a false negative.
    `symmetric` adds the target -> query direction: each query's target must pick its query among the batch's
    queries (those sharing the target masked), which asks the text side to tell siblings' captions apart.
    """
    logits = scale * similarities  # (B, U)
    rows = torch.arange(similarities.shape[0], device=similarities.device)
    masked = (excluded != positive)  # a reference that is also the target stays the positive
    logits = logits.index_put((rows[masked], excluded[masked]), torch.tensor(float("-inf")))
    loss = F.cross_entropy(logits, positive)
    if not symmetric:
        return loss
    reverse = logits[:, positive].T  # (B, B): row i = query i's target against every query
    same_target = (positive[:, None] == positive[None, :]) & ~torch.eye(len(rows), dtype=torch.bool)
    reverse = reverse.masked_fill(same_target, float("-inf"))
    return (loss + F.cross_entropy(reverse, rows)) / 2

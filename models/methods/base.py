"""What every training method shares: the batch's encoder outputs, the Method interface and the base QTM loss.

A Method owns the training-only parameters of its auxiliary branches (HCA, TAC, a temperature) and never the
CIRModel's: the model is passed to `loss`, not stored, so the exported encoders and `model.state_dict()` are
identical whichever method trained them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cirflow.models.backbones.towers import masked_mean
from cirflow.models.cir_model import CIRModel, Features
from cirflow.models.data_parallel import SINGLE, Worker
from cirflow.models.losses import batch_contrastive


@dataclass
class BatchFeatures:
    """Encoder outputs of one training batch (images de-duplicated as in models.train_data.Batch)."""

    ref: Features  # the B queries: reference tokens/v (rows of the batch images) and text tokens/mask/t
    image_tokens: torch.Tensor  # (U, N, d) tokens of every distinct batch image
    g: torch.Tensor  # (U, D) their normalised pooled vectors
    target: torch.Tensor  # (B,) rows of each query's target in image_tokens / g
    reference: torch.Tensor  # (B,) rows of each query's reference
    # (B, C) the frozen sentence model's own vectors of the captions (noise-free), for TrainConfig.loss.text_keep
    sentences: torch.Tensor | None = None


def encode_batch(model: CIRModel, images: torch.Tensor, reference: torch.Tensor, target: torch.Tensor,
                 ids: torch.Tensor, mask: torch.Tensor, image_stems: bool = False,
                 text_stems: torch.Tensor | None = None, text_noise: float = 0.0,
                 sentences: bool = False, worker: Worker = SINGLE) -> BatchFeatures:
    """Encode each distinct image once and the B captions: the input of every Method.loss. image_stems:
    `images` are cached outputs of a frozen image stem; text_stems: the same for the captions; text_noise:
    Gaussian noise on the text stem, relative to its RMS (TrainConfig.loss.text_noise); sentences: also give
    the frozen sentence model's vectors of the captions (mean of its token states, before any noise).
    worker: a data-parallel worker encodes its rows of the images and of the captions, and gets every row back
    (models/data_parallel.py): the features, and so every method's loss, are those of the whole global batch."""
    n_images, n_queries = len(images), len(ids)
    own = worker.rows(n_queries)
    images, ids_own, mask_own = images[worker.rows(n_images)], ids[own], mask[own]
    text_stems = None if text_stems is None else text_stems[own]
    clean = None
    if (text_noise or sentences) and not model.fuses_image:
        clean = model.text_encoder.stem(ids_own, mask_own) if text_stems is None else text_stems
        noise = text_noise * clean.detach().pow(2).mean().sqrt() * torch.randn_like(clean) if text_noise else 0
        text_stems = clean + noise
    if model.fuses_image:  # the text tower reads each query's reference image (hf-blip2's Q-Former fusion)
        context = images if image_stems else model.image_encoder.stem(images)
        image_tokens, pooled = model.image_encoder.head(context)
        context = worker.gather(context, n_images)  # a worker's queries may refer to any worker's images
        text_tokens, t = model.text_encoder(ids_own, mask_own, context[reference[own]])
    else:
        image_tokens, pooled = model.image_encoder.head(images) if image_stems else model.image_encoder(images)
        text_tokens, t = (model.text_encoder(ids_own, mask_own) if text_stems is None
                          else model.text_encoder.head(text_stems, mask_own))  # (B, L, d), (B, D)
    image_tokens, pooled = worker.gather(image_tokens, n_images), worker.gather(pooled, n_images)
    text_tokens, t = worker.gather(text_tokens, n_queries), worker.gather(t, n_queries)
    g = F.normalize(pooled, dim=-1)  # tokens (U, N, d), pooled (U, D)
    ref = Features(image_tokens[reference], g[reference], text_tokens, mask, F.normalize(t, dim=-1))
    prior = (worker.gather(masked_mean(clean, mask_own).detach(), n_queries) if sentences and clean is not None
             else None)
    return BatchFeatures(ref, image_tokens, g, target, reference, prior)


def similarity_structure_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - Pearson correlation of the in-batch cosine similarities of a (B, D) and b (B, C), each pair once: zero
    when a's captions are alike exactly as b's are, up to scale and offset (the spaces need not share a width
    or a temperature). In fp32 even under autocast: the similarities' spread is about 0.1, near bf16's
    resolution. A batch under 3 rows has no spread to correlate: zero."""
    if a.shape[0] < 3:
        return a.new_zeros(())
    with torch.autocast(a.device.type, enabled=False):
        rows, cols = torch.triu_indices(a.shape[0], a.shape[0], 1, device=a.device)
        x, y = ((F.normalize(v.float(), dim=-1) @ F.normalize(v.float(), dim=-1).T)[rows, cols] for v in (a, b))
        x, y = x - x.mean(), y - y.mean()
        return 1 - (x * y).sum() / (x.norm() * y.norm()).clamp(min=1e-8)


def qtm(model: CIRModel, f: BatchFeatures, composer: nn.Module | None, scale: torch.Tensor,
        symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query vectors q (B, D), their scores of every distinct batch image (B, U; CIRModel.query_scores) and
    L_QTM: InfoNCE over those scores, own reference masked (`symmetric`: averaged with the target -> query
    direction, see models.losses.batch_contrastive)."""
    q, scores = model.query_scores(f.ref, f.g, composer)
    return q, scores, batch_contrastive(scores, f.target, f.reference, scale, symmetric)


def token_projection(token_dim: int, embed_dim: int) -> nn.Module:
    """Token width d -> retrieval size D for an auxiliary branch's output: a training-only Linear, or the
    identity when the widths already agree (the branch's own value/output projections then do the mapping)."""
    return nn.Identity() if token_dim == embed_dim else nn.Linear(token_dim, embed_dim)


def diagonal_ce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a (B, B) logit matrix whose positives are on the diagonal."""
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


class Method(nn.Module):
    """Training-only parameters live here, never in CIRModel, so exported encoders are identical."""

    name = "method"
    symmetric = False  # QTM in both directions (TrainConfig.loss.symmetric); set by build_method

    @property
    def label(self) -> str:
        """How reports name what trained the model (TMCIR adds its pseudo-target generator)."""
        return self.name

    def loss(self, model: CIRModel, batch_features: BatchFeatures, composer: nn.Module | None,
             scale: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss and its named terms (floats, for logging). `composer` overrides the model's."""
        raise NotImplementedError


class BaseMethod(Method):
    """QTM only: L = InfoNCE(q, g_target) over the batch's distinct images."""

    name = "base"

    def loss(self, model: CIRModel, batch_features: BatchFeatures, composer: nn.Module | None,
             scale: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        _, _, l_qtm = qtm(model, batch_features, composer, scale, self.symmetric)
        return l_qtm, {"qtm": l_qtm.item()}

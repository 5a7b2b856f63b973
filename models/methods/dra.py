"""DRA (Dual Relation Alignment, arXiv 2309.02169): OUR reconstruction, there is no official code.

- Explicit relation (I_r, T) -> I_t: L_QTM.
- Implicit relation (I_r, I_t) -> T: c = TAC(V_r, V_t) -> D -> normalised; L_imp = InfoNCE(t, c; aux_scale)
  (the scale of CaLa's identical CTR term, CaLa being the same group's successor).
- Text compensation: t_aug = normalize(t + c); L_aug = the QTM loss of composer(v, t_aug, ...) against the
  targets. c does not exist at inference, so plain L_QTM stays in the loss.
L = L_QTM + lambda_imp * L_imp + lambda_aug * L_aug. In the two-stage recipe, stage 1 passes the sum composer
as `composer` (encoders + TAC train through q = normalize(v + t) and normalize(v + t_aug)).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from cirflow.models.cir_model import CIRModel
from cirflow.models.losses import batch_contrastive, info_nce
from cirflow.models.methods.base import BatchFeatures, Method, qtm, token_projection
from cirflow.models.methods.tac import TwinAttentionCompositor


class DRA(Method):
    name = "dra"

    def __init__(self, image_dim: int, embed_dim: int, *, lambda_imp: float, lambda_aug: float, aux_scale: float,
                 tac_steps: int, tac_dropout: float) -> None:
        super().__init__()
        self.lambda_imp, self.lambda_aug, self.aux_scale = lambda_imp, lambda_aug, aux_scale
        self.tac = TwinAttentionCompositor(image_dim, tac_steps, tac_dropout)
        self.tac_proj = token_projection(image_dim, embed_dim)

    def pair_vector(self, f: BatchFeatures) -> torch.Tensor:
        """c = TAC(V_r, V_t) in the retrieval space: (B, D), normalised."""
        return F.normalize(self.tac_proj(self.tac(f.ref.image_tokens, f.image_tokens[f.target])), dim=-1)

    def loss(self, model: CIRModel, batch_features: BatchFeatures, composer: nn.Module | None,
             scale: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        f = batch_features
        _, _, l_qtm = qtm(model, f, composer, scale, self.symmetric)
        c = self.pair_vector(f)
        l_imp = info_nce(f.ref.t, c, self.aux_scale)
        _, s_aug = model.query_scores(replace(f.ref, t=F.normalize(f.ref.t + c, dim=-1)), f.g, composer)
        l_aug = batch_contrastive(s_aug, f.target, f.reference, scale, self.symmetric)
        total = l_qtm + self.lambda_imp * l_imp + self.lambda_aug * l_aug
        return total, {"qtm": l_qtm.item(), "imp": l_imp.item(), "aug": l_aug.item()}

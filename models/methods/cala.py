"""CaLa (Complementary Association Learning, SIGIR 2024): QTM plus two training-only associations.

- TBIA: HCA(reference tokens, text tokens, target tokens) token 0 -> D -> normalised: a pseudo-target that
  the query must match, L_TBIA = InfoNCE(hca, q; aux_scale).
- CTR: c = TAC(V_r, V_t) -> D -> normalised: the image pair must explain the text, L_CTR = InfoNCE(t, c).
Two loss forms (methods.md):
- "paper":    L = L_QTM + alpha * L_TBIA + beta * L_CTR
- "official": L = w_hca * CE(S_TBIA) + (1 - w_hca) * CE(w_tac * S_CTR + (1 - w_tac) * S_QTM)
  The logits are mixed, so they need one key set: S_QTM here is the B x B matrix of the scale times the
  queries' scores of the batch's targets (q @ g_target^T, or the composer's exact score: ARTEMIS; positives on
  the diagonal), like S_TBIA = aux_scale * hca @ q^T and S_CTR = aux_scale * t @ c^T. Unlike L_QTM it neither
  masks the query's own reference nor sees the images that are no query's target, and two queries sharing a
  target are each other's false negative.
A disabled branch has no parameters; with both disabled, either form returns L_QTM exactly. With one branch
disabled, the official form drops that branch's term: no TBIA -> CE(mix); no CTR -> the mix is L_QTM itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cirflow.core.config import check_choice
from cirflow.models.cir_model import CIRModel
from cirflow.models.losses import info_nce
from cirflow.models.methods.base import BatchFeatures, Method, diagonal_ce, qtm, token_projection
from cirflow.models.methods.hca import HingeCrossAttention
from cirflow.models.methods.tac import TwinAttentionCompositor

LOSS_FORMS = ("paper", "official")


class CaLa(Method):
    name = "cala"

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int, *, tbia: bool, ctr: bool, loss_form: str,
                 alpha: float, beta: float, w_hca: float, w_tac: float, aux_scale: float, tac_steps: int,
                 hca_dropout: float, tac_dropout: float) -> None:
        super().__init__()
        check_choice(loss_form, "loss_form", LOSS_FORMS)
        self.loss_form, self.alpha, self.beta = loss_form, alpha, beta
        self.w_hca, self.w_tac, self.aux_scale = w_hca, w_tac, aux_scale
        # Disabled branches are not built: no parameters to decay, save or hand to the optimiser.
        self.hca = HingeCrossAttention(image_dim, text_dim, hca_dropout) if tbia else None
        self.hca_proj = token_projection(image_dim, embed_dim) if tbia else None
        self.tac = TwinAttentionCompositor(image_dim, tac_steps, tac_dropout) if ctr else None
        self.tac_proj = token_projection(image_dim, embed_dim) if ctr else None

    def pseudo_target(self, f: BatchFeatures) -> torch.Tensor:
        """TBIA's HCA output token 0 in the retrieval space: (B, D), normalised."""
        assert self.hca is not None and self.hca_proj is not None
        g_hat = self.hca(f.ref.image_tokens, f.ref.text_tokens, f.ref.text_mask, f.image_tokens[f.target])
        return F.normalize(self.hca_proj(g_hat[:, 0]), dim=-1)

    def pair_vector(self, f: BatchFeatures) -> torch.Tensor:
        """CTR's TAC(V_r, V_t) in the retrieval space: (B, D), normalised."""
        assert self.tac is not None and self.tac_proj is not None
        return F.normalize(self.tac_proj(self.tac(f.ref.image_tokens, f.image_tokens[f.target])), dim=-1)

    def loss(self, model: CIRModel, batch_features: BatchFeatures, composer: nn.Module | None,
             scale: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        f = batch_features
        q, s_all, l_qtm = qtm(model, f, composer, scale, self.symmetric)
        terms = {"qtm": l_qtm}
        p = c = None
        if self.hca is not None:
            p = self.pseudo_target(f)
            terms["tbia"] = info_nce(p, q, self.aux_scale)  # CE(S_TBIA), S_TBIA = aux_scale * p @ q^T
        if self.tac is not None:
            c = self.pair_vector(f)
            terms["ctr"] = info_nce(f.ref.t, c, self.aux_scale)  # CE(S_CTR), S_CTR = aux_scale * t @ c^T

        if self.loss_form == "paper":
            total = l_qtm
            if p is not None:
                total = total + self.alpha * terms["tbia"]
            if c is not None:
                total = total + self.beta * terms["ctr"]
        else:
            main = l_qtm
            if c is not None:
                s_ctr = self.aux_scale * f.ref.t @ c.T  # (B, B) text i vs image pair j
                s_qtm = scale * s_all[:, f.target]  # (B, B) query i vs target j, see the module docstring
                main = diagonal_ce(self.w_tac * s_ctr + (1 - self.w_tac) * s_qtm)
            total = main if p is None else self.w_hca * terms["tbia"] + (1 - self.w_hca) * main
        return total, {k: v.item() for k, v in terms.items()}

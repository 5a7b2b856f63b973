"""TMCIR's training side: the IACMA alignment stage and its pseudo-target generators.

ATF, TMCIR's composer, runs at inference and lives in models/atf.py (model.composer.name=atf); while it
trains, the loss is plain QTM. Before that, IACMA (Intent-Aware Cross-Modal Alignment) fine-tunes both
towers with InfoNCE(image(pseudo-target), text(T)) and a learnable temperature, where the pseudo-target is
an image generated from (I_r, T). Generators are pluggable (GENERATORS, a PseudoTargetGenerator each):
- "oracle": the true target image. An UPPER BOUND of any real generator; every report must say so.
The paper's generator edits the reference with a diffusion model; none is implemented here. Adding one means
giving the training batch (models.train_data.Batch) the caption strings, passing them through
`TMCIR.iacma_loss` to the generator, and a test that runs it on a tiny local pipeline.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from cirflow.models.cir_model import CIRModel
from cirflow.models.losses import LogitScale, info_nce
from cirflow.models.methods.base import BatchFeatures, Method, qtm


class PseudoTargetGenerator(Protocol):
    label: str  # printed by every report that shows IACMA results

    def __call__(self, reference_pixels: torch.Tensor, target_pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised reference and true-target pixels -> (B, 3, H, W) pseudo-targets."""
        ...


class OracleGenerator:
    """Returns the true target images: an UPPER BOUND on what a real generator can give IACMA, not TMCIR."""

    label = "oracle pseudo-targets (the true target images): an UPPER BOUND, not a reproduction of TMCIR"

    def __call__(self, reference_pixels: torch.Tensor, target_pixels: torch.Tensor) -> torch.Tensor:
        return target_pixels


GENERATORS: dict[str, type[PseudoTargetGenerator]] = {"oracle": OracleGenerator}


def iacma_loss(model: CIRModel, pseudo_target_pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
               temperature: nn.Module) -> torch.Tensor:
    """InfoNCE(normalize(image(pseudo-target)), normalize(text(T)); temperature()), positives on the diagonal.

    `temperature` is a LogitScale-like module returning the (learnable) logit scale.
    """
    return info_nce(model.encode_image(pseudo_target_pixels), model.encode_text(ids, mask), temperature())


class TMCIR(Method):
    name = "tmcir"

    def __init__(self, generator: PseudoTargetGenerator | None, logit_scale: float, max_logit_scale: float) -> None:
        super().__init__()
        self.generator = generator  # None when there is no IACMA stage (iacma_steps=0)
        self.temperature = LogitScale(logit_scale, learn=True, maximum=max_logit_scale)  # IACMA's own

    @property
    def label(self) -> str:
        if self.generator is None:
            return "tmcir (ATF only, no IACMA stage)"
        return f"tmcir (IACMA with {self.generator.label})"

    def loss(self, model: CIRModel, batch_features: BatchFeatures, composer: nn.Module | None,
             scale: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The ATF phase trains with plain QTM."""
        _, _, l_qtm = qtm(model, batch_features, composer, scale, self.symmetric)
        return l_qtm, {"qtm": l_qtm.item()}

    def iacma_loss(self, model: CIRModel, images: torch.Tensor, reference: torch.Tensor, target: torch.Tensor,
                   ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """One IACMA step's loss from a training batch (models.train_data.Batch fields). Pseudo-targets are
        generated without gradient."""
        if self.generator is None:
            raise RuntimeError("this tmcir method has no pseudo-target generator: set method.iacma_steps > 0")
        with torch.no_grad():
            pseudo = self.generator(images[reference], images[target])  # (B, 3, H, W)
        loss = iacma_loss(model, pseudo, ids, mask, self.temperature)
        return loss, {"iacma": loss.item(), "iacma_scale": self.temperature().item()}

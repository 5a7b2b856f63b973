"""TMCIR's training side: the IACMA alignment stage and its pseudo-target generators.

ATF, TMCIR's composer, runs at inference and lives in models/atf.py (model.composer.name=atf); while it
trains, the loss is plain QTM. Before that, IACMA (Intent-Aware Cross-Modal Alignment) fine-tunes both
towers with InfoNCE(image(pseudo-target), text(T)) and a learnable temperature, where the pseudo-target is
an image generated from (I_r, T). Generators are pluggable (GENERATORS):
- "oracle": the true target image. An UPPER BOUND of any real generator; every report must say so.
- "diffusion": an InstructPix2Pix-style editing pipeline loaded from a LOCAL path (never downloaded).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import nn

from cirflow.models.cir_model import CIRModel
from cirflow.models.losses import LogitScale, info_nce
from cirflow.models.methods.base import BatchFeatures, Method, qtm
from cirflow.models.preprocess import PreprocessConfig, preprocess_images

log = logging.getLogger(__name__)


class PseudoTargetGenerator(Protocol):
    label: str  # printed by every report that shows IACMA results

    def __call__(self, reference_pixels: torch.Tensor, captions: Sequence[str] | None,
                 target_pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised reference and true-target pixels + captions -> (B, 3, H, W) pseudo-targets."""
        ...


class OracleGenerator:
    """Returns the true target images: an UPPER BOUND on what a real generator can give IACMA, not TMCIR."""

    label = "oracle pseudo-targets (the true target images): an UPPER BOUND, not a reproduction of TMCIR"

    def __call__(self, reference_pixels: torch.Tensor, captions: Sequence[str] | None,
                 target_pixels: torch.Tensor) -> torch.Tensor:
        return target_pixels


class DiffusionGenerator:
    """An instruction-editing diffusion pipeline (diffusers' StableDiffusionInstructPix2PixPipeline layout)
    loaded from a local directory with local_files_only=True; it never downloads.

    Generation is slow: run it once per triplet and cache the pseudo-targets rather than per training step.
    """

    label = "diffusion pseudo-targets (InstructPix2Pix-style editing of the reference)"

    def __init__(self, path: str, preprocess: PreprocessConfig, steps: int, image_guidance: float,
                 text_guidance: float, device: str) -> None:
        if not path:
            raise ValueError("generator=diffusion needs method.diffusion_path: a local directory holding an "
                             "InstructPix2Pix-style diffusers pipeline (it is never downloaded)")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"method.diffusion_path={path!r} is not a directory: the diffusion generator "
                                    "loads its pipeline from a local path only and never downloads it")
        try:
            import diffusers
        except ImportError as e:
            raise ImportError("generator=diffusion needs the optional package 'diffusers' "
                              "(pip install diffusers); or use generator=oracle") from e
        self.pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
            path, local_files_only=True).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.preprocess, self.steps, self.device = preprocess, steps, device
        self.image_guidance, self.text_guidance = image_guidance, text_guidance
        log.info("diffusion generator loaded from %s on %s", path, device)

    @torch.no_grad()
    def __call__(self, reference_pixels: torch.Tensor, captions: Sequence[str] | None,
                 target_pixels: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        if captions is None:
            raise ValueError("the diffusion generator edits with the caption strings; pass captions")
        mean = torch.tensor(self.preprocess.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.std).view(1, 3, 1, 1)
        rgb = ((reference_pixels.cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)  # undo normalise
        images = [Image.fromarray(np.ascontiguousarray(x.permute(1, 2, 0).numpy())) for x in rgb]
        edited = self.pipe(list(captions), image=images, num_inference_steps=self.steps,
                           image_guidance_scale=self.image_guidance, guidance_scale=self.text_guidance,
                           generator=torch.Generator(self.device).manual_seed(0)).images
        out = preprocess_images([img.convert("RGB") for img in edited], self.preprocess)
        return torch.from_numpy(out).to(reference_pixels.device)


GENERATORS: dict[str, type] = {"oracle": OracleGenerator, "diffusion": DiffusionGenerator}


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
        _, l_qtm = qtm(model, batch_features, composer, scale, self.symmetric)
        return l_qtm, {"qtm": l_qtm.item()}

    def iacma_loss(self, model: CIRModel, images: torch.Tensor, reference: torch.Tensor, target: torch.Tensor,
                   ids: torch.Tensor, mask: torch.Tensor,
                   captions: Sequence[str] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """One IACMA step's loss from a training batch (models.train_data.Batch fields; captions as strings
        for the diffusion generator). Pseudo-targets are generated without gradient."""
        if self.generator is None:
            raise RuntimeError("this tmcir method has no pseudo-target generator: set method.iacma_steps > 0")
        with torch.no_grad():
            pseudo = self.generator(images[reference], captions, images[target])  # (B, 3, H, W)
        loss = iacma_loss(model, pseudo, ids, mask, self.temperature)
        return loss, {"iacma": loss.item(), "iacma_scale": self.temperature().item()}

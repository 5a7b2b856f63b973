"""The CIR model: image encoder, text encoder and a composer in one retrieval space.

Inference surface: `encode_image` (catalog image -> g), `encode_text`, `compose` (reference + text -> q); all
return L2-normalised (B, D). `features` exposes tokens and pooled vectors for training recipes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cirflow.models.artemis import Artemis
from cirflow.models.backbones.config import BackboneConfig
from cirflow.models.backbones.registry import build_towers, load_arch
from cirflow.models.composers import ComposerConfig, build_composer
from cirflow.models.image_encoder import ImageEncoderConfig
from cirflow.models.text_encoder import TextEncoderConfig


@dataclass(frozen=True)
class ModelConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    composer: ComposerConfig = field(default_factory=ComposerConfig)
    # tiny: model.image / model.text describe the whole towers. A pretrained backbone brings its own networks;
    # then image.dim / text.dim are the joint token width, embed_dim the retrieval size, image.image_size the
    # input size, image.layers/heads/mlp_ratio/dropout the transformer neck over the pretrained image tokens,
    # and text.max_length the token limit.
    backbone: BackboneConfig = field(default_factory=BackboneConfig)

    def __post_init__(self) -> None:
        if self.image.embed_dim != self.text.embed_dim:
            raise ValueError(f"image.embed_dim={self.image.embed_dim} != text.embed_dim={self.text.embed_dim}: "
                             "both towers must embed into one space")
        if self.image.dim != self.text.dim:
            raise ValueError(f"image.dim={self.image.dim} != text.dim={self.text.dim}: token-level modules "
                             "(atf, CaLa, DRA) mix the two token sequences")
        if self.composer.name == "atf" and self.image.dim % self.composer.atf_heads:
            raise ValueError(f"composer.atf_heads={self.composer.atf_heads} does not divide the token width "
                             f"image.dim={self.image.dim}")


@dataclass
class Features:
    """Encoder outputs for a batch of (image, text) pairs."""

    image_tokens: torch.Tensor  # (B, Nv, dim), token 0 = CLS
    v: torch.Tensor  # (B, D), L2-normalised
    text_tokens: torch.Tensor  # (B, L, dim), token 0 = [CLS]
    text_mask: torch.Tensor  # (B, L), 1 = real token
    t: torch.Tensor  # (B, D), L2-normalised


class CIRModel(nn.Module):
    def __init__(self, config: ModelConfig, arch: dict[str, Any] | None = None) -> None:
        """arch None: read the backbone's architecture from its weights' location and load the pretrained
        weights; given (from a checkpoint): build the same architecture with random weights, to be loaded."""
        super().__init__()
        self.config = config
        self.arch = load_arch(config.backbone) if arch is None else arch
        self.image_encoder, self.text_encoder = build_towers(config.image, config.text, config.backbone,
                                                             self.arch, weights=arch is None)
        self.composer = build_composer(config.image.embed_dim, config.image.dim, config.composer)

    @property
    def embed_dim(self) -> int:
        return self.config.image.embed_dim

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Pretrained weights that the backbone's freezing policy keeps fixed."""
        return [p for tower in self._pretrained_towers() for p in tower.frozen_parameters()]

    def lr_scales(self) -> dict[int, float]:
        """id(parameter) -> learning-rate factor for pretrained weights fine-tuned gently (absent: 1)."""
        return {k: v for tower in self._pretrained_towers() for k, v in tower.lr_scales().items()}

    def _pretrained_towers(self) -> list[Any]:
        return [t for t in (self.image_encoder, self.text_encoder) if hasattr(t, "frozen_parameters")]

    def encode_image(self, pixels: torch.Tensor, stems: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) unit gallery vectors. stems: the image tower's stem output of `pixels`, computed
        already (a frozen stem's cache)."""
        return F.normalize((self.image_encoder(pixels) if stems is None else self.image_encoder.head(stems))[1],
                           dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor, stems: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) token ids and mask -> (B, D) unit text vectors. stems: as in encode_image, for the text tower."""
        return F.normalize((self.text_encoder(ids, mask) if stems is None
                            else self.text_encoder.head(stems, mask))[1], dim=-1)

    @property
    def fuses_image(self) -> bool:
        """The text tower reads the reference image too (hf-blip2: the Q-Former fuses the reference image's
        ViT states with the text, as BLIP2Cir does): it gets the image tower's stem output as context."""
        return getattr(self.text_encoder, "fuses_image", False)

    def features(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                 image_stems: torch.Tensor | None = None, text_stems: torch.Tensor | None = None) -> Features:
        """image_stems / text_stems: the towers' stem outputs of `pixels` / `ids`, computed already (a frozen
        stem's cache); a text tower that fuses the image has none of its own."""
        if self.fuses_image:
            context = self.image_encoder.stem(pixels) if image_stems is None else image_stems
            image_tokens, v = self.image_encoder.head(context)
            text_tokens, t = self.text_encoder(ids, mask, context)
        else:
            image_tokens, v = (self.image_encoder(pixels) if image_stems is None
                               else self.image_encoder.head(image_stems))
            text_tokens, t = (self.text_encoder(ids, mask) if text_stems is None
                              else self.text_encoder.head(text_stems, mask))
        return Features(image_tokens, F.normalize(v, dim=-1), text_tokens, mask, F.normalize(t, dim=-1))

    def compose_features(self, f: Features, composer: nn.Module | None = None) -> torch.Tensor:
        """Query vectors from features; `composer` overrides the model's (two-stage recipes use the sum)."""
        return (composer or self.composer)(f.v, f.t, f.image_tokens, f.text_tokens, f.text_mask)

    def query_scores(self, f: Features, keys: torch.Tensor,
                     composer: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(q (B, D), scores (B, K)): the query vectors of `f` and their scores of the unit vectors `keys` (K, D):
        the composer's exact score where it has one (ARTEMIS, models/artemis.py), else the cosine q @ keys^T."""
        composer = composer or self.composer
        q = self.compose_features(f, composer)
        if isinstance(composer, Artemis):
            return q, composer.score(composer.query_features(f.v, f.t), keys[None])
        return q, q @ keys.T

    def compose(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reference image + modification text -> (B, D) unit query vectors."""
        return self.compose_features(self.features(pixels, ids, mask))


def needs_rerank(composer: nn.Module) -> bool:
    """Whether the composer's exact score ranks otherwise than its query vector does: retrieval then re-ranks
    the query vector's top candidates with the exact score (models/rerank.py; a bundle carries the re-ranker)."""
    return isinstance(composer, Artemis) and not composer.folds_exactly


def build_model(config: ModelConfig, arch: dict[str, Any] | None = None) -> CIRModel:
    return CIRModel(config, arch)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

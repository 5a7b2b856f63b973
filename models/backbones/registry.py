"""The backbone registry: one place that training, export and embedding ask for towers, tokenizer and
preprocessing, by `ModelConfig.backbone.name`.

- tiny: the built-in encoders (models/image_encoder.py, models/text_encoder.py), trained from scratch with a
  tokenizer trained on the training captions and the shapes benchmark's preprocessing.
- effnet-minilm, tiny-minilm: models/backbones/effnet_minilm.py (weights from installed packages); tiny-minilm
  keeps the built-in image tower and takes MiniLM as its text tower.
- hf-clip, hf-blip2: models/backbones/hf_clip.py, hf_blip2.py (transformers, weights from a local directory).

`arch` is the backbone's architecture description (its config.json contents): saved in every checkpoint, so a
checkpoint rebuilds its model without the original weights directory. Modules of the pretrained backbones
are imported when asked for: the tiny path never imports transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from tokenizers import Tokenizer
from torch import nn

from cirflow.models.backbones.config import BackboneConfig
from cirflow.models.image_encoder import ImageEncoder, ImageEncoderConfig
from cirflow.models.preprocess import PreprocessConfig
from cirflow.models.text_encoder import TextEncoder, TextEncoderConfig

MODULES = {"effnet-minilm": "cirflow.models.backbones.effnet_minilm",
           "tiny-minilm": "cirflow.models.backbones.effnet_minilm",
           "hf-clip": "cirflow.models.backbones.hf_clip",
           "hf-blip2": "cirflow.models.backbones.hf_blip2"}


def _module(config: BackboneConfig) -> Any:
    return importlib.import_module(MODULES[config.name])


def load_arch(config: BackboneConfig) -> dict[str, Any]:
    """The architecture description from the weights' location (reads config files, never weights)."""
    return {} if config.name == "tiny" else _module(config).arch(config)


def build_towers(image: ImageEncoderConfig, text: TextEncoderConfig, config: BackboneConfig,
                 arch: dict[str, Any], weights: bool) -> tuple[nn.Module, nn.Module]:
    """(image tower, text tower). weights: load the pretrained weights (False: random, a checkpoint follows)."""
    if config.name == "tiny":
        return ImageEncoder(image), TextEncoder(text)
    return _module(config).build(image, text, config, arch, weights)


def backbone_tokenizer(config: BackboneConfig, max_length: int) -> Tokenizer | None:
    """The tokenizer that comes with the weights, truncating at max_length and padding to the longest text;
    None for tiny, whose tokenizer is trained on the training captions."""
    return None if config.name == "tiny" else _module(config).tokenizer(config, max_length)


def backbone_preprocess(config: BackboneConfig, size: int) -> PreprocessConfig | None:
    """The preprocessing the weights were trained with, at `size`; None for tiny (the config's own)."""
    return None if config.name == "tiny" else _module(config).preprocess(config, size)

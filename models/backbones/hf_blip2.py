"""hf-blip2: BLIP-2's ViT and Q-Former (transformers' Blip2ForImageTextRetrieval) as BLIP2Cir, the way CaLa and
SPRC use it: the Q-Former fuses the reference image with the modification text. Weights from a local directory
(e.g. Salesforce/blip2-itm-vit-g, downloaded by the user); its Q-Former must take text (use_qformer_text_input).

- Image tower (policy model.backbone.image: the ViT, usually frozen as in BLIP-2 and SPRC, which makes its stem
  cacheable): stem = the ViT's last hidden states (B, 1 + N, vision_hidden); head = the learned query tokens
  cross-attending to them through the Q-Former, each query output projected by vision_projection and
  L2-normalised (B, Q, P). BLIP-2 scores an image by the best of its Q query vectors; a gallery holds one
  vector per image, so the pooled vector is their mean (the mean of the per-query cosines, up to its norm).
  Tokens: a Linear from P to the token width of [pooled; the Q query vectors].
- Text tower (policy model.backbone.text: the Q-Former with its queries, text embeddings and projections):
  given the reference image's ViT states as `context`, BLIP-2's multimodal mode: [query tokens; text] through
  the Q-Former, the queries cross-attending to the image; pooled = text_projection of the text's first ([CLS])
  output (SPRC's last_hidden_state[:, num_query_tokens]). Without context (the text-only baseline), the
  Q-Former's text-only mode (no queries, no cross-attention) and text_projection of [CLS], BLIP-2's ITC text
  feature. Tokens: a Linear of the text positions' states.

The Q-Former is one network in BLIP-2 and stays one here: the text tower owns it (its state dict, its policy)
and the image tower holds a plain reference, so parameters are neither duplicated nor counted twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from cirflow.models.backbones.config import BackboneConfig, TowerPolicy
from cirflow.models.backbones.hf_clip import (
    CLIP_MEAN,
    CLIP_STD,
    check_image_size,
    check_text_length,
    load_weights,
    local_tokenizer,
    read_arch,
    weights_dir,
)
from cirflow.models.backbones.towers import PretrainedTower, insert_adapters
from cirflow.models.image_encoder import ImageEncoderConfig
from cirflow.models.preprocess import PreprocessConfig
from cirflow.models.text_encoder import TextEncoderConfig

MODEL_TYPE = "blip-2"
DEFAULT_PAD = "[PAD]"


def _blip2_config(arch: dict[str, Any]) -> Any:
    from transformers import Blip2Config

    config = Blip2Config.from_dict(arch)
    if not config.qformer_config.use_qformer_text_input:
        raise ValueError("backbone hf-blip2: this BLIP-2's Q-Former takes no text (qformer_config."
                         "use_qformer_text_input is false): use a retrieval checkpoint such as "
                         "Salesforce/blip2-itm-vit-g (Blip2ForImageTextRetrieval)")
    return config


def arch(config: BackboneConfig) -> dict[str, Any]:
    """BLIP-2's config.json (vision, Q-Former and projection sizes), checked to have a text-taking Q-Former."""
    out = read_arch(config, [MODEL_TYPE])
    _blip2_config(out)
    return out


def tokenizer(config: BackboneConfig, max_length: int) -> Tokenizer:
    """The Q-Former's BERT tokenizer ([CLS] ... [SEP])."""
    limit = _blip2_config(arch(config)).qformer_config.max_position_embeddings
    return local_tokenizer(config, max_length, limit, DEFAULT_PAD)


def preprocess(config: BackboneConfig, size: int) -> PreprocessConfig:
    """BLIP-2's: bicubic resize of both sides to the ViT's size (no crop), CLIP's pixel statistics."""
    check_image_size(config.name, arch(config).get("vision_config", {}), size)
    return PreprocessConfig(size=size, mean=CLIP_MEAN, std=CLIP_STD, resize="bicubic", mode="stretch")


class _Vision(nn.Module):
    """The ViT, named as in Blip2ForImageTextRetrieval so that its checkpoint loads as is."""

    def __init__(self, blip: Any) -> None:
        super().__init__()
        from transformers import Blip2VisionModel

        self.vision_model = Blip2VisionModel(blip.vision_config)


class QFormer(nn.Module):
    """The Q-Former with its learned queries, text embeddings and the two projections (names as in
    Blip2ForImageTextRetrieval)."""

    def __init__(self, blip: Any) -> None:
        super().__init__()
        from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

        qformer = blip.qformer_config
        self.query_tokens = nn.Parameter(torch.randn(1, blip.num_query_tokens, qformer.hidden_size)
                                         * qformer.initializer_range)
        self.embeddings = Blip2TextEmbeddings(qformer)
        self.qformer = Blip2QFormerModel(qformer)
        self.vision_projection = nn.Linear(qformer.hidden_size, blip.image_text_hidden_size)
        self.text_projection = nn.Linear(qformer.hidden_size, blip.image_text_hidden_size)

    def queries(self, batch: int) -> torch.Tensor:
        return self.query_tokens.expand(batch, -1, -1)  # (B, Q, hidden)


class Blip2ImageTower(PretrainedTower):
    def __init__(self, config: ImageEncoderConfig, arch: dict[str, Any], policy: TowerPolicy, adapter_dim: int,
                 weights_dir: Path | None, qformer: QFormer) -> None:
        super().__init__()
        blip = _blip2_config(arch)
        check_image_size("hf-blip2", blip.vision_config.to_dict(), config.image_size)
        self.backbone = _Vision(blip)
        if weights_dir is not None:
            load_weights(self.backbone, weights_dir)
        adapters = []
        if policy.train == "adapter":
            adapters = insert_adapters(((layer.mlp, "fc2") for layer in self.backbone.vision_model.encoder.layers),
                                       adapter_dim)
        width = blip.image_text_hidden_size
        self._shared = (qformer,)  # a tuple: not registered, the text tower owns the Q-Former
        self.to_tokens = nn.Linear(width, config.dim)
        self.pool = None if config.embed_dim == width else nn.Linear(width, config.embed_dim)
        self.setup_policy(policy, adapters)

    @property
    def qformer(self) -> QFormer:
        return self._shared[0]

    def stem(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> the ViT's last hidden states (B, 1 + patches, vision_hidden), post-layernormed."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.policy.train != "frozen"):
            return self.backbone.vision_model(pixel_values=pixels).last_hidden_state

    def head(self, vit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        core = self.qformer
        out = core.qformer(query_embeds=core.queries(vit.shape[0]), encoder_hidden_states=vit).last_hidden_state
        feats = F.normalize(core.vision_projection(out), dim=-1)  # (B, Q, P), BLIP-2's per-query image features
        pooled = feats.mean(1)  # (B, P)
        tokens = self.to_tokens(torch.cat([pooled.unsqueeze(1), feats], dim=1))  # (B, 1 + Q, dim)
        return tokens, pooled if self.pool is None else self.pool(pooled)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.stem(pixels))


class Blip2TextTower(PretrainedTower):
    fuses_image = True  # CIRModel passes the reference image's stem (ViT states) as `context`

    def __init__(self, config: TextEncoderConfig, arch: dict[str, Any], policy: TowerPolicy, adapter_dim: int,
                 weights_dir: Path | None) -> None:
        super().__init__()
        blip = _blip2_config(arch)
        check_text_length("hf-blip2", config.max_length, blip.qformer_config.max_position_embeddings)
        self.backbone = QFormer(blip)
        if weights_dir is not None:
            load_weights(self.backbone, weights_dir)
        adapters = []
        if policy.train == "adapter":  # the feed-forward outputs of both branches, text and queries
            layers = self.backbone.qformer.encoder.layer
            adapters = insert_adapters([*((layer.output, "dense") for layer in layers),
                                        *((layer.output_query, "dense") for layer in layers)], adapter_dim)
        hidden = blip.qformer_config.hidden_size
        self.to_tokens = nn.Linear(hidden, config.dim)
        self.pool = None if config.embed_dim == blip.image_text_hidden_size else nn.Linear(hidden, config.embed_dim)
        self.setup_policy(policy, adapters)

    @property
    def cacheable(self) -> bool:
        """Its output depends on the reference image too: a caption's stem alone cannot be reused."""
        return False

    def stem(self, ids: torch.Tensor, mask: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """ids, mask (B, L) [and the reference's ViT states (B, N, vision_hidden)] -> the Q-Former's states at
        the text positions (B, L, hidden)."""
        core = self.backbone
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.policy.train != "frozen"):
            if context is None:  # text-only mode: self-attention over the text alone
                embeds = core.embeddings(input_ids=ids)
                return core.qformer(query_embeds=embeds, query_length=0, attention_mask=mask).last_hidden_state
            queries = core.queries(ids.shape[0])
            embeds = core.embeddings(input_ids=ids, query_embeds=queries)  # (B, Q + L, hidden)
            n = queries.shape[1]
            full = torch.cat([torch.ones(ids.shape[0], n, dtype=mask.dtype, device=mask.device), mask], dim=1)
            out = core.qformer(query_embeds=embeds, query_length=n, attention_mask=full,
                               encoder_hidden_states=context).last_hidden_state
            return out[:, n:]

    def head(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls = hidden[:, 0]  # (B, hidden)
        pooled = self.backbone.text_projection(cls) if self.pool is None else self.pool(cls)
        return self.to_tokens(hidden), pooled

    def forward(self, ids: torch.Tensor, mask: torch.Tensor,
                context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.stem(ids, mask, context), mask)


def build(image: ImageEncoderConfig, text: TextEncoderConfig, config: BackboneConfig, arch: dict[str, Any],
          weights: bool) -> tuple[nn.Module, nn.Module]:
    path = weights_dir(config) if weights else None
    text_tower = Blip2TextTower(text, arch, config.text, config.adapter_dim, path)
    return (Blip2ImageTower(image, arch, config.image, config.adapter_dim, path, text_tower.backbone),
            text_tower)

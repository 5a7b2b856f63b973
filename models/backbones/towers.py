"""What every pretrained backbone shares: freezing policies, adapters, and the token/pool heads that map a
pretrained tower into the joint space.

A tower returns what the built-in ones do: tokens (B, N, dim) with token 0 the pooled slot, and a pooled vector
(B, embed_dim), not normalised. The pretrained network sits in `self.backbone`; everything else is new and
always trains.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from cirflow.models.backbones.config import TowerPolicy
from cirflow.models.layers import Block
from cirflow.models.text_encoder import TextEncoderConfig


class Adapter(nn.Module):
    """Residual bottleneck after a pretrained linear layer (Houlsby et al.): y = f(x) + up(gelu(down(f(x)))).

    The up-projection starts at zero, so an untrained adapter is the identity and training starts from exactly
    the pretrained function.
    """

    def __init__(self, base: nn.Linear, bottleneck: int) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.out_features, bottleneck)
        self.up = nn.Linear(bottleneck, base.out_features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.up(nn.functional.gelu(self.down(y)))


def insert_adapters(sites: Iterable[tuple[nn.Module, str]], bottleneck: int) -> list[nn.Parameter]:
    """Wrap `getattr(parent, name)` (a Linear) in an Adapter for each site; returns the adapters' parameters."""
    params = []
    for parent, name in sites:
        adapter = Adapter(getattr(parent, name), bottleneck)
        setattr(parent, name, adapter)
        params += [*adapter.down.parameters(), *adapter.up.parameters()]
    return params


class PretrainedTower(nn.Module):
    """Base of the pretrained towers: applies the TowerPolicy to `self.backbone`.

    Frozen weights get requires_grad False and the backbone stays in eval mode whatever `train()` is called with
    (BatchNorm statistics and dropout are part of the pretrained function). `lr_scales` tells the optimiser which
    parameters train at a reduced rate.
    """

    backbone: nn.Module

    def setup_policy(self, policy: TowerPolicy, adapter_params: list[nn.Parameter]) -> None:
        self.policy = policy
        trainable = {id(p) for p in adapter_params}
        for p in self.backbone.parameters():
            p.requires_grad_(policy.train == "full" or id(p) in trainable)
        self._adapters = trainable
        self.train(self.training)

    @property
    def frozen_backbone(self) -> bool:
        return self.policy.train != "full"

    @property
    def cacheable(self) -> bool:
        """The stem (the pretrained network) is fixed, so its output per input can be computed once and
        reused across epochs (models/stem_cache.py); adapters change it, so only `frozen` qualifies."""
        return self.policy.train == "frozen"

    def frozen_parameters(self) -> list[nn.Parameter]:
        if not self.frozen_backbone:
            return []
        return [p for p in self.backbone.parameters() if id(p) not in self._adapters]

    def lr_scales(self) -> dict[int, float]:
        """id(parameter) -> learning-rate factor, for pretrained weights that train (full) at a reduced rate."""
        if self.policy.train != "full" or self.policy.lr_scale == 1.0:
            return {}
        return {id(p): self.policy.lr_scale for p in self.backbone.parameters()}

    def train(self, mode: bool = True) -> "PretrainedTower":
        super().train(mode)
        if self.frozen_backbone:
            # Adapters have no dropout or BatchNorm, so eval mode for the whole backbone keeps them unchanged.
            self.backbone.eval()
        return self


class GridNeck(nn.Module):
    """Pretrained feature map (B, C, h, w) -> tokens (B, 1 + h*w, dim) and pooled (B, embed_dim).

    A learned CLS slot and position embeddings, then a few transformer blocks: CNN features say what is where
    only implicitly, and edits name positions ("move it to the top left"), so the pooled vector is attention
    over the grid rather than a plain mean.
    """

    def __init__(self, channels: int, grid: int, dim: int, embed_dim: int, layers: int, heads: int,
                 mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.to_tokens = nn.Linear(channels, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + grid * grid, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, embed_dim)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.to_tokens(features.flatten(2).transpose(1, 2))  # (B, h*w, dim)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        x = self.ln(x)
        return x, self.head(x[:, 0])


class TokenNeck(nn.Module):
    """Pretrained text states (B, L, C) -> tokens (B, L, dim) and pooled (B, embed_dim).

    The pooled vector is a projection of the pretrained sentence vector (`sentence`, e.g. MiniLM's mean
    pooling), so what the pretrained tower knows about words reaches the joint space through one linear map;
    `layers` > 0 adds transformer blocks over the projected tokens whose first token's output is added to it:
    room to learn the structure of edits ("the red circle" is the object, "blue" the new colour) on top.
    """

    def __init__(self, width: int, config: TextEncoderConfig, layers: int) -> None:
        super().__init__()
        self.to_tokens = nn.Linear(width, config.dim)
        self.pool = nn.Linear(width, config.embed_dim)
        self.blocks = nn.ModuleList(Block(config.dim, config.heads, config.mlp_ratio, config.dropout)
                                    for _ in range(layers))
        self.ln = nn.LayerNorm(config.dim) if layers else None
        self.head = nn.Linear(config.dim, config.embed_dim) if layers else None

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor,
                sentence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.to_tokens(hidden)
        pooled = self.pool(sentence)
        if self.ln is not None and self.head is not None:
            for block in self.blocks:
                x = block(x, mask)
            x = self.ln(x)
            pooled = pooled + self.head(x[:, 0])
        return x, pooled


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, C) hidden states, (B, L) 0/1 mask -> (B, C) mean over the real tokens (sentence-transformers'
    pooling, which all-MiniLM-L6-v2 was trained with)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)

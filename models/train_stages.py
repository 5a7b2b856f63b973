"""A run's stages, and each stage's optimiser and learning-rate schedule: what trains, with which loss, how fast.

one_stage trains everything with the configured composer; two_stage is CLIP4Cir's (stage 1 fine-tunes the
encoders through the sum composer, stage 2 trains the composer alone); TMCIR's IACMA alignment stage, when the
method asks for it, comes first. A stage's rate warms up linearly, then follows a cosine to zero over its budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from cirflow.models.cir_model import CIRModel
from cirflow.models.composers import ComposerConfig, SumComposer
from cirflow.models.losses import LogitScale
from cirflow.models.methods.base import Method
from cirflow.models.methods.registry import MethodConfig, build_method
from cirflow.models.train_config import OptimConfig, TrainConfig


@dataclass
class Stage:
    name: str
    optim: OptimConfig
    composer: nn.Module | None  # None = the model's own composer
    trainable: list[nn.Parameter]
    method: Method  # the loss; two_stage's stage 2 trains the composer with plain QTM
    iacma: bool = False  # TMCIR's intent-aware alignment stage (image(pseudo-target) vs text)


def build_stages(config: TrainConfig, model: CIRModel, method: Method, scale: LogitScale) -> list[Stage]:
    frozen = {id(p) for p in model.frozen_parameters()}  # the backbone's freezing policy, in every stage
    encoders = [p for p in (*model.image_encoder.parameters(), *model.text_encoder.parameters())
                if id(p) not in frozen]
    model_params = [p for p in model.parameters() if id(p) not in frozen]
    stages = []
    if config.method.iacma_steps:
        # TMCIR: align image(pseudo-target) with the text first; only the towers and IACMA's temperature train.
        stages.append(Stage("iacma", replace(config.optim, max_steps=config.method.iacma_steps, max_minutes=0),
                            None, [*encoders, *method.parameters()], method, iacma=True))
    if config.recipe == "one_stage":
        return stages + [Stage("train", config.optim, None, [*model_params, *method.parameters(),
                                                              *scale.parameters()], method)]
    # CLIP4Cir: stage 1 fine-tunes the encoders (and the method's branches) through q = normalize(v + t);
    # stage 2 freezes them and trains the composer alone with plain QTM.
    sum_composer = SumComposer(model.embed_dim, model.config.image.dim, ComposerConfig(name="sum"))
    return stages + [
        Stage("stage1", config.optim, sum_composer, [*encoders, *method.parameters(), *scale.parameters()], method),
        Stage("stage2", config.stage2, None, [*model.composer.parameters(), *scale.parameters()],
              build_method(MethodConfig(), model, symmetric=config.loss.symmetric))]


def enter_stage(stage: Stage, model: CIRModel, scale: LogitScale, learn_logit_scale: bool) -> None:
    """Let exactly what `stage` trains have gradients, and set the training modes."""
    trainable = {id(p) for p in stage.trainable}
    for p in [*model.parameters(), *stage.method.parameters(), *scale.parameters()]:
        p.requires_grad_(id(p) in trainable and (p is not scale.log_scale or learn_logit_scale))
    model.train()
    stage.method.train()
    for tower in (model.image_encoder, model.text_encoder):
        # A tower that nothing in this stage trains (CLIP4Cir's stage 2) runs in eval mode: BatchNorm statistics
        # stay fixed and dropout is off. Decided by its parameters, not the stage's place in the run: the
        # one-stage recipe after TMCIR's IACMA stage trains the towers in its second stage.
        if not any(id(p) in trainable for p in tower.parameters()):
            tower.eval()


def build_optimizer(stage: Stage, lr_scales: dict[int, float]) -> torch.optim.Optimizer:
    """AdamW with one group per (weight decay, learning-rate factor): pretrained weights fine-tuned gently
    (TowerPolicy.lr_scale) follow the same schedule at a fraction of the rate."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for p in stage.trainable:
        # Weight decay on matrices only: decaying norms, biases and embeddings' scale terms hurts small models.
        groups.setdefault((p.ndim >= 2, lr_scales.get(id(p), 1.0)), []).append(p)
    return torch.optim.AdamW([{"params": params, "weight_decay": stage.optim.weight_decay if decay else 0.0,
                               "lr_scale": factor} for (decay, factor), params in sorted(
                                  groups.items(), key=lambda kv: (not kv[0][0], -kv[0][1]))], lr=stage.optim.lr)


def stage_progress(optim: OptimConfig, step: int, elapsed: float) -> float:
    """Fraction of the stage done: the larger of the step and the time fractions (OptimConfig ensures a
    budget; a zero one means "no limit")."""
    by_steps = step / optim.max_steps if optim.max_steps else 0.0
    by_time = elapsed / (60 * optim.max_minutes) if optim.max_minutes else 0.0
    return max(by_steps, by_time)


def learning_rate(optim: OptimConfig, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / max(1, optim.warmup_steps))
    return optim.lr * warm * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

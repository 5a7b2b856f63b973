"""A stage's loss on one batch: the method's loss of the batch's encoder outputs, plus the configured extra terms."""

from __future__ import annotations

import torch
from torch import nn

from cirflow.models.cir_model import CIRModel
from cirflow.models.data_parallel import Worker
from cirflow.models.device import Placement
from cirflow.models.losses import LogitScale
from cirflow.models.methods.base import encode_batch, similarity_structure_loss
from cirflow.models.train_config import LossConfig
from cirflow.models.train_data import Batch
from cirflow.models.train_stages import Stage


class Objective(nn.Module):
    """A stage's loss as one module: what DDP wraps for data-parallel training (its forward is where the
    workers' gradient averaging is set up); a single process calls it as it is."""

    def __init__(self, model: CIRModel, scale: LogitScale, stage: Stage, loss_config: LossConfig,
                 worker: Worker) -> None:
        super().__init__()
        self.model, self.scale, self.method = model, scale, stage.method
        self.stage, self.loss_config, self.worker = stage, loss_config, worker

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        return _stage_loss(self.model, self.scale, self.stage, batch, self.loss_config, self.worker)


def batch_loss(objective: nn.Module, batch: Batch, placement: Placement) -> tuple[torch.Tensor, dict]:
    """The objective on `batch`, moved to the placement's device and run under its autocast; the loss in fp32."""
    batch = batch.to(placement.device)
    with placement.autocast():
        loss, terms = objective(batch)
    return loss.float(), terms


def _stage_loss(model: CIRModel, scale: LogitScale, stage: Stage, batch: Batch, loss_config: LossConfig,
                worker: Worker) -> tuple[torch.Tensor, dict]:
    if stage.iacma:
        # Not split across workers: each computes the whole (small) alignment loss, so their gradients are equal.
        return stage.method.iacma_loss(model, batch.images, batch.reference, batch.target, batch.ids, batch.mask)
    keep = loss_config.text_keep
    f = encode_batch(model, batch.images, batch.reference, batch.target, batch.ids, batch.mask, batch.image_stems,
                     batch.text_stems, loss_config.text_noise, sentences=bool(keep), worker=worker)
    loss, terms = stage.method.loss(model, f, stage.composer, scale())
    if keep:
        kept = similarity_structure_loss(f.ref.t, f.sentences)
        loss, terms = loss + keep * kept, {**terms, "text_keep": kept.item()}
    return loss, terms

"""The training recipe: QTM InfoNCE with AdamW and a warmup + cosine schedule, one- or two-stage, resumable.

One recipe serves a single process and each worker of data-parallel training on Ray Train: a worker encodes its
share of every global batch (models/data_parallel.py), and its leader (rank 0) validates and writes the run
directory (models/train_run_dir.py). Where it runs is chosen above it (models/train.py); its parts are
models/train_stages.py (what each stage trains, how fast), models/train_loop.py (a stage's loop) and
models/train_progress.py (logs and metrics).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from cirflow.models.cir_model import build_model, count_parameters
from cirflow.models.data.loaders import load_split
from cirflow.models.data.types import CIRSplit
from cirflow.models.evaluation import build_eval_set
from cirflow.models.losses import LogitScale
from cirflow.models.methods.registry import build_method
from cirflow.models.stem_cache import Stems, compute_stems, eval_stems
from cirflow.models.train_config import TrainConfig
from cirflow.models.train_data import TripletBatches
from cirflow.models.train_loop import Run, run_stage
from cirflow.models.train_progress import run_metrics
from cirflow.models.train_run_dir import FINAL, restore, save_final
from cirflow.models.train_stages import build_optimizer, build_stages

log = logging.getLogger(__name__)


def load_train_split(config: TrainConfig) -> CIRSplit:
    return load_split(config.data.kind, Path(config.data.root), config.data.train_split)


def run_recipe(config: TrainConfig, tokenizer: Tokenizer, train_split: CIRSplit, resume: dict[str, Any] | None,
               run: Run) -> Path:
    """Train the filled-in `config` from scratch or from `resume` (a last.pt payload); returns the final
    checkpoint's path. Data-parallel workers all run this with the same arguments but their `run.worker`."""
    worker, placement = run.worker, run.placement
    torch.manual_seed(config.seed)
    model = build_model(config.model)
    method = build_method(config.method, model, config.loss.symmetric)
    scale = LogitScale(config.loss.logit_scale, config.loss.learn_logit_scale, config.loss.max_logit_scale)
    log.info("model: %d parameters (%s composer), method %s (+%d training-only parameters), recipe %s",
             count_parameters(model), config.model.composer.name, method.label, count_parameters(method),
             config.recipe)
    batches = TripletBatches(train_split, tokenizer, config.preprocess, config.loss.hard_negatives,
                             config.data.max_train_queries, config.loss.group_by_set, pin=placement.cuda)
    # Only the leader validates.
    val = build_eval_set(load_split(config.data.kind, Path(config.data.root), config.data.val_split),
                         config.preprocess) if worker.leader else None
    stages = build_stages(config, model, method, scale)

    state = {"stage": 0, "step": 0, "epoch": 0, "batch": 0, "elapsed": 0.0, "history": [], "samples": 0,
             "wall": 0.0}
    if resume is not None:
        state = restore(resume, model, method, scale)
        run = replace(run, started=run.started - state["wall"])  # wall time of the earlier attempts counts too
        log.info("resuming %s at stage %d step %d", run.dir, state["stage"], state["step"])
    for module in (model, method, scale):
        module.to(placement.device)
    stems = compute_stems(model, batches.pixels, batches.all_captions(), tokenizer, config.preprocess,
                          placement.device, store=Path(config.stem_cache_dir) if config.stem_cache_dir else None)
    # Periodic validation runs a frozen stem once per val image and caption (built on the weights it evaluates).
    val_stems = eval_stems(model, val.pixels, [q.caption for q in val.split.queries], tokenizer, config.preprocess,
                           config.stem_cache_dir or None) if val is not None else None

    for i in range(state["stage"], len(stages)):
        stage = stages[i]
        # TMCIR's IACMA stage edits pixels into pseudo-targets and encodes them through the whole image tower:
        # its batches carry pixels; every other stage's carry the cached image stems.
        batches.use_stems(Stems(None, stems.texts) if stage.iacma else stems)
        optimizer = build_optimizer(stage, model.lr_scales())
        if resume is not None and i == resume["state"]["stage"]:  # the stage the checkpoint was taken in
            optimizer.load_state_dict(resume["optimizer"])
        run_stage(config, stage, model, scale, optimizer, batches, (val, val_stems), tokenizer, state, run)
        state.update(stage=i + 1, step=0, epoch=0, batch=0, elapsed=0.0)

    files = []
    if worker.leader:  # the final checkpoint (weights, no optimiser) and metrics.json
        model.cpu()  # the checkpoint holds CPU tensors, whatever device trained it
        metrics = run_metrics(state, placement, method.label, worker.world, count_parameters(model), run.started)
        files = save_final(run.dir, model, tokenizer, config, metrics)
    run.publish({"stage": len(stages), "step": 0, "finished": True}, files)
    return run.dir / FINAL

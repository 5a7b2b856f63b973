"""One stage's training loop, and `Run`: where it runs (a single process, or one data-parallel worker).

The loop trains until the stage's budget is spent, validating and checkpointing on the clock; its position
(`state`: stage, step, epoch and batch, time spent, history) travels in every checkpoint, so a killed run resumes
at the batch it would have trained next.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tokenizers import Tokenizer
from torch import nn

from cirflow.models.cir_model import CIRModel
from cirflow.models.data_parallel import SINGLE, Worker
from cirflow.models.device import Placement, prefetch
from cirflow.models.evaluation import EvalSet, evaluate
from cirflow.models.losses import LogitScale
from cirflow.models.methods.base import Method
from cirflow.models.stem_cache import EvalStems
from cirflow.models.train_config import TrainConfig
from cirflow.models.train_data import Batch, TripletBatches
from cirflow.models.train_objective import Objective, batch_loss
from cirflow.models.train_progress import StepLog, record_validation
from cirflow.models.train_run_dir import LAST, save_last
from cirflow.models.train_stages import Stage, enter_stage, learning_rate, stage_progress


@dataclass(frozen=True)
class Run:
    """Where the recipe runs: a single process (the defaults), or one data-parallel worker."""

    dir: Path
    placement: Placement
    started: float  # time.monotonic() at the job's start, for its wall time
    worker: Worker = SINGLE
    # Called by every worker after each checkpoint, with the files the leader wrote (none on other workers):
    # Ray Train's report (models/train_ray.py). A single process has nothing to tell.
    publish: Callable[[dict[str, Any], list[Path]], None] = lambda metrics, files: None


def run_stage(config: TrainConfig, stage: Stage, model: CIRModel, scale: LogitScale,
              optimizer: torch.optim.Optimizer, batches: TripletBatches,
              val: tuple[EvalSet | None, EvalStems | None], tokenizer: Tokenizer, state: dict,
              run: Run) -> None:
    """Train `stage` from `state` to the end of its budget, then validate (the leader) and checkpoint."""
    optim, worker, leader = stage.optim, run.worker, run.worker.leader
    if len(batches) < optim.batch_size:
        raise ValueError(f"batch_size={optim.batch_size} exceeds the {len(batches)} training triplets")
    enter_stage(stage, model, scale, config.loss.learn_logit_scale)
    objective = worker.parallel(Objective(model, scale, stage, config.loss, worker))
    last_val = last_ckpt = time.monotonic()
    steps = StepLog(run.dir / "train_log.jsonl", stage.name, state["step"], config.log_every_steps, leader)
    stream = _batches(batches, config.seed, state["epoch"], state["batch"], optim.batch_size)
    for epoch, done, batch in (prefetch(stream) if run.placement.cuda else stream):
        state.update(epoch=epoch, batch=done)
        progress = stage_progress(optim, state["step"], state["elapsed"])
        if progress >= 1.0:
            break
        t0 = time.monotonic()
        lr = learning_rate(optim, state["step"], progress)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss, terms = batch_loss(objective, batch, run.placement)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optim.grad_clip:
            nn.utils.clip_grad_norm_(stage.trainable, optim.grad_clip)
        optimizer.step()
        state["elapsed"] += time.monotonic() - t0
        state["step"] += 1
        state["samples"] += optim.batch_size
        steps.record(state["step"], optim.batch_size, loss.item(), lr, scale, state["elapsed"], terms)
        now = time.monotonic()
        # The leader's clock decides for every worker (the time budget too): see Worker.agree.
        state["elapsed"], validate, save = worker.agree(
            state["elapsed"], bool(config.val_every_minutes and now - last_val >= 60 * config.val_every_minutes),
            now - last_ckpt >= 60 * config.checkpoint_every_minutes)
        if validate and leader:
            _validate(model, val, tokenizer, config, state, stage.name)
            last_val = time.monotonic()
        if save:
            state["wall"] = now - run.started
            _checkpoint(run, model, stage.method, tokenizer, config, scale, optimizer, state)
            last_ckpt = time.monotonic()
    steps.close()
    if leader:
        _validate(model, val, tokenizer, config, state, stage.name)
        state["history"][-1]["train_seconds"] = state["elapsed"]
    state["wall"] = time.monotonic() - run.started
    _checkpoint(run, model, stage.method, tokenizer, config, scale, optimizer, state)


def _batches(batches: TripletBatches, seed: int, epoch: int, skip: int,
             batch_size: int) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, batches of that epoch done after this one, batch), from a resume point onwards. The position
    travels with each batch, so a prefetching consumer records where it is, not where the producer is."""
    while True:
        for i, batch in enumerate(batches.epoch(seed, epoch, batch_size, skip=skip), start=skip + 1):
            yield epoch, i, batch
        epoch, skip = epoch + 1, 0


def _validate(model: CIRModel, val: tuple[EvalSet | None, EvalStems | None], tokenizer: Tokenizer,
              config: TrainConfig, state: dict, stage: str) -> None:
    data, stems = val
    assert data is not None, "only the leader validates"
    m = evaluate(model, data, tokenizer, config.preprocess, modes=("composed",), stems=stems).metrics["composed"]
    if stems is not None:
        stems.save()
    record_validation(state, stage, m)


def _checkpoint(run: Run, model: CIRModel, method: Method, tokenizer: Tokenizer, config: TrainConfig,
                scale: LogitScale, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """checkpoints/last.pt (with optimiser state, for resuming), written by the leader, then published."""
    if run.worker.leader:
        save_last(run.dir, model, method, scale, optimizer, tokenizer, config, state)
    run.publish({"stage": state["stage"], "step": state["step"]}, [run.dir / LAST] if run.worker.leader else [])

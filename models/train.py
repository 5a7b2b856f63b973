"""The training recipe: QTM InfoNCE with AdamW and a warmup + cosine schedule, one- or two-stage, resumable.

`train(config, run_dir)` is the entry point. A run directory holds the resolved config, the tokenizer,
`checkpoints/last.pt` (with optimiser state, for resuming) and, once finished, `checkpoints/model.pt` plus
`metrics.json`. Rerunning on a finished run directory returns at once; on an unfinished one it resumes. Either
is refused when the config differs from the one the run was started with (its `config.yaml`), or the data does
(`data.json`: the fingerprint of data.root when the run started; new data is a new run).

One recipe (`run_recipe`) serves a single process and each worker of data-parallel training on Ray Train
(models/train_ray.py, when distributed.workers > 1 or an address is set): a worker encodes its share of every
global batch (models/data_parallel.py), and its leader (rank 0) validates and writes the run directory.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from cirflow.core.config import ConfigError, load_config, to_dict
from cirflow.core.files import read_json, write_json_atomic, write_text_atomic
from cirflow.core.fingerprint import data_fingerprint
from cirflow.models.checkpoint import save_checkpoint
from cirflow.models.cir_model import CIRModel, build_model, count_parameters
from cirflow.models.composers import ComposerConfig, SumComposer
from cirflow.models.data.loaders import load_split
from cirflow.models.data.types import CIRSplit
from cirflow.models.data_parallel import SINGLE, Shard
from cirflow.models.device import Placement, prefetch, resolve
from cirflow.models.evaluation import EvalSet, build_eval_set, evaluate
from cirflow.models.losses import LogitScale
from cirflow.models.methods.base import Method, encode_batch, similarity_structure_loss
from cirflow.models.methods.registry import MethodConfig, build_method
from cirflow.models.stem_cache import EvalStems, Stems, compute_stems, eval_stems
from cirflow.models.tokenizer import tokenizer_from_json
from cirflow.models.train_config import LossConfig, OptimConfig, TrainConfig, filled_in, new_tokenizer, run_identity
from cirflow.models.train_data import Batch, TripletBatches

log = logging.getLogger(__name__)

# Keys that training fills in itself (from the run's tokenizer, and for a pretrained backbone the preprocessing
# of its weights): a resumed run's config.yaml differs there.
HISTORY_KEYS = ("stage", "step", "minutes", "train_seconds")  # a history entry's other keys are val metrics
DATA_FILE = "data.json"  # the fingerprint of the data a run started on (core/fingerprint.py)
FILLED_IN = frozenset({"model.text.vocab_size", "preprocess.mean", "preprocess.std", "preprocess.resize",
                       "preprocess.mode"})


@dataclass(frozen=True)
class Run:
    """Where the recipe runs: a single process (the defaults), or one data-parallel worker."""

    dir: Path
    placement: Placement
    started: float  # time.monotonic() at the job's start, for its wall time
    shard: Shard = SINGLE
    # Called by every worker after each checkpoint, with the files the leader wrote (none on other workers):
    # Ray Train's report (models/train_ray.py). A single process has nothing to tell.
    publish: Callable[[dict[str, Any], list[Path]], None] = lambda metrics, files: None


@dataclass
class Stage:
    name: str
    optim: OptimConfig
    composer: nn.Module | None  # None = the model's own composer
    trainable: list[nn.Parameter]
    method: Method  # the loss; two_stage's stage 2 trains the composer with plain QTM
    iacma: bool = False  # TMCIR's intent-aware alignment stage (image(pseudo-target) vs text)


def train(config: TrainConfig, run_dir: Path) -> Path:
    """Train (or resume, or return a finished run) in `run_dir`; returns the final checkpoint's path."""
    _check_same_config(config, run_dir)
    _check_same_data(config, run_dir)
    final = run_dir / "checkpoints" / "model.pt"
    if final.exists():
        log.info("run %s is already finished: %s", run_dir, final)
        return final
    if config.distributed.enabled:
        from cirflow.models.train_ray import train_distributed  # Ray is imported on this path only

        return train_distributed(config, run_dir)
    placement = resolve(config.device, config.precision)  # before any data is read: a wrong device fails fast
    started = time.monotonic()
    train_split = load_train_split(config)
    config, tokenizer = prepare_run(config, train_split, run_dir)
    return run_recipe(config, tokenizer, train_split, read_last(run_dir), Run(run_dir, placement, started))


def load_train_split(config: TrainConfig) -> CIRSplit:
    return load_split(config.data.kind, Path(config.data.root), config.data.train_split)


def prepare_run(config: TrainConfig, train_split: CIRSplit, run_dir: Path) -> tuple[TrainConfig, Tokenizer]:
    """The run's tokenizer (made once, then read back) and the config filled in from it, saved as config.yaml; the
    data's fingerprint in data.json (once: a resume has checked it)."""
    tokenizer = _tokenizer(config, train_split, run_dir)
    if not (run_dir / DATA_FILE).is_file():
        write_json_atomic(run_dir / DATA_FILE, {"root": str(config.data.root),
                                                "fingerprint": data_fingerprint(Path(config.data.root))})
    config = filled_in(config, tokenizer)
    _write_config(config, run_dir)
    return config, tokenizer


def read_last(run_dir: Path) -> dict[str, Any] | None:
    """The run's checkpoints/last.pt payload, None before the first checkpoint."""
    last = run_dir / "checkpoints" / "last.pt"
    return torch.load(last, map_location="cpu", weights_only=True) if last.exists() else None


def run_recipe(config: TrainConfig, tokenizer: Tokenizer, train_split: CIRSplit, resume: dict[str, Any] | None,
               run: Run) -> Path:
    """Train the filled-in `config` from scratch or from `resume` (a last.pt payload); returns the final
    checkpoint's path. Data-parallel workers all run this with the same arguments but their `run.shard`."""
    shard, placement = run.shard, run.placement
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
                         config.preprocess) if shard.leader else None
    stages = _stages(config, model, method, scale)

    state = {"stage": 0, "step": 0, "epoch": 0, "batch": 0, "elapsed": 0.0, "history": [], "samples": 0,
             "wall": 0.0}
    if resume is not None:
        model.load_state_dict(resume["model"])
        method.load_state_dict(resume["method"])
        scale.load_state_dict(resume["scale"])
        # A copy: the loop below moves `state` on to later stages, while the optimiser state in `resume` belongs
        # to the stage the checkpoint was taken in, and to no other.
        state = copy.deepcopy(resume["state"])
        run = replace(run, started=run.started - state["wall"])  # wall time of the earlier attempts counts too
        torch.set_rng_state(resume["torch_rng"])
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
        optimizer = _optimizer(stage, model.lr_scales())
        if resume is not None and i == resume["state"]["stage"]:  # the stage the checkpoint was taken in
            optimizer.load_state_dict(resume["optimizer"])
        _run_stage(config, stage, model, scale, optimizer, batches, (val, val_stems), tokenizer, state, i, run)
        state.update(stage=i + 1, step=0, epoch=0, batch=0, elapsed=0.0)

    final = run.dir / "checkpoints" / "model.pt"
    files = [final, run.dir / "metrics.json"] if shard.leader else []
    if shard.leader:
        _finish(config, model, method, tokenizer, state, run, final)
    run.publish({"stage": len(stages), "step": 0, "finished": True}, files)
    return final


def _finish(config: TrainConfig, model: CIRModel, method: Method, tokenizer: Tokenizer, state: dict, run: Run,
            final: Path) -> None:
    """The leader's last act: the final checkpoint (weights, no optimiser) and metrics.json."""
    # The last stage ended with a validation of this very model: its metrics, not a second pass over val.
    last_val = {k: v for k, v in state["history"][-1].items() if k not in HISTORY_KEYS}
    model.cpu()  # the checkpoint holds CPU tensors, whatever device trained it
    metrics = {"device": str(run.placement.device), "bf16": run.placement.bf16, "val": last_val,
               "method": method.label, "history": state["history"], "workers": run.shard.world,
               "parameters": count_parameters(model), "train_samples": state["samples"],
               "train_seconds": sum(h["train_seconds"] for h in state["history"] if "train_seconds" in h),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # the leader's
               "wall_seconds": time.monotonic() - run.started}  # the whole job: decoding and validation too
    metrics["samples_per_s"] = metrics["train_samples"] / max(metrics["train_seconds"], 1e-9)
    save_checkpoint(final, model, tokenizer, config, metrics=metrics)
    write_json_atomic(run.dir / "metrics.json", metrics)


def _check_same_config(config: TrainConfig, run_dir: Path) -> None:
    """Refuse to continue a run (or hand back its model) under a config other than the one it started with."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    try:
        original = load_config(TrainConfig, path)
    except ConfigError as e:
        raise ConfigError(f"run {run_dir} cannot be resumed, its config does not load: {e}") from e
    old, new = _flatten(run_identity(original)), _flatten(run_identity(config))
    changed = sorted(k for k in old.keys() | new.keys() if k not in FILLED_IN and old.get(k) != new.get(k))
    if changed:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ConfigError(f"run {run_dir} was started with another config ({details}); train into a new run "
                          "directory (cirflow train: another --run-id) or use the run's own config.yaml")


def _check_same_data(config: TrainConfig, run_dir: Path) -> None:
    """Refuse to resume a run (or hand back its model) on other data than it started on (its data.json, written
    by prepare_run): a resumed run would keep the old run's tokenizer and mix two datasets."""
    path = run_dir / DATA_FILE
    if not path.is_file():
        if (run_dir / "checkpoints").exists():
            log.warning("run %s records no data fingerprint (an older cirflow made it): assuming the same data",
                        run_dir)
        return
    started, now = read_json(path, ConfigError).get("fingerprint"), data_fingerprint(Path(config.data.root))
    if started != now:
        raise ConfigError(f"run {run_dir} was started on other data ({config.data.root}: fingerprint {started}, "
                          f"now {now}: files were added, removed or changed); train into a new run directory "
                          "(cirflow train without --run-id names the run by its data)")


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}: config keys as the command line spells them."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _tokenizer(config: TrainConfig, split: CIRSplit, run_dir: Path) -> Tokenizer:
    path = run_dir / "tokenizer.json"
    if path.exists():  # resuming: the vocabulary must not change under the embedding table
        return tokenizer_from_json(path.read_text())
    tokenizer = new_tokenizer(config, (c for q in split.queries for c in (q.train_captions or (q.caption,))))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, tokenizer.to_str())
    return tokenizer


def _stages(config: TrainConfig, model: CIRModel, method: Method, scale: LogitScale) -> list[Stage]:
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


def _optimizer(stage: Stage, lr_scales: dict[int, float]) -> torch.optim.Optimizer:
    """AdamW with one group per (weight decay, learning-rate factor): pretrained weights fine-tuned gently
    (TowerPolicy.lr_scale) follow the same schedule at a fraction of the rate."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for p in stage.trainable:
        # Weight decay on matrices only: decaying norms, biases and embeddings' scale terms hurts small models.
        groups.setdefault((p.ndim >= 2, lr_scales.get(id(p), 1.0)), []).append(p)
    return torch.optim.AdamW([{"params": params, "weight_decay": stage.optim.weight_decay if decay else 0.0,
                               "lr_scale": factor} for (decay, factor), params in sorted(
                                  groups.items(), key=lambda kv: (not kv[0][0], -kv[0][1]))], lr=stage.optim.lr)


def _progress(optim: OptimConfig, step: int, elapsed: float) -> float:
    """Fraction of the stage done: the larger of the step and the time fractions (OptimConfig ensures a
    budget; a zero one means "no limit")."""
    by_steps = step / optim.max_steps if optim.max_steps else 0.0
    by_time = elapsed / (60 * optim.max_minutes) if optim.max_minutes else 0.0
    return max(by_steps, by_time)


def _lr(optim: OptimConfig, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / max(1, optim.warmup_steps))
    return optim.lr * warm * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class _Objective(nn.Module):
    """A stage's loss as one module: what DDP wraps for data-parallel training (its forward is where the
    workers' gradient averaging is set up); a single process calls it as it is."""

    def __init__(self, model: CIRModel, scale: LogitScale, stage: Stage, loss_config: LossConfig,
                 shard: Shard) -> None:
        super().__init__()
        self.model, self.scale, self.method = model, scale, stage.method
        self.stage, self.loss_config, self.shard = stage, loss_config, shard

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        return _stage_loss(self.model, self.scale, self.stage, batch, self.loss_config, self.shard)


def _loss(objective: nn.Module, batch: Batch, placement: Placement) -> tuple[torch.Tensor, dict]:
    batch = batch.to(placement.device)
    with placement.autocast():
        loss, terms = objective(batch)
    return loss.float(), terms


def _stage_loss(model: CIRModel, scale: LogitScale, stage: Stage, batch: Batch, loss_config: LossConfig,
                shard: Shard) -> tuple[torch.Tensor, dict]:
    if stage.iacma:
        # Not split across workers: each computes the whole (small) alignment loss, so their gradients are equal.
        return stage.method.iacma_loss(model, batch.images, batch.reference, batch.target, batch.ids, batch.mask)
    keep = loss_config.text_keep
    f = encode_batch(model, batch.images, batch.reference, batch.target, batch.ids, batch.mask, batch.image_stems,
                     batch.text_stems, loss_config.text_noise, sentences=bool(keep), shard=shard)
    loss, terms = stage.method.loss(model, f, stage.composer, scale())
    if keep:
        kept = similarity_structure_loss(f.ref.t, f.sentences)
        loss, terms = loss + keep * kept, {**terms, "text_keep": kept.item()}
    return loss, terms


def _batches(batches: TripletBatches, seed: int, epoch: int, skip: int,
             batch_size: int) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, batches of that epoch done after this one, batch), from a resume point onwards. The position
    travels with each batch, so a prefetching consumer records where it is, not where the producer is."""
    while True:
        for i, batch in enumerate(batches.epoch(seed, epoch, batch_size, skip=skip), start=skip + 1):
            yield epoch, i, batch
        epoch, skip = epoch + 1, 0


def _run_stage(config: TrainConfig, stage: Stage, model: CIRModel, scale: LogitScale,
               optimizer: torch.optim.Optimizer, batches: TripletBatches,
               val: tuple[EvalSet | None, EvalStems | None], tokenizer: Tokenizer, state: dict, index: int,
               run: Run) -> None:
    optim, shard, leader = stage.optim, run.shard, run.shard.leader
    if len(batches) < optim.batch_size:
        raise ValueError(f"batch_size={optim.batch_size} exceeds the {len(batches)} training triplets")
    trainable = {id(p) for p in stage.trainable}
    for p in [*model.parameters(), *stage.method.parameters(), *scale.parameters()]:
        p.requires_grad_(id(p) in trainable and (p is not scale.log_scale or config.loss.learn_logit_scale))
    model.train()
    stage.method.train()
    if stage.composer is None and index > 0:
        # Frozen encoders: eval mode keeps BatchNorm statistics fixed; only the composer trains.
        model.image_encoder.eval()
        model.text_encoder.eval()
    objective = shard.parallel(_Objective(model, scale, stage, config.loss, shard))
    last_val = last_ckpt = time.monotonic()
    bar = tqdm(desc=stage.name, unit="step", disable=not (leader and sys.stderr.isatty()), initial=state["step"])
    log_path = run.dir / "train_log.jsonl"
    window_start, window_samples = time.monotonic(), 0
    stream = _batches(batches, config.seed, state["epoch"], state["batch"], optim.batch_size)
    for epoch, done, batch in (prefetch(stream) if run.placement.cuda else stream):
        state.update(epoch=epoch, batch=done)
        progress = _progress(optim, state["step"], state["elapsed"])
        if progress >= 1.0:
            break
        t0 = time.monotonic()
        lr = _lr(optim, state["step"], progress)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss, terms = _loss(objective, batch, run.placement)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optim.grad_clip:
            nn.utils.clip_grad_norm_(stage.trainable, optim.grad_clip)
        optimizer.step()
        state["elapsed"] += time.monotonic() - t0
        state["step"] += 1
        state["samples"] += optim.batch_size
        window_samples += optim.batch_size
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        if state["step"] % config.log_every_steps == 0 and leader:
            rate = window_samples / (time.monotonic() - window_start)
            _append_json(log_path, {"stage": stage.name, "step": state["step"], "loss": loss.item(), "lr": lr,
                                    "scale": scale().item(), "samples_per_s": rate, "elapsed": state["elapsed"],
                                    **terms})
            log.info("%s step %d loss %.4f lr %.2e scale %.1f %.0f samples/s", stage.name, state["step"],
                     loss.item(), lr, scale().item(), rate)
            window_start, window_samples = time.monotonic(), 0
        now = time.monotonic()
        # The leader's clock decides for every worker (the time budget too): see Shard.agree.
        state["elapsed"], validate, save = shard.agree(
            state["elapsed"], bool(config.val_every_minutes and now - last_val >= 60 * config.val_every_minutes),
            now - last_ckpt >= 60 * config.checkpoint_every_minutes)
        if validate and leader:
            _validate(model, val, tokenizer, config, state, stage.name)
            last_val = time.monotonic()
        if save:
            state["wall"] = now - run.started
            _checkpoint(run, model, stage.method, tokenizer, config, scale, optimizer, state)
            last_ckpt = time.monotonic()
    bar.close()
    if leader:
        _validate(model, val, tokenizer, config, state, stage.name)
        state["history"][-1]["train_seconds"] = state["elapsed"]
    state["wall"] = time.monotonic() - run.started
    _checkpoint(run, model, stage.method, tokenizer, config, scale, optimizer, state)


def _validate(model: CIRModel, val: tuple[EvalSet | None, EvalStems | None], tokenizer: Tokenizer,
              config: TrainConfig, state: dict, stage: str) -> None:
    data, stems = val
    assert data is not None, "only the leader validates"
    m = evaluate(model, data, tokenizer, config.preprocess, modes=("composed",), stems=stems).metrics["composed"]
    if stems is not None:
        stems.save()
    state["history"].append({"stage": stage, "step": state["step"], "minutes": state["elapsed"] / 60, **m})
    log.info("val %s step %d (%.1f min): R@1 %.4f R@5 %.4f Rsubset@1 %.4f", stage, state["step"],
             state["elapsed"] / 60, m["R@1"], m["R@5"], m["Rsubset@1"])


def _checkpoint(run: Run, model: CIRModel, method: Method, tokenizer: Tokenizer, config: TrainConfig,
                scale: LogitScale, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """checkpoints/last.pt (with optimiser state, for resuming), written by the leader, then published."""
    last = run.dir / "checkpoints" / "last.pt"
    if run.shard.leader:
        save_checkpoint(last, model, tokenizer, config, state=dict(state), method=method.state_dict(),
                        scale=scale.state_dict(), optimizer=optimizer.state_dict(), torch_rng=torch.get_rng_state())
    run.publish({"stage": state["stage"], "step": state["step"]}, [last] if run.shard.leader else [])


def _write_config(config: TrainConfig, run_dir: Path) -> None:
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))


def _append_json(path: Path, data: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(data) + "\n")

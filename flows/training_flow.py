"""The `training` flow: data -> train -> evaluate -> export bundle -> quality gate -> register as current.

    training(config="configs/training_flow.yaml", overrides=["train.optim.max_minutes=2"])

Each task is a thin wrapper over a stage function. The expensive ones are cached on content keys (the training
config and a fingerprint of the data; the checkpoint's sha256; the bundle id; and where each result is written:
flows/caching.py), so a rerun with unchanged inputs trains, evaluates and exports nothing. The gate evaluates the
new bundle and the current one with the same evaluator on the same split (flows/gate.py) and registers the new
one only if it is not worse beyond the tolerance; otherwise the flow run fails with both rows of numbers. The run
directory is named by the config and the data's fingerprint: a week's new training data trains a new run, the
same data reuses the finished one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, task

from cirflow.core.config import load_config
from cirflow.core.files import CURRENT, sha256_file
from cirflow.core.fingerprint import data_fingerprint
from cirflow.export.bundle import export_bundle
from cirflow.export.evaluate_bundle import evaluate_bundle
from cirflow.export.manifest import BundleError, register_bundle, resolve_bundle_dir, verify_bundle
from cirflow.flows.artifacts import markdown_table, publish_links, publish_markdown
from cirflow.flows.caching import by_key, cache_key, cached
from cirflow.flows.gate import GateConfig, GateRefused, decide
from cirflow.flows.plots import plot_training, read_training_log
from cirflow.models.data.shapes import ShapesConfig, generate_shapes
from cirflow.models.eval_job import EvalJobConfig, run_eval
from cirflow.models.train import train
from cirflow.models.train_config import TrainConfig, run_identity
from cirflow.models.train_job import run_id_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShapesData:
    """The built-in dataset, generated at train.data.root when the kind is shapes and the folder is missing."""

    seed: int = 0
    scale: float = 1.0


@dataclass(frozen=True)
class TrainingFlowConfig:
    workdir: str = "workdir"  # runs/ and bundles/ go here
    train: TrainConfig = field(default_factory=TrainConfig)
    shapes: ShapesData = field(default_factory=ShapesData)
    gate: GateConfig = field(default_factory=GateConfig)


@task
def prepare_data(config: TrainingFlowConfig) -> str:
    """The dataset's fingerprint (generating the built-in one first where it is missing)."""
    data = config.train.data
    if data.kind == "shapes" and not Path(data.root).exists():
        generate_shapes(ShapesConfig(seed=config.shapes.seed, scale=config.shapes.scale), Path(data.root))
    return data_fingerprint(Path(data.root))


@task(cache_key_fn=by_key, persist_result=True)
def train_model(key: str, config: TrainConfig, run_dir: str) -> str:
    return str(train(config, Path(run_dir)))


@task(cache_key_fn=by_key, persist_result=True)
def evaluate_checkpoint(key: str, checkpoint: str) -> dict[str, Any]:
    return run_eval(EvalJobConfig(Path(checkpoint), _eval_dir(checkpoint)))


def _eval_dir(checkpoint: str) -> Path:
    """Where a run's evaluation is written: RUN/eval beside RUN/checkpoints."""
    return Path(checkpoint).parent.parent / "eval"


@task(cache_key_fn=by_key, persist_result=True)
def export_model(key: str, checkpoint: str, bundle_dir: str) -> str:
    return str(export_bundle(Path(checkpoint), Path(bundle_dir)))


@task(cache_key_fn=by_key, persist_result=True)
def evaluate_for_gate(key: str, bundle_dir: str, kind: str, root: str, split: str) -> dict[str, float]:
    """The bundle's composed-query metrics on the gate split, through ONNX Runtime (cached per bundle id)."""
    results = evaluate_bundle(Path(bundle_dir), kind, Path(root), (split,), providers="cpu")
    (only,) = results.values()
    return only["composed"]


@task(retries=2, retry_delay_seconds=1)
def register(bundle_dir: str) -> str:
    return str(register_bundle(Path(bundle_dir)))


@flow(name="training", log_prints=True)
def training(config: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate, export, gate and register; returns the bundle and the gate's decision."""
    cfg = load_config(TrainingFlowConfig, Path(config) if config else None, list(overrides or ()))
    return run_training(cfg)


def run_training(cfg: TrainingFlowConfig) -> dict[str, Any]:
    """The flow's body, callable from another flow (pipeline) with a loaded config."""
    workdir = Path(cfg.workdir)
    data_key = prepare_data(cfg)
    run_dir = workdir / "runs" / run_id_for(cfg.train, data_key)  # new training data: a new run
    checkpoint = cached(train_model, lambda c: Path(c).is_file(),
                        key=cache_key(run_dir, run_identity(cfg.train), data_key), config=cfg.train,
                        run_dir=str(run_dir))
    checkpoint_sha = sha256_file(Path(checkpoint))
    results = cached(evaluate_checkpoint, lambda r: (_eval_dir(checkpoint) / "metrics.json").is_file(),
                     key=cache_key(_eval_dir(checkpoint), checkpoint_sha, data_key), checkpoint=checkpoint)
    export_dir = workdir / "bundles" / run_dir.name
    bundle = cached(export_model, _bundle_ok, key=cache_key(export_dir, checkpoint_sha), checkpoint=checkpoint,
                    bundle_dir=str(export_dir))
    new_id = verify_bundle(Path(bundle))["bundle_id"]
    data, gate = cfg.train.data, cfg.gate
    split = gate.split

    def gate_metrics(bundle_dir: Path, bundle_id: str) -> dict[str, float]:
        # Metrics, written to no file: keyed on the workdir whose gate they serve, like every cached result.
        return evaluate_for_gate(key=cache_key(workdir, bundle_id, data_key, data.kind, split),
                                 bundle_dir=str(bundle_dir), kind=data.kind, root=data.root, split=split)

    new = gate_metrics(Path(bundle), new_id)
    current_dir = _current_bundle(workdir / "bundles")
    current_id = verify_bundle(current_dir)["bundle_id"] if current_dir else None
    current = gate_metrics(current_dir, current_id) if current_dir and current_id else None
    decision = decide(new, current, gate, new_id, current_id)
    table = decision.table(f"quality gate on {data.kind}/{split} (composed queries): {decision.reason}")
    print(table)
    _artifacts(run_dir, results, decision.rows, decision.reason, split)
    if not decision.passed:
        raise GateRefused(f"bundle {new_id} not registered: {decision.reason}\n{table}")
    register(bundle)
    return {"bundle": bundle, "bundle_id": new_id, "registered": True, "checkpoint": checkpoint,
            "gate": {"reason": decision.reason, "rows": decision.rows}, "results": results}


def _bundle_ok(bundle: str) -> bool:
    try:
        verify_bundle(Path(bundle))
    except (BundleError, FileNotFoundError):
        return False
    return True


def _current_bundle(bundles: Path) -> Path | None:
    """The registered bundle, None when nothing is registered yet; a CURRENT naming a damaged or missing bundle
    counts as none, with a warning (the gate then has nothing to compare with)."""
    if not (bundles / CURRENT).is_file():
        log.info("no bundle registered in %s yet: the gate has nothing to compare with", bundles)
        return None
    try:
        current = resolve_bundle_dir(bundles)
        verify_bundle(current)
    except (BundleError, FileNotFoundError) as e:
        log.warning("no usable current bundle in %s (%s): the gate compares with nothing", bundles, e)
        return None
    return current


def _artifacts(run_dir: Path, results: dict[str, Any], gate_rows: dict[str, dict[str, float]], reason: str,
               split: str) -> None:
    plots = run_dir / "plots"
    try:
        training_png = plot_training(*read_training_log(run_dir), plots / "training.png")
    except ValueError as e:  # a plot must never fail the run
        log.warning("no training plot for %s: %s", run_dir, e)
        training_png = None
    evaluation = {f"{split_name} ({mode})": metrics for split_name, modes in results.items()
                  for mode, metrics in modes.items()}
    publish_markdown("training-metrics", f"Training run {run_dir.name}", [
        (f"Quality gate on {split}: {reason}", markdown_table(gate_rows, "bundle")),
        ("Evaluation of the checkpoint (PyTorch)", markdown_table(evaluation, "split (queries)"))])
    sheets = {p.stem: p for p in sorted((run_dir / "eval").glob("examples-*.png"))}
    publish_links("training", {**({"loss-and-recall": training_png} if training_png else {}), **sheets})


"""The main job on the built-in default: generate shapes, train, evaluate, print the results table.

Later stages (export, embedding, indexing, search) join this pipeline as they land.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from models.config_io import load_config, to_dict
from models.eval_job import EvalJobConfig, run_eval
from models.train import train
from models.train_config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path("workdir")
    train_config: Path | None = None
    scale: float = 1.0
    overrides: tuple[str, ...] = ()


def run_id_for(config: TrainConfig) -> str:
    """Runs are named by their config: the same command resumes or reuses its run instead of starting over."""
    digest = hashlib.sha1(json.dumps(to_dict(config), sort_keys=True).encode()).hexdigest()[:10]
    return f"{config.data.kind.replace('/', '-')}-{config.model.composer.name}-{digest}"


def train_run(config_path: Path | None, overrides: list[str] | tuple[str, ...], workdir: Path,
              run_id: str | None = None) -> Path:
    config = load_config(TrainConfig, config_path, list(overrides))
    run_dir = workdir / "runs" / (run_id or run_id_for(config))
    log.info("training run %s", run_dir)
    return train(config, run_dir)


def run_demo(config: DemoConfig) -> dict:
    from models.data.shapes import ShapesConfig, generate_shapes

    data_dir = config.workdir / "data" / ("shapes" if config.scale == 1.0 else f"shapes-x{config.scale:g}")
    generate_shapes(ShapesConfig(scale=config.scale), data_dir)
    overrides = (f"data.root={data_dir}", "data.kind=shapes", *config.overrides)
    checkpoint = train_run(config.train_config, overrides, config.workdir)
    results = run_eval(EvalJobConfig(checkpoint, checkpoint.parent.parent / "eval"))
    log.info("demo finished: run %s", checkpoint.parent.parent)
    return results

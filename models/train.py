"""`train(config, run_dir)`: train, resume or hand back a finished run, in this process or on Ray Train.

A run directory (models/train_run_dir.py) holds the resolved config, the tokenizer, `checkpoints/last.pt` and,
once finished, `checkpoints/model.pt` plus `metrics.json`. Rerunning on a finished run directory returns at once;
on an unfinished one it resumes. Either is refused when the config or the data differs from the run's own.

This module chooses where the recipe (models/train_recipe.py) runs: here, or on Ray Train workers
(models/train_ray.py) when distributed.workers > 1 or an address is set. The recipe imports neither.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from cirflow.models.device import resolve
from cirflow.models.train_config import TrainConfig
from cirflow.models.train_loop import Run
from cirflow.models.train_recipe import load_train_split, run_recipe
from cirflow.models.train_run_dir import FINAL, check_same_config, check_same_data, prepare_run, read_last

log = logging.getLogger(__name__)


def train(config: TrainConfig, run_dir: Path) -> Path:
    """Train (or resume, or return a finished run) in `run_dir`; returns the final checkpoint's path."""
    check_same_config(config, run_dir)
    check_same_data(config, run_dir)
    final = run_dir / FINAL
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

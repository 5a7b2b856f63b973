"""The `cirflow train` job: a YAML config plus overrides -> a run directory under WORKDIR/runs -> a checkpoint.

It imports the training stage only (no export, ONNX or FAISS; Ray only for distributed training), so a training
host needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

from cirflow.core.config import load_config
from cirflow.core.fingerprint import data_fingerprint
from cirflow.models.train import train
from cirflow.models.train_config import TrainConfig, run_identity

log = logging.getLogger(__name__)


def run_id_for(config: TrainConfig, data: str) -> str:
    """Runs are named by their config and their data's fingerprint (core/fingerprint.py, ending the id): the same
    command on the same data resumes or reuses its run instead of starting over (with any `distributed`
    settings: they say where a run executes, not what it computes), and new training data is a new run."""
    digest = hashlib.sha1(json.dumps(run_identity(config), sort_keys=True).encode()).hexdigest()[:10]
    return f"{config.data.kind.replace('/', '-')}-{config.model.composer.name}-{digest}-{data[:8]}"


def train_run(config_path: Path | None, overrides: Sequence[str], workdir: Path, run_id: str | None = None) -> Path:
    """Load the config strictly (every error before any directory exists), then train, resume or reuse the run
    WORKDIR/runs/<run_id> (default: named by the config's hash and the data's fingerprint); returns the final
    checkpoint's path."""
    config = load_config(TrainConfig, config_path, list(overrides))
    run_dir = workdir / "runs" / (run_id or run_id_for(config, data_fingerprint(Path(config.data.root))))
    log.info("training run %s", run_dir)
    return train(config, run_dir)

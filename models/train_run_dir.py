"""A training run's directory: what a run starts with, the checks that a rerun is the same run, its checkpoints.

A run directory holds the resolved config (`config.yaml`), the tokenizer, the data's fingerprint (`data.json`),
`checkpoints/last.pt` (with optimiser state, for resuming) and, once finished, `checkpoints/model.pt` plus
`metrics.json`. A rerun is refused when the config differs from the one the run was started with, or the data
does (new data is a new run).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from tokenizers import Tokenizer

from cirflow.core.config import ConfigError, flatten, load_config, to_dict
from cirflow.core.files import read_json, write_json_atomic, write_text_atomic
from cirflow.core.fingerprint import data_fingerprint
from cirflow.models.checkpoint import save_checkpoint
from cirflow.models.cir_model import CIRModel
from cirflow.models.data.types import CIRSplit
from cirflow.models.losses import LogitScale
from cirflow.models.methods.base import Method
from cirflow.models.tokenizer import tokenizer_from_json
from cirflow.models.train_config import TrainConfig, filled_in, new_tokenizer, run_identity

log = logging.getLogger(__name__)

FINAL = "checkpoints/model.pt"  # the trained model; its presence marks a finished run
LAST = "checkpoints/last.pt"  # the latest state, optimiser included: where a rerun resumes
METRICS = "metrics.json"
DATA_FILE = "data.json"  # the fingerprint of the data a run started on (core/fingerprint.py)
# Keys that training fills in itself (from the run's tokenizer, and for a pretrained backbone the preprocessing
# of its weights): a resumed run's config.yaml differs there.
FILLED_IN = frozenset({"model.text.vocab_size", "preprocess.mean", "preprocess.std", "preprocess.resize",
                       "preprocess.mode"})


def check_same_config(config: TrainConfig, run_dir: Path) -> None:
    """Refuse to continue a run (or hand back its model) under a config other than the one it started with."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    try:
        original = load_config(TrainConfig, path)
    except ConfigError as e:
        raise ConfigError(f"run {run_dir} cannot be resumed, its config does not load: {e}") from e
    old, new = flatten(run_identity(original)), flatten(run_identity(config))
    changed = sorted(k for k in old.keys() | new.keys() if k not in FILLED_IN and old.get(k) != new.get(k))
    if changed:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ConfigError(f"run {run_dir} was started with another config ({details}); train into a new run "
                          "directory (cirflow train: another --run-id) or use the run's own config.yaml")


def check_same_data(config: TrainConfig, run_dir: Path) -> None:
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


def prepare_run(config: TrainConfig, train_split: CIRSplit, run_dir: Path) -> tuple[TrainConfig, Tokenizer]:
    """The run's tokenizer (made once, then read back) and the config filled in from it, saved as config.yaml; the
    data's fingerprint in data.json (once: a resume has checked it)."""
    tokenizer = _tokenizer(config, train_split, run_dir)
    if not (run_dir / DATA_FILE).is_file():
        write_json_atomic(run_dir / DATA_FILE, {"root": str(config.data.root),
                                                "fingerprint": data_fingerprint(Path(config.data.root))})
    config = filled_in(config, tokenizer)
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    return config, tokenizer


def read_last(run_dir: Path) -> dict[str, Any] | None:
    """The run's checkpoints/last.pt payload, None before the first checkpoint."""
    last = run_dir / LAST
    return torch.load(last, map_location="cpu", weights_only=True) if last.exists() else None


def save_last(run_dir: Path, model: CIRModel, method: Method, scale: LogitScale, optimizer: torch.optim.Optimizer,
              tokenizer: Tokenizer, config: TrainConfig, state: dict) -> None:
    """checkpoints/last.pt: everything a resume needs, the training loop's `state` and the RNG included."""
    save_checkpoint(run_dir / LAST, model, tokenizer, config, state=dict(state), method=method.state_dict(),
                    scale=scale.state_dict(), optimizer=optimizer.state_dict(), torch_rng=torch.get_rng_state())


def restore(resume: dict[str, Any], model: CIRModel, method: Method, scale: LogitScale) -> dict:
    """Load a last.pt payload's weights and RNG; returns its training loop state. The optimiser state is the
    caller's: it belongs to the stage the checkpoint was taken in, and to no other."""
    model.load_state_dict(resume["model"])
    method.load_state_dict(resume["method"])
    scale.load_state_dict(resume["scale"])
    torch.set_rng_state(resume["torch_rng"])
    # A copy: the loop moves the state on to later stages, while `resume` must still say where it was taken.
    return copy.deepcopy(resume["state"])


def save_final(run_dir: Path, model: CIRModel, tokenizer: Tokenizer, config: TrainConfig,
               metrics: dict[str, Any]) -> list[Path]:
    """The finished run: checkpoints/model.pt (weights, no optimiser) and metrics.json; returns their paths."""
    save_checkpoint(run_dir / FINAL, model, tokenizer, config, metrics=metrics)
    write_json_atomic(run_dir / METRICS, metrics)
    return [run_dir / FINAL, run_dir / METRICS]


def _tokenizer(config: TrainConfig, split: CIRSplit, run_dir: Path) -> Tokenizer:
    path = run_dir / "tokenizer.json"
    if path.exists():  # resuming: the vocabulary must not change under the embedding table
        return tokenizer_from_json(path.read_text())
    tokenizer = new_tokenizer(config, (c for q in split.queries for c in (q.train_captions or (q.caption,))))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, tokenizer.to_str())
    return tokenizer

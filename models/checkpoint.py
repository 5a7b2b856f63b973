"""Checkpoints that rebuild their model alone: weights + resolved config + tokenizer + step + metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from cirflow.core.config import from_dict, to_dict
from cirflow.core.files import write_atomic
from cirflow.models.cir_model import CIRModel, build_model
from cirflow.models.tokenizer import tokenizer_from_json
from cirflow.models.train_config import TrainConfig

FORMAT = "cirflow-checkpoint-v1"


class CheckpointError(ValueError):
    pass


@dataclass
class LoadedCheckpoint:
    model: CIRModel  # in eval mode
    tokenizer: Tokenizer
    config: TrainConfig
    payload: dict[str, Any]  # everything else saved (step, metrics, training state)


def save_checkpoint(path: Path, model: CIRModel, tokenizer: Tokenizer, config: TrainConfig,
                    **extra: Any) -> Path:
    """Write atomically (temp name, then rename): a killed save never leaves a half checkpoint."""
    payload = {"format": FORMAT, "config": to_dict(config), "model": model.state_dict(), "arch": model.arch,
               "tokenizer": tokenizer.to_str(), **extra}
    return write_atomic(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} not found") from e
    except Exception as e:  # torch raises several unrelated types for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} file")
    config = from_dict(TrainConfig, payload.pop("config"), "checkpoint config")
    model = build_model(config.model, payload.pop("arch", {}))
    model.load_state_dict(payload.pop("model"))
    model.eval()
    tokenizer = tokenizer_from_json(payload.pop("tokenizer"))
    return LoadedCheckpoint(model, tokenizer, config, payload)

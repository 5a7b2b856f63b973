"""A tiny seeded model, for smoke tests, quick benches and tests: the one definition they all share.

`TINY_MODEL` is a list of config overrides (a few thousand parameters per tower, batch 16) that trains in
seconds on the shapes data; callers add a budget (`optim.max_steps=N`). `make_checkpoint` saves an untrained
model of that size as a real checkpoint, tokenizer included: what export, indexing and serving tests need,
since their checks (parity, formats, errors) are properties of the code and not of training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from cirflow.core.config import load_config
from cirflow.models.checkpoint import save_checkpoint
from cirflow.models.cir_model import CIRModel, build_model
from cirflow.models.train_config import TrainConfig, filled_in, new_tokenizer

TINY_MODEL = (
    "model.image.widths=[8, 16, 32]", "model.image.dim=32", "model.image.layers=1", "model.image.heads=2",
    "model.image.embed_dim=32", "model.text.dim=32", "model.text.layers=1", "model.text.heads=2",
    "model.text.embed_dim=32", "optim.batch_size=16", "optim.warmup_steps=2", "optim.max_minutes=0",
    "val_every_minutes=0", "tokenizer.vocab_size=300",
)
CAPTIONS = ("make the red circle blue", "add a small green square on the left", "remove the large triangle",
            "move the purple circle to the bottom right", "same scene but the yellow square is small")
# A checkpoint holds a complete training config, and a training stage needs a budget; TINY_MODEL leaves the
# budget to its callers, so the saved config gets the smallest one.
CHECKPOINT_BUDGET = ("optim.max_steps=1",)
FILL_STD = 0.1  # spread of the values given to zero-initialised parameters; near the default Linear init's


def make_checkpoint(path: Path, composer: str = "sum", seed: int = 0, captions: Sequence[str] = CAPTIONS,
                    overrides: Sequence[str] = (), tiny: bool = True, fill_zeros: bool = False,
                    **extra: Any) -> Path:
    """Save an untrained, seeded model as a real checkpoint (with a tokenizer trained on `captions`).

    tiny: start from TINY_MODEL (False: the default configuration, e.g. for speed benches); `overrides` are
    applied after it (model.backbone.name=... gives a pretrained backbone, with its own tokenizer). fill_zeros: give every parameter that its initialisation leaves all zero (ATF's output
    projection and type embedding, biases) seeded random values, so that a parity test exercises every branch
    (an untrained ATF is otherwise exactly the sum composer). `extra` goes into the checkpoint (step, metrics).
    """
    base = (*TINY_MODEL, *CHECKPOINT_BUDGET) if tiny else ()
    config = load_config(TrainConfig, None, [*base, f"model.composer.name={composer}", *overrides])
    tokenizer = new_tokenizer(config, captions)
    config = filled_in(config, tokenizer)
    torch.manual_seed(seed)
    model = build_model(config.model).eval()
    if fill_zeros:
        fill_zero_parameters(model, seed)
    return save_checkpoint(path, model, tokenizer, config, **extra)


def fill_zero_parameters(model: CIRModel, seed: int, std: float = FILL_STD) -> None:
    """Replace every all-zero parameter with N(0, std^2) values from a generator seeded by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * std)

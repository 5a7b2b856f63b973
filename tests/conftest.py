"""Shared fixtures: a tiny shapes dataset and a tiny model configuration, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from cirflow.models.data.shapes import ShapesConfig, generate_shapes

TINY_MODEL = [
    "model.image.widths=[8, 16, 32]", "model.image.dim=32", "model.image.layers=1", "model.image.heads=2",
    "model.image.embed_dim=32", "model.text.dim=32", "model.text.layers=1", "model.text.heads=2",
    "model.text.embed_dim=32", "optim.batch_size=16", "optim.warmup_steps=2", "optim.max_minutes=0",
    "val_every_minutes=0", "tokenizer.vocab_size=300",
]


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shapes"
    return generate_shapes(ShapesConfig(seed=0, train_triplets=160, val_queries=40, test_queries=40, workers=1),
                           out)


@pytest.fixture
def tiny_overrides(tiny_shapes: Path) -> list[str]:
    """key=value overrides for a tiny model trained on the tiny dataset (add optim.max_steps)."""
    return [f"data.root={tiny_shapes}", *TINY_MODEL]

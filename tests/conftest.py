"""Shared fixtures: a tiny shapes dataset, made once per session, and overrides for the tiny model
(cirflow.models.tiny.TINY_MODEL) trained on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from cirflow.models.data.shapes import ShapesConfig, generate_shapes
from cirflow.models.tiny import TINY_MODEL, make_checkpoint


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shapes"
    return generate_shapes(ShapesConfig(seed=0, train_triplets=160, val_queries=40, test_queries=40, workers=1),
                           out)


@pytest.fixture
def tiny_overrides(tiny_shapes: Path) -> list[str]:
    """key=value overrides for a tiny model trained on the tiny dataset (add optim.max_steps)."""
    return [f"data.root={tiny_shapes}", *TINY_MODEL]


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported untrained tiny bundle ("sum" composer, seed 0), made once per session: many tests need real
    graphs and none needs its own (an export takes ~8 s). Read-only: tests copy it to change it."""
    from cirflow.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("tiny-bundle")
    return export_bundle(make_checkpoint(root / "model.pt", "sum"), root / "bundle")


@pytest.fixture(scope="session")
def effnet_minilm_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, bundle) of an untrained effnet-minilm model (pretrained towers, tiny joint layers): its
    export takes about a minute, so the export and embedding tests share one."""
    pytest.importorskip("transformers", reason="pretrained backbones need the 'pretrained' extra")
    from cirflow.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("effnet-minilm")
    checkpoint = make_checkpoint(root / "model.pt", "combiner", overrides=["model.backbone.name=effnet-minilm"])
    return checkpoint, export_bundle(checkpoint, root / "bundle")

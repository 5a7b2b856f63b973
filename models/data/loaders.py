"""The dataset registry: one name per on-disk format and category, each loading into a `CIRSplit`."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from cirflow.models.data.cirr import load_cirr
from cirflow.models.data.fashioniq import load_fashioniq
from cirflow.models.data.types import CIRSplit

# kind -> loader(root, split). The shapes benchmark is written in CIRR's format.
LOADERS: dict[str, Callable[[Path, str], CIRSplit]] = {
    "cirr": partial(load_cirr, dataset="cirr"),
    "shapes": partial(load_cirr, dataset="shapes"),
    "fashioniq/dress": partial(load_fashioniq, category="dress"),
    "fashioniq/shirt": partial(load_fashioniq, category="shirt"),
    "fashioniq/toptee": partial(load_fashioniq, category="toptee"),
}


def load_split(kind: str, root: Path, split: str) -> CIRSplit:
    """Load `split` of the dataset at `root`, read with the loader registered as `kind`."""
    try:
        loader = LOADERS[kind]
    except KeyError as e:
        raise ValueError(f"unknown dataset kind {kind!r}; choose one of {', '.join(LOADERS)}") from e
    return loader(Path(root), split=split)

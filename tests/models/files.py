"""Damage to a dataset written on disk, for the loaders' malformed-input tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def break_file(relative: str, text: str | None) -> Callable[[Path], None]:
    """A function that replaces the dataset file at `relative` with `text` (None: deletes it)."""

    def apply(root: Path) -> None:
        path = root / relative
        if text is None:
            path.unlink()
        else:
            path.write_text(text)

    return apply

"""Writing result files atomically: a temp name beside the target, then a rename, so that a reader or a
resumed job never sees a half-written file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any, sort_keys: bool = False) -> None:
    """Indented JSON with a trailing newline; `sort_keys` where the same content must give the same bytes."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys, default=_numpy_scalar) + "\n")


def _numpy_scalar(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

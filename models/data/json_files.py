"""Reading dataset JSON files with errors that name the file and where it is malformed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.data.types import DatasetError


def read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the file ({e.strerror or e})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e

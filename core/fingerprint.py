"""A directory's fingerprint from one stat per file: what names a dataset's state in run ids and cache keys."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def data_fingerprint(root: Path) -> str:
    """(relative path, size, mtime_ns) of every file under a dataset directory: one stat per file, no reads,
    like the catalog's default change key (indexing/embedding/catalog.py). A file added, removed, rewritten or touched
    gives another fingerprint."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {root} does not exist")
    digest = hashlib.sha256()
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(directory, name)
            st = os.stat(path)
            digest.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]

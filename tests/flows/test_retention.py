"""Bundle retention: the newest `keep` bundles, CURRENT, and the bundles of kept index versions stay; the others
go, with their embedding snapshots and encoded queries."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cirflow.core.files import publish_current
from cirflow.export.manifest import FORMAT, MANIFEST
from cirflow.flows.retention import prune_bundles
from cirflow.indexing.search import index_store


def bundle(workdir: Path, name: str, age: int) -> Path:
    """A bundle directory as retention sees it (its manifest's bundle_id), exported `age` hours ago."""
    path = workdir / "bundles" / name
    path.mkdir(parents=True)
    (path / MANIFEST).write_text(json.dumps({"format": FORMAT, "bundle_id": f"id-{name}"}))
    for leftover in (workdir / "embeddings" / "shop" / f"id-{name}" / "snap", workdir / "queries" / f"id-{name}"):
        leftover.mkdir(parents=True)
    stamp = 1_700_000_000 - age * 3600
    os.utime(path, (stamp, stamp))
    return path


def test_prune_keeps_the_newest_current_and_indexed_bundles(tmp_path: Path) -> None:
    old_current, indexed, newer, newest, stale = (bundle(tmp_path, name, age) for name, age in (
        ("a", 50), ("b", 40), ("c", 20), ("d", 10), ("e", 30)))
    publish_current(old_current)  # a rollback of the model, say: the oldest is CURRENT
    version = tmp_path / "indexes" / "shop" / "v1"
    version.mkdir(parents=True)
    (version / index_store.MANIFEST).write_text(json.dumps({"format": index_store.FORMAT, "bundle_id": "id-b"}))

    assert prune_bundles(tmp_path, keep=2) == ["e"]
    assert all(p.is_dir() for p in (old_current, indexed, newer, newest)) and not stale.exists()
    assert not (tmp_path / "embeddings" / "shop" / "id-e").exists() and not (tmp_path / "queries" / "id-e").exists()
    assert (tmp_path / "embeddings" / "shop" / "id-d").is_dir()
    assert prune_bundles(tmp_path, keep=2) == []  # a rerun has nothing left to do
    with pytest.raises(ValueError, match="keep_bundles=0"):
        prune_bundles(tmp_path, keep=0)

"""The embedding snapshot format: which recorded shards a start must redo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cirflow.indexing.embedding import shards
from tests.indexing.conftest import clustered, write_snapshot


def test_damaged_shards_accepts_a_run_from_before_errors_files_were_recorded(tmp_path: Path) -> None:
    run = write_snapshot(tmp_path / "run", clustered(30, 8, seed=0), rows_per_shard=10)
    manifest = run.manifest
    name = shards.shard_name(1)
    manifest["shards"][name]["errors"] = 2  # an older manifest: the count, no "errors_file" entry
    errors = shards.error_table(np.array([5, 7]), ["a.png", "b.png"], ["empty file (0 bytes)"] * 2)
    shards.write_parquet_atomic(errors, run.snapshot_dir / shards.SHARD_ERRORS_DIR / name)
    assert shards.damaged_shards(run.snapshot_dir, manifest) == {}  # not re-embedded for want of a checksum

    (run.snapshot_dir / shards.SHARD_ERRORS_DIR / name).unlink()
    assert list(shards.damaged_shards(run.snapshot_dir, manifest)) == [name]
    (run.snapshot_dir / shards.shard_name(0)).unlink()
    assert sorted(shards.damaged_shards(run.snapshot_dir, manifest)) == [shards.shard_name(0), name]


def test_errors_files_of_older_snapshots_read_as_permanent(tmp_path: Path) -> None:
    """errors.parquet written before failures were classified (id, uri, reason) reads with transient all false,
    and a manifest without transient_errors counts none: such a snapshot is never retried."""
    old = pa.table({"id": pa.array([9, 4], pa.int64()), "uri": ["a.png", "b.png"], "reason": ["file not found"] * 2})
    pq.write_table(old, tmp_path / shards.ERRORS)
    table = shards.read_errors(tmp_path / shards.ERRORS, filters=[("id", ">=", 5)])
    assert table.schema == shards.ERROR_SCHEMA
    assert table.to_pylist() == [{"id": 9, "uri": "a.png", "reason": "file not found", "transient": False}]
    assert shards.transient_errors({"errors": 2}) == 0

    new = shards.error_table(np.array([3, 1]), ["c.png", "d.png"], ["x", "y"], np.array([True, False]))
    pq.write_table(new, tmp_path / "new.parquet")
    assert shards.read_errors(tmp_path / "new.parquet").column("transient").to_pylist() == [False, True]

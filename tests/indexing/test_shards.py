"""The embedding-run format: which recorded shards a start must redo."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cirflow.indexing import shards
from tests.indexing.conftest import clustered, write_run


def test_damaged_shards_accepts_a_run_from_before_errors_files_were_recorded(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", clustered(30, 8, seed=0), rows_per_shard=10)
    manifest = run.manifest
    name = shards.shard_name(1)
    manifest["shards"][name]["errors"] = 2  # an older manifest: the count, no "errors_file" entry
    errors = shards.error_table(np.array([5, 7]), ["a.png", "b.png"], ["empty file (0 bytes)"] * 2)
    shards.write_parquet_atomic(errors, run.run_dir / shards.SHARD_ERRORS_DIR / name)
    assert shards.damaged_shards(run.run_dir, manifest) == {}  # not re-embedded for want of a checksum

    (run.run_dir / shards.SHARD_ERRORS_DIR / name).unlink()
    assert list(shards.damaged_shards(run.run_dir, manifest)) == [name]
    (run.run_dir / shards.shard_name(0)).unlink()
    assert sorted(shards.damaged_shards(run.run_dir, manifest)) == [shards.shard_name(0), name]

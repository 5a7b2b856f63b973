"""Composed query vectors for tuning: a split encoded through the serving path, and the queries file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cirflow.export.runtime import BundleRuntime
from cirflow.indexing.queries import QueriesError, encode_query_split, read_queries, write_queries
from cirflow.models.data.loaders import load_split
from cirflow.models.evaluation import build_eval_set, embed_eval_set


def test_split_queries_are_the_evaluators_composed_queries(tiny_runtime: BundleRuntime, tiny_shapes: Path) -> None:
    vectors, references, targets = encode_query_split(tiny_runtime, "shapes", tiny_shapes, "val", batch_size=16)
    split = load_split("shapes", tiny_shapes, "val")
    data = build_eval_set(split, tiny_runtime.preprocess)
    expected = embed_eval_set(tiny_runtime, data, tiny_runtime.tokenizer, tiny_runtime.preprocess, ("composed",))
    # Other batches pad the token rows to other lengths; the attention mask makes that a rounding difference.
    np.testing.assert_allclose(vectors, expected.queries["composed"], atol=1e-5)
    assert references == [q.reference for q in split.queries] and targets == [q.target for q in split.queries]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_queries_file_round_trips_and_names_its_bundle(tmp_path: Path) -> None:
    vectors = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    path = write_queries(tmp_path / "q.parquet", vectors, "aaaa")
    np.testing.assert_array_equal(read_queries(path, "aaaa"), vectors)
    np.testing.assert_array_equal(read_queries(path), vectors)
    assert [p.name for p in tmp_path.iterdir()] == ["q.parquet"]  # written under a temp name, renamed
    with pytest.raises(QueriesError, match="encoded by bundle aaaa, not bbbb"):
        read_queries(path, "bbbb")


def test_bad_queries_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(QueriesError, match="queries file not found"):
        read_queries(tmp_path / "missing.parquet")
    pq.write_table(pa.table({"vector": [1.0]}), tmp_path / "other.parquet")
    with pytest.raises(QueriesError, match="not a queries file with columns embedding and bundle_id"):
        read_queries(tmp_path / "other.parquet")
    mixed = pa.table({"embedding": pa.array([[1.0], [2.0]], pa.list_(pa.float32(), 1)), "bundle_id": ["a", "b"]})
    pq.write_table(mixed, tmp_path / "mixed.parquet")
    with pytest.raises(QueriesError, match=r"several bundles \['a', 'b'\]"):
        read_queries(tmp_path / "mixed.parquet")
    with pytest.raises(QueriesError, match="non-empty"):
        write_queries(tmp_path / "empty.parquet", np.zeros((0, 4), np.float32), "a")

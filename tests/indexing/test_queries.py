"""Composed query vectors for tuning: a split encoded through the serving path, and the queries file."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cirflow.export.runtime import BundleRuntime
from cirflow.flows.cli import main
from cirflow.indexing.embedding.catalog import folder_entries
from cirflow.indexing.index.queries import (
    Queries,
    QueriesError,
    catalog_ids,
    encode_query_split,
    read_queries,
    write_queries,
)
from cirflow.indexing.search.index_store import verify_index
from cirflow.models.data.loaders import load_split
from cirflow.models.evaluation import build_eval_set, embed_eval_set
from tests.indexing.conftest import write_snapshot


def test_split_queries_are_the_evaluators_composed_queries(tiny_runtime: BundleRuntime, tiny_shapes: Path) -> None:
    queries = encode_query_split(tiny_runtime, "shapes", tiny_shapes, "val", batch_size=16)
    vectors = queries.vectors
    split = load_split("shapes", tiny_shapes, "val")
    data = build_eval_set(split, tiny_runtime.preprocess)
    expected = embed_eval_set(tiny_runtime, data, tiny_runtime.tokenizer, tiny_runtime.preprocess, ("composed",))
    # Other batches pad the token rows to other lengths; the attention mask makes that a rounding difference.
    np.testing.assert_allclose(vectors, expected.queries["composed"], atol=1e-5)
    # Each query names its reference image by resolved file: what index tuning matches to the catalog.
    assert queries.references == tuple(str(split.images[q.reference].resolve()) for q in split.queries)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_a_dataset_under_a_name_that_is_not_utf8_writes_its_references(tiny_runtime: BundleRuntime,
                                                                       tiny_shapes: Path, tmp_path: Path) -> None:
    """Parquet strings must be UTF-8: such a reference is stored as a file:// uri that matches the catalog."""
    root = tmp_path / os.fsdecode(b"data-\xff")
    shutil.copytree(tiny_shapes, root)
    queries = encode_query_split(tiny_runtime, "shapes", root, "val", batch_size=16)
    read = read_queries(write_queries(tmp_path / "q.parquet", queries, tiny_runtime.bundle_id))
    split = load_split("shapes", root, "val")
    catalog = folder_entries(root / "images" / "val", [split.images[q.reference] for q in split.queries[:3]])
    ids = catalog_ids(read.references[:3], catalog.column("id").to_numpy(), catalog.column("uri").to_pylist())
    assert (ids >= 0).all()


def test_cli_queries_carry_their_references_into_the_index_build(tiny_runtime: BundleRuntime, tiny_shapes: Path,
                                                                  tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    split = load_split("shapes", tiny_shapes, "val")
    assert main(["index", "queries", "--bundle", str(tiny_runtime.bundle_dir), "--root", str(tiny_shapes),
                 "--split", "val", "--out", str(tmp_path / "q.parquet")]) == 0
    queries = read_queries(Path(capsys.readouterr().out.strip()), tiny_runtime.bundle_id)
    assert queries.references == tuple(str(split.images[q.reference].resolve()) for q in split.queries)
    # The val gallery as the catalog, listed by unresolved paths: every reference is matched and left out.
    names = list(split.images)
    write_snapshot(tmp_path / "run", tiny_runtime.embed_images([split.images[n] for n in names]), rows_per_shard=32,
              uris=[str(tiny_shapes / ".." / tiny_shapes.name / "images" / "val" / split.images[n].name)
                    for n in names], bundle_id=tiny_runtime.bundle_id, catalog="shapes-val")
    assert main(["index", "build", "--embeddings", str(tmp_path / "run"), "--queries", str(tmp_path / "q.parquet"),
                 "--out", str(tmp_path / "indexes")]) == 0
    recall = verify_index(Path(capsys.readouterr().out.strip()))["recall"]
    references = len(set(queries.references))
    assert recall["reference_excluded"] == len(split.queries) == 40
    assert recall["split"]["tuning"]["references"] + recall["split"]["held_out"]["references"] == references
    # --shards 2: the same inputs as a sharded version, published; its merged recall measured the same way.
    assert main(["index", "build", "--embeddings", str(tmp_path / "run"), "--queries", str(tmp_path / "q.parquet"),
                 "--out", str(tmp_path / "indexes"), "--shards", "2"]) == 0
    sharded = Path(capsys.readouterr().out.strip())
    manifest = verify_index(sharded)
    assert manifest["layout"] == "sharded" and len(manifest["shards"]) == 2
    assert manifest["recall"]["reference_excluded"] == 40 and manifest["recall"]["split"] == recall["split"]
    assert (sharded.parent / "CURRENT").read_text().strip() == sharded.name


def test_queries_file_round_trips_and_names_its_bundle(tmp_path: Path) -> None:
    vectors = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    references = ("/data/a.png", None, "/data/a.png", "s3://shop/b.jpg", None)
    path = write_queries(tmp_path / "q.parquet", Queries(vectors, references), "aaaa")
    for read in (read_queries(path, "aaaa"), read_queries(path)):
        np.testing.assert_array_equal(read.vectors, vectors)
        assert read.references == references
    assert [p.name for p in tmp_path.iterdir()] == ["q.parquet"]  # written under a temp name, renamed
    with pytest.raises(QueriesError, match="encoded by bundle aaaa, not bbbb"):
        read_queries(path, "bbbb")


def test_a_file_from_before_references_loads_without_them(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    old = pa.table({"embedding": pa.array([[1.0, 0.0], [0.0, 1.0]], pa.list_(pa.float32(), 2)),
                    "bundle_id": ["a", "a"]})
    pq.write_table(old, tmp_path / "old.parquet")
    with caplog.at_level(logging.WARNING):
        queries = read_queries(tmp_path / "old.parquet", "a")
    assert queries.references == (None, None) and queries.vectors.shape == (2, 2)
    assert "no reference column" in caplog.text and "cirflow index queries" in caplog.text


def test_references_match_catalog_entries_by_file(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (images / name).write_bytes(b"x")
    (tmp_path / "linked").symlink_to(images)  # a catalog listed through a symlinked folder
    ids = np.array([11, 12, 13, 14, 15])
    uris = [str(tmp_path / "linked" / "a.png"), str(images / "b.png"), f"file://{images / 'c.png'}",
            "s3://shop/d.jpg", str(images / "b.png")]  # b twice: the first listed wins
    references = [str(images / "a.png"), str(tmp_path / "linked" / "b.png"), str(images / "c.png"),
                  "s3://shop/d.jpg", None, str(images / "missing.png"), "s3://shop/e.jpg", "a.png"]
    np.testing.assert_array_equal(catalog_ids(references, ids, uris), [11, 12, 13, 14, -1, -1, -1, -1])


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
    numbered = mixed.append_column("reference", pa.array([1, 2])).slice(0, 1)
    pq.write_table(numbered, tmp_path / "numbered.parquet")
    with pytest.raises(QueriesError, match="reference column is int64, expected strings"):
        read_queries(tmp_path / "numbered.parquet")
    with pytest.raises(QueriesError, match="non-empty"):
        write_queries(tmp_path / "empty.parquet", Queries.unreferenced(np.zeros((0, 4), np.float32)), "a")
    with pytest.raises(QueriesError, match="1 references for 2 query vectors"):
        Queries(np.zeros((2, 4), np.float32), (None,))

"""Embedding snapshots at a URI (any fsspec filesystem, here memory://): the job writes, reuses, checks and
prunes its files there, and an index builds from the snapshot as from a local one. The same code on a
two-node Ray cluster writing to a file:// URI: tests/indexing/test_embed_cluster.py."""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from cirflow.core.files import location
from cirflow.indexing.embedding import shards
from cirflow.indexing.embedding.catalog import CatalogConfig
from cirflow.indexing.embedding.job import EmbedConfig, EmbedError, run_embed
from cirflow.indexing.index.build import build_index
from cirflow.indexing.index.queries import Queries
from cirflow.indexing.index.validate import expected_ids
from tests.indexing.test_embed import write_images


def test_a_snapshot_at_a_uri_is_made_refreshed_checked_pruned_and_indexed(tiny_bundle: Path,
                                                                           tmp_path: Path) -> None:
    root = f"memory://cirflow-{uuid.uuid4().hex}"  # the memory filesystem lives as long as this process
    folder = tmp_path / "catalog"
    paths = write_images(folder, 20, seed=11)

    def job(workdir: str) -> EmbedConfig:
        return EmbedConfig(catalog=CatalogConfig(name="shop", folder=str(folder)), bundle=str(tiny_bundle),
                           workdir=workdir, rows_per_shard=8, batch_size=4, keep_snapshots=2)

    first = run_embed(job(root))
    local = run_embed(job(str(tmp_path / "work")))
    assert str(first).startswith("memory://") and not (tmp_path / "memory:").exists()
    fs = fsspec.filesystem("memory")
    assert not [p for p in fs.find(location(root).path) if ".tmp-" in p]  # temp names renamed away
    remote, here = shards.open_snapshot(first).read_all(), shards.open_snapshot(local).read_all()
    np.testing.assert_array_equal(remote[0], here[0])
    assert remote[1].tobytes() == here[1].tobytes() and remote[2] == here[2]

    # A shard lost from the store is found on the next start and redone, to the same rows.
    lost = first / shards.shard_name(1)
    lost.unlink()
    assert run_embed(job(root)) == first
    assert shards.read_manifest(first)["last_run"]["shards"] == 1
    assert shards.open_snapshot(first).read_all()[1].tobytes() == here[1].tobytes()

    # Two refreshes: each new snapshot copies the unchanged vectors from the store, and the oldest is pruned.
    snapshots = [first]
    for seed in (12, 13):
        write_images(folder / f"more-{seed}", 2, seed=seed)
        snapshots.append(run_embed(job(root)))
        delta = shards.read_manifest(snapshots[-1])["delta"]
        assert delta["added"] == 2 and delta["reused_vectors"] == len(paths) + 2 * (seed - 12)
    assert not first.exists() and snapshots[1].exists()
    assert shards.open_snapshot(snapshots[0].parent).snapshot_dir == snapshots[2]  # CURRENT at the URI

    # An index builds from the snapshot at the URI.
    run = shards.open_snapshot(snapshots[2])
    ids, vectors, uris = run.read_all()
    assert np.array_equal(expected_ids(run), np.sort(ids))
    near = vectors[:6] + 0.01
    queries = Queries(near / np.linalg.norm(near, axis=1, keepdims=True), tuple(uris[:6]))
    index_dir = build_index(run, queries, tmp_path / "indexes")
    assert (index_dir / "manifest.json").is_file()


def test_a_workdir_uri_that_cannot_be_reached_is_named(tiny_bundle: Path, tmp_path: Path) -> None:
    write_images(tmp_path / "catalog", 2, seed=1)
    cases = [("nosuchfs://bucket/x", "Unsupported filesystem: 'nosuchfs'")]
    if importlib.util.find_spec("s3fs") is None:  # not among our dependencies: s3:// names the package to install
        cases.append(("s3://bucket/x", "Install s3fs to access S3"))
    for workdir, reason in cases:
        config = EmbedConfig(catalog=CatalogConfig(name="shop", folder=str(tmp_path / "catalog")),
                             bundle=str(tiny_bundle), workdir=workdir)
        with pytest.raises(EmbedError, match=f"workdir='{workdir}' cannot be used: {reason}"):
            run_embed(config)

"""Overlay index versions: a refreshed snapshot's index made of the previous version's files, a delta and dead
ids, answering exactly as a rebuild does, chained over refreshes, compacted past its limit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cirflow.export.bundle import export_bundle
from cirflow.indexing.embedding import shards
from cirflow.indexing.embedding.catalog import CatalogConfig
from cirflow.indexing.embedding.job import EmbedConfig, run_embed
from cirflow.indexing.index.build import build_index
from cirflow.indexing.index.plan import IndexConfig
from cirflow.indexing.index.queries import Queries
from cirflow.indexing.index.refresh import build_or_refresh, refresh_index
from cirflow.indexing.index.tuning import exact_knn, load_truth
from cirflow.indexing.index.validate import validate_index
from cirflow.indexing.index.versions import publish
from cirflow.indexing.search import VectorIndex, index_store
from cirflow.models.tiny import make_checkpoint
from tests.export.conftest import random_images
from tests.indexing.conftest import unit
from tests.indexing.test_embed import png_bytes, write_images


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("overlay-bundle")
    return export_bundle(make_checkpoint(root / "model.pt", "sum", seed=3), root / "bundle")


def change(folder: Path, paths: list[Path], add: int, remove: int, overwrite: int, seed: int) -> list[Path]:
    """Add, remove and overwrite catalog images; returns the paths still in the catalog."""
    new = [folder / f"new-{seed}-{i}.png" for i in range(add)]
    for path, pixels in zip(new, random_images(add + overwrite, 64, seed)):
        path.write_bytes(png_bytes(pixels))
    for path, pixels in zip(paths[remove:remove + overwrite], random_images(overwrite, 64, seed + 100)):
        path.write_bytes(png_bytes(pixels))
    for path in paths[:remove]:
        path.unlink()
    return paths[remove:] + new


def exact(run: shards.EmbeddingSnapshot, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids, vectors, _ = run.read_all()
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, axis=1)


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_overlays_answer_as_a_rebuild_and_chain(bundle: Path, tmp_path: Path, index_type: str) -> None:
    folder, workdir, indexes = tmp_path / "shop", tmp_path / "wd", tmp_path / "indexes"
    paths = write_images(folder, 80, seed=11)
    job = EmbedConfig(catalog=CatalogConfig(name="shop", folder=str(folder)), bundle=str(bundle),
                      workdir=str(workdir), rows_per_shard=32)
    config = IndexConfig(index_type=index_type, hnsw_m=16)
    dim = shards.open_snapshot(run_embed(job)).dim
    queries = Queries.unreferenced(unit(np.random.default_rng(0).standard_normal((60, dim))))
    first = build_index(shards.open_snapshot(run_embed(job)), queries, indexes, config)
    publish(first)

    paths = change(folder, paths, add=4, remove=3, overwrite=2, seed=1)
    second_run = shards.open_snapshot(run_embed(job))
    second = refresh_index(second_run, queries, first, config, max_fraction=0.5)
    assert second is not None
    overlay = index_store.read_manifest(second)["overlay"]
    assert (overlay["base"], overlay["dead"], overlay["delta"]) == (first.name, 5, 6)  # 3 removed + 2 changed
    assert validate_index(second, second_run, queries, 0.9).passed
    publish(second)

    # A refresh of the refresh: the base stays the first build's files; dead ids and the delta accumulate.
    change(folder, paths[2:], add=2, remove=1, overwrite=1, seed=2)  # one base image removed, one overwritten
    third_run = shards.open_snapshot(run_embed(job))
    third = refresh_index(third_run, queries, second, config, max_fraction=0.5)
    assert third is not None
    overlay = index_store.read_manifest(third)["overlay"]
    assert (overlay["base"], overlay["previous"], overlay["dead"], overlay["delta"]) == (first.name, second.name,
                                                                                       7, 9)
    # The exact top lists were updated from the previous version's with the changes alone: as if computed anew.
    saved = load_truth(third / index_store.TRUTH_FILE)
    anew = exact_knn(queries.vectors, ((i, v) for i, v, _ in third_run.iter_shards()), saved.ids.shape[1])
    np.testing.assert_allclose(saved.scores, anew.scores, atol=1e-5)
    assert all(set(a) == set(b) for a, b in zip(saved.ids.tolist(), anew.ids.tolist()))
    index = VectorIndex.load(third)
    assert index.ntotal == third_run.rows == 82
    found_ids, found_scores = index.search(queries.vectors, 10)
    true_ids, true_scores = exact(third_run, queries.vectors, 10)
    if index_type == "flat":  # exact base and delta: the rebuild's answer
        np.testing.assert_allclose(found_scores, true_scores, atol=1e-5)
        assert all(set(a) == set(b) for a, b in zip(found_ids.tolist(), true_ids.tolist()))
    else:
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found_ids.tolist(), true_ids.tolist())]) > 0.9
    # Every answer is live: never a removed id, and a changed image scores with its new vector.
    assert set(found_ids.ravel().tolist()) <= set(third_run.read_all()[0].tolist())
    # Excluding an id still works on an overlay.
    excluded = found_ids[:, 0]
    again = index.search(queries.vectors, 10, excluded)[0]
    assert not (again == excluded[:, None]).any()

    # Versions share the base's files by hard links: pruning the first build leaves the overlay whole.
    publish(third, keep=2)
    assert not first.exists()
    VectorIndex.load(third)  # sha256 of every file, the base's included


def test_an_overlay_over_corrupt_uploads_answers_as_a_rebuild(bundle: Path, tmp_path: Path) -> None:
    """A refresh whose new entry, and an overwritten one, are not images: errors rows, not vectors (the overlay's
    exact top lists were once updated with them and failed on an index out of bounds)."""
    folder, workdir = tmp_path / "shop", tmp_path / "wd"
    paths = write_images(folder, 40, seed=5)
    job = EmbedConfig(catalog=CatalogConfig(name="shop", folder=str(folder)), bundle=str(bundle),
                      workdir=str(workdir), rows_per_shard=16)
    run = shards.open_snapshot(run_embed(job))
    queries = Queries.unreferenced(unit(np.random.default_rng(1).standard_normal((30, run.dim))))
    first = build_index(run, queries, tmp_path / "indexes", IndexConfig(index_type="flat"))
    change(folder, paths, add=2, remove=1, overwrite=1, seed=3)
    (folder / "broken upload.png").write_bytes(b"\x89PNG not really")
    paths[5].write_bytes(b"overwritten by a truncated file")
    second_run = shards.open_snapshot(run_embed(job))
    assert second_run.manifest["errors"] == 2
    second = refresh_index(second_run, queries, first, IndexConfig(index_type="flat"), max_fraction=0.5)
    assert second is not None and validate_index(second, second_run, queries, 0.99).passed
    # The exact top lists, updated from the first version's with the changes, hold no errors row.
    saved = load_truth(second / index_store.TRUTH_FILE)
    anew = exact_knn(queries.vectors, ((i, v) for i, v, _ in second_run.iter_shards()), saved.ids.shape[1])
    np.testing.assert_allclose(saved.scores, anew.scores, atol=1e-5)
    assert all(set(a) == set(b) for a, b in zip(saved.ids.tolist(), anew.ids.tolist()))
    found_ids, found_scores = VectorIndex.load(second).search(queries.vectors, 10)
    true_ids, true_scores = exact(second_run, queries.vectors, 10)
    np.testing.assert_allclose(found_scores, true_scores, atol=1e-5)


def test_a_large_change_or_another_snapshot_builds_in_full(bundle: Path, tmp_path: Path) -> None:
    folder, workdir, indexes = tmp_path / "shop", tmp_path / "wd", tmp_path / "indexes"
    paths = write_images(folder, 40, seed=12)
    job = EmbedConfig(catalog=CatalogConfig(name="shop", folder=str(folder)), bundle=str(bundle),
                      workdir=str(workdir))
    run = shards.open_snapshot(run_embed(job))
    queries = Queries.unreferenced(unit(np.random.default_rng(1).standard_normal((30, run.dim))))
    first = build_index(run, queries, indexes, IndexConfig())
    change(folder, paths, add=6, remove=0, overwrite=0, seed=3)  # 6 of 40: over a 10% limit
    grown = shards.open_snapshot(run_embed(job))
    assert refresh_index(grown, queries, first, IndexConfig(), max_fraction=0.1) is None
    full = build_or_refresh(grown, queries, indexes, IndexConfig(), first, max_fraction=0.1)
    assert "overlay" not in index_store.read_manifest(full)
    # The snapshot after that was refreshed from `grown`, not from the one `first` was built from: full build.
    change(folder, sorted(folder.iterdir()), add=1, remove=0, overwrite=0, seed=4)
    later = shards.open_snapshot(run_embed(job))
    assert refresh_index(later, queries, first, IndexConfig(), max_fraction=0.5) is None
    overlay = build_or_refresh(later, queries, indexes, IndexConfig(), full, max_fraction=0.5)
    assert index_store.read_manifest(overlay)["overlay"]["delta"] == 1

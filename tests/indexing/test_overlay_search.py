"""Overlay index versions searched: dead ids excluded inside faiss (GPU: only short rows asked again, never past
faiss's limit), the delta scored on the base's scale, and a concurrent twin of the version kept."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pytest

from cirflow.indexing.embedding import shards
from cirflow.indexing.embedding.shards import EmbeddingSnapshot
from cirflow.indexing.index.build import build_index
from cirflow.indexing.index.plan import IndexConfig
from cirflow.indexing.index.queries import Queries
from cirflow.indexing.index.refresh import refresh_index
from cirflow.indexing.search import VectorIndex
from cirflow.indexing.search import overlay as overlay_module
from cirflow.indexing.search import vector_index as vector_index_module
from tests.indexing.conftest import clustered, query_like, write_snapshot

N, DIM, SEED, ROWS_PER_SHARD = 2000, 32, 5, 700
TUNING = Queries.unreferenced(query_like(SEED, 40, DIM))


def snapshot(previous: EmbeddingSnapshot, snapshot_dir: Path, removed: np.ndarray = np.zeros(0, np.int64),
             changed: dict[int, np.ndarray] | None = None, added: dict[int, np.ndarray] | None = None,
             **written: Any) -> EmbeddingSnapshot:
    """The next snapshot of `previous` as the embedding job records it: its vectors, and changes against it
    (`written`: conftest.write_snapshot's keywords, e.g. its bundle)."""
    changed, added = changed or {}, added or {}
    ids, vectors, _ = previous.read_all()
    keep = ~np.isin(ids, removed)
    ids, vectors = ids[keep], vectors[keep].copy()
    for i, vector in changed.items():
        vectors[np.searchsorted(ids, i)] = vector
    ids = np.concatenate([ids, np.array(list(added), np.int64)])
    vectors = np.concatenate([vectors, np.array(list(added.values()), np.float32).reshape(-1, vectors.shape[1])])
    order = np.argsort(ids, kind="stable")
    write_snapshot(snapshot_dir, vectors[order], ROWS_PER_SHARD, ids[order], **written)
    kinds = {**{i: "removed" for i in removed.tolist()}, **{i: "changed" for i in changed},
             **{i: "added" for i in added}}
    table = pa.table({"id": pa.array(list(kinds), pa.int64()), "change": pa.array(list(kinds.values()))})
    manifest = shards.read_manifest(snapshot_dir)
    manifest["changes_file"] = {shards.CHANGES: shards.write_parquet_atomic(table.sort_by("id"),
                                                                           snapshot_dir / shards.CHANGES)}
    manifest["delta"] = {"previous": previous.snapshot_dir.name}
    shards.write_manifest(snapshot_dir, manifest)
    return shards.open_snapshot(snapshot_dir)


def base(tmp_path: Path, config: IndexConfig) -> tuple[EmbeddingSnapshot, Path]:
    run = write_snapshot(tmp_path / "snapshot-1", clustered(N, DIM, seed=SEED), ROWS_PER_SHARD)
    return run, build_index(run, TUNING, tmp_path / "indexes", config)


def brute_force(run: EmbeddingSnapshot, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids, vectors, _ = run.read_all()
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, axis=1)


def spy_searches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(queries, k) of every search that Python asks of a FAISS index from now on."""
    asked: list[tuple[int, int]] = []
    for cls in (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexShards, faiss.IndexIVFFlat, faiss.IndexIVFPQ):
        def search(self: faiss.Index, x: np.ndarray, k: int, *args: object, _original=cls.search,
                   **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
            asked.append((len(x), int(k)))
            return _original(self, x, k, *args, **kwargs)

        monkeypatch.setattr(cls, "search", search)
    return asked


@pytest.mark.parametrize("merge", [True, False])
def test_dead_nearest_neighbours_are_skipped_without_fetching_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   merge: bool) -> None:
    config = IndexConfig(index_type="flat", merge=merge)
    first_snapshot, first = base(tmp_path, config)
    queries, k = query_like(SEED + 1, 12, DIM), 10
    ids, vectors, _ = first_snapshot.read_all()
    # Every query's 3k nearest catalog items are removed: an over-fetch of k + a margin finds none alive.
    removed = np.unique(ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :3 * k]])
    others = np.setdiff1d(ids, removed)[:5]
    fresh = clustered(10, DIM, seed=SEED + 2)
    run = snapshot(first_snapshot, tmp_path / "snapshot-2", removed, changed=dict(zip(others.tolist(), fresh[:5])),
                   added={10**6 + i: fresh[5 + i] for i in range(5)})
    overlay = refresh_index(run, TUNING, first, config, max_fraction=0.5)
    assert overlay is not None
    index = VectorIndex.load(overlay)

    asked = spy_searches(monkeypatch)
    found_ids, found_scores = index.search(queries, k)
    true_ids, true_scores = brute_force(run, queries, k)
    np.testing.assert_allclose(found_scores, true_scores, atol=1e-5)
    assert [set(row) for row in found_ids.tolist()] == [set(row) for row in true_ids.tolist()]
    excluded = index.search(queries, k, exclude_ids=found_ids[:, 0])[0]
    np.testing.assert_array_equal(excluded[:, :k - 1], found_ids[:, 1:])
    assert asked and max(fetched for _, fetched in asked) <= k + 1, asked


def test_an_index_without_selectors_asks_again_for_short_rows_only_up_to_the_gpu_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = IndexConfig(index_type="flat")
    first_snapshot, first = base(tmp_path, config)
    queries, k, limit = query_like(SEED + 1, 12, DIM), 10, 48
    ids, vectors, _ = first_snapshot.read_all()
    nearest = ids[np.argsort(-(queries @ vectors.T), axis=1)]
    # Half the queries lose their 30 nearest: found past a first over-fetch. Query 0 loses its 60 nearest: none
    # alive within the limit, an answer short of k rather than an error.
    removed = np.unique(np.concatenate([nearest[:6, :30].ravel(), nearest[0, :60]]))
    run = snapshot(first_snapshot, tmp_path / "snapshot-2", removed)
    overlay = refresh_index(run, TUNING, first, config, max_fraction=0.5)
    assert overlay is not None
    index = VectorIndex.load(overlay)
    index.on_gpu = index.overlay.on_gpu = True  # searched as a faiss GPU index is: no selector
    for module in (overlay_module, vector_index_module):
        monkeypatch.setattr(module, "GPU_MAX_K", limit)

    asked = spy_searches(monkeypatch)
    found_ids, found_scores = index.search(queries, k)
    live = np.setdiff1d(ids, removed)
    # The whole batch asks once; then only the rows whose first over-fetch held fewer than k live ones.
    (batch, first), *again = asked
    short = (np.isin(nearest[:, :first], live).sum(axis=1) < k).sum()
    assert batch == len(queries) and again and all(rows == short < len(queries) for rows, _ in again), asked
    assert max(fetched for _, fetched in asked) <= limit, asked
    assert np.isin(found_ids[found_ids >= 0], live).all()
    assert (found_ids[0] == -1).all()
    true_ids, true_scores = brute_force(run, queries[1:], k)
    np.testing.assert_allclose(found_scores[1:], true_scores, atol=1e-5)


@pytest.mark.parametrize(("index_type", "merge"), [("flat", True), ("hnsw", True), ("ivf_flat", True),
                                                   ("ivf_pq", True), ("ivf_pq", False), ("hnsw_sq", True),
                                                   ("ivf_pq_rerank", True), ("ivf_pq_rerank", False)])
def test_delta_items_score_as_the_base_scores_the_same_vector(tmp_path: Path, index_type: str,
                                                              merge: bool) -> None:
    config = IndexConfig(index_type=index_type, merge=merge, hnsw_m=16, pq_m=16, pq_nbits=5, recall_target=0.5)
    first_snapshot, first = base(tmp_path, config)
    ids, vectors, _ = first_snapshot.read_all()
    # Changed and added items take the vectors of unchanged base items (their twins): a rebuild would score each
    # exactly as its twin, with the base's codes (IVF-PQ: centroid + decoded residual, not the raw vector).
    picked = np.random.default_rng(SEED).choice(ids, 24, replace=False)
    twin_of = {**dict(zip(picked[:8].tolist(), picked[8:16].tolist())),  # changed id -> its twin
               **dict(zip((10**6 + np.arange(8)).tolist(), picked[16:].tolist()))}  # added id -> its twin
    row = {i: r for r, i in enumerate(ids.tolist())}
    run = snapshot(first_snapshot, tmp_path / "snapshot-2",
                   changed={i: vectors[row[t]] for i, t in list(twin_of.items())[:8]},
                   added={i: vectors[row[t]] for i, t in list(twin_of.items())[8:]})
    overlay = refresh_index(run, TUNING, first, config, max_fraction=0.5)
    assert overlay is not None
    index = VectorIndex.load(overlay)

    queries = query_like(SEED + 1, 6, DIM)
    allowed = np.union1d(list(twin_of), list(twin_of.values()))
    found_ids, found_scores = index.search(queries, len(allowed), allow_ids=allowed)
    assert (found_ids >= 0).all()
    twin_vectors = vectors[[row[t] for t in twin_of.values()]]
    for query, row_ids, row_scores in zip(queries, found_ids.tolist(), found_scores.tolist()):
        score = dict(zip(row_ids, row_scores))
        delta = np.array([score[i] for i in twin_of])
        np.testing.assert_allclose(delta, [score[t] for t in twin_of.values()], atol=1e-4)
        if index_type in ("flat", "hnsw", "ivf_flat"):  # an exact base keeps an exact delta
            np.testing.assert_allclose(delta, twin_vectors @ query, atol=1e-5)
        if index_type == "ivf_pq_rerank":  # re-scored from float16: exact to float16's precision
            np.testing.assert_allclose(delta, twin_vectors @ query, atol=1e-3)

@pytest.mark.parametrize("index_type", ["hnsw_sq", "ivf_pq_rerank"])
def test_compressed_overlays_skip_the_dead_filter_and_chain(tmp_path: Path, index_type: str) -> None:
    config = IndexConfig(index_type=index_type, hnsw_m=16, recall_target=0.9)
    first_snapshot, first = base(tmp_path, config)
    queries, k = query_like(SEED, 80, DIM)[40:], 10  # from the distribution the index was tuned on
    ids, vectors, _ = first_snapshot.read_all()
    # Every query's nearest is removed or changed (a changed one must not score with its old vector), and more.
    nearest = np.unique(ids[np.argmax(queries @ vectors.T, axis=1)])
    changed = nearest[1::2][:20]
    removed = np.union1d(nearest[::2], np.random.default_rng(SEED).choice(np.setdiff1d(ids, changed), 40))
    fresh = clustered(25, DIM, seed=SEED + 2)
    run = snapshot(first_snapshot, tmp_path / "snapshot-2", removed, changed=dict(zip(changed.tolist(), fresh)),
                   added={10**6 + i: fresh[20 + i] for i in range(5)})
    second = refresh_index(run, TUNING, first, config, max_fraction=0.5)
    assert second is not None
    later = snapshot(run, tmp_path / "snapshot-3", np.array([10**6], np.int64), added={10**6 + 9: fresh[0]})
    third = refresh_index(later, TUNING, second, config, max_fraction=0.5)
    assert third is not None
    if index_type == "ivf_pq_rerank":  # the float16 store is the base's, shared like its FAISS files
        assert (third / "rerank.npy").stat().st_ino == (first / "rerank.npy").stat().st_ino
    index = VectorIndex.load(third)
    assert index.manifest["recall"]["target_met"] and index.ntotal == later.rows

    live_ids, live_vectors, _ = later.read_all()
    found, scores = index.search(queries, k)
    true_ids, _ = brute_force(later, queries, k)
    assert np.isin(found, live_ids).all()  # never a removed id, nor the removed delta item
    assert np.mean([len(set(a) & set(b)) / k for a, b in zip(found.tolist(), true_ids.tolist())]) > 0.9
    row = {i: r for r, i in enumerate(live_ids.tolist())}
    exact_scores = np.array([[live_vectors[row[i]] @ q for i in ids_] for q, ids_ in zip(queries, found.tolist())])
    # A changed id scores with its new vector (the re-rank's float16 copy; HNSW-SQ8's codes), never its old one.
    np.testing.assert_allclose(scores, exact_scores, atol=1e-3 if index_type == "ivf_pq_rerank" else 2e-2)
    allowed = np.union1d(changed, live_ids[::3])
    found = index.search(queries, k, allow_ids=allowed)[0]
    subset = np.isin(live_ids, allowed)
    truth = live_ids[subset][np.argsort(-(queries @ live_vectors[subset].T), axis=1)[:, :k]]
    assert np.isin(found, allowed).all()
    assert np.mean([len(set(a) & set(b)) / k for a, b in zip(found.tolist(), truth.tolist())]) > 0.9


def test_a_twin_published_concurrently_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = IndexConfig(index_type="flat")
    first_snapshot, first = base(tmp_path, config)
    run = snapshot(first_snapshot, tmp_path / "snapshot-2", np.array([3, 13], np.int64),
                   added={10**6: clustered(1, DIM, seed=SEED + 3)[0]})
    rename = os.rename
    twins: list[Path] = []

    def another_process_first(src: str | Path, dst: str | Path) -> None:
        # The same content-addressed version, assembled by another process, lands just before our rename.
        if Path(src).name.startswith(f".{Path(dst).name}.tmp-"):
            twins.append(Path(shutil.copytree(src, dst)))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", another_process_first)
    overlay = refresh_index(run, TUNING, first, config, max_fraction=0.5)
    monkeypatch.undo()
    assert twins == [overlay]
    assert sorted(p.name for p in overlay.parent.iterdir() if p.name.startswith(".")) == []
    index = VectorIndex.load(overlay)  # the twin, verified whole
    assert index.ntotal == N - 1 and index.entries.unknown_ids([3, 13, 10**6]).tolist() == [3, 13]

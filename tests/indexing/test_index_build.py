"""Index building: every type meets its recall target held out, agrees with brute force, merges or shards,
reruns as a no-op, publishes atomically, and refuses bad inputs before doing any work."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from faiss.contrib.evaluation import check_ref_knn_with_draws

from cirflow.core.files import CURRENT
from cirflow.indexing.embedding.shards import EmbeddingSnapshot
from cirflow.indexing.index import build as index_build
from cirflow.indexing.index.build import IndexBuildError, build_index, index_id, reference_groups
from cirflow.indexing.index.plan import IndexConfig
from cirflow.indexing.index.queries import Queries, catalog_ids
from cirflow.indexing.index.tuning import exact_knn, recall_at_k, split_by_reference
from cirflow.indexing.index.versions import publish
from cirflow.indexing.search import VectorIndex
from cirflow.indexing.search.entries import SearchError
from cirflow.indexing.search.index_store import IndexFormatError, verify_index
from cirflow.indexing.search.placement import FaissGpuUnavailableError, gpu_count, set_search_param
from tests.indexing.conftest import TYPE_CONFIGS, unit, write_snapshot

unreferenced = Queries.unreferenced


def brute_force(run: EmbeddingSnapshot, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the exact top-k by numpy: the reference every index is compared with."""
    ids, vectors, _ = run.read_all()
    scores = queries @ vectors.T  # (Q, N)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


@pytest.mark.parametrize("index_type", list(TYPE_CONFIGS))
def test_every_type_builds_and_meets_its_recall_target_held_out(built: dict[str, Path], toy_snapshot: EmbeddingSnapshot,
                                                                index_type: str) -> None:
    index_dir, config = built[index_type], TYPE_CONFIGS[index_type]
    manifest = verify_index(index_dir)
    assert (manifest["type"], manifest["bundle_id"], manifest["catalog"]) == (index_type, toy_snapshot.bundle_id, "toys")
    assert index_dir.name == manifest["index_id"] and index_dir.parent.name == "toys"
    assert manifest["counts"] == {"vectors": 6000, "shards": 3, "index_files": 1}
    assert manifest["id_range"] == [3, 59993]
    recall = manifest["recall"]
    assert recall["target_met"] and (recall["k"], recall["target"]) == (10, config.recall_target)
    assert recall["held_out"] >= config.recall_target - 0.03  # 200 held-out queries: a point or two of noise
    assert recall["split"] == {"by": "reference image", "seed": 0, "tune_fraction": 0.5,
                               "tuning": {"references": 200, "queries": 200},
                               "held_out": {"references": 200, "queries": 200}, "queries_without_reference": 400}
    assert recall["reference_excluded"] == 0 and "200 of 200 held out" in recall["measured_with"]
    assert [manifest["search"]["value"], recall["tuning"]] in [row[:2] for row in recall["sweep"]]
    assert all(row[2] > 0 for row in recall["sweep"])  # ms per query of each setting, for the flow's plot
    ondisk = index_type in ("ivf_flat", "ivf_pq")  # fast-scan lists cannot merge on disk: one index in RAM
    assert manifest["layout"] == ("ondisk" if ondisk else "single")
    files = ({"index.faiss", "uris.parquet", "truth.npz"} | ({"index.ivfdata"} if ondisk else set())
             | ({"rerank.npy"} if index_type == "ivf_pq_rerank" else set()))
    assert set(manifest["files"]) == files and {p.name for p in index_dir.iterdir()} == files | {"manifest.json"}
    assert manifest["bytes_per_vector"] == pytest.approx(manifest["bytes_on_disk"] / 6000, abs=0.01)
    assert manifest["build_seconds"]["total"] >= manifest["build_seconds"]["train"] >= 0
    assert manifest["reason"].startswith(f"index_type={index_type!r} forced")


def test_bytes_per_vector_rank_the_types(built: dict[str, Path]) -> None:
    size = {t: verify_index(d, checksums=False)["bytes_per_vector"] for t, d in built.items()}
    assert 136 <= size["flat"] < 137  # 32 float32 + an int64 id
    assert size["ivf_pq"] < size["ivf_flat"] / 4 < size["flat"] < size["hnsw"]
    assert size["hnsw_sq"] <= size["hnsw"] - 3 * 32 + 1  # 1 B per dimension instead of 4
    # a 4-bit code per dimension and an id in the lists, 2 B per dimension in the float16 store
    assert 16 + 8 + 64 <= size["ivf_pq_rerank"] < size["flat"]


def test_flat_equals_numpy_brute_force(built: dict[str, Path], toy_snapshot: EmbeddingSnapshot,
                                       toy_queries: np.ndarray) -> None:
    ids, scores = VectorIndex.load(built["flat"]).search(toy_queries, 10)
    check_ref_knn_with_draws(*brute_force(toy_snapshot, toy_queries, 10), scores, ids)


def test_ivf_at_every_list_is_exact_and_hnsw_at_large_ef_nearly(built: dict[str, Path], toy_snapshot: EmbeddingSnapshot,
                                                                toy_queries: np.ndarray) -> None:
    ref_scores, ref_ids = brute_force(toy_snapshot, toy_queries, 10)
    ivf = VectorIndex.load(built["ivf_flat"])
    set_search_param(ivf.index, "nprobe", ivf.manifest["params"]["nlist"], on_gpu=False)
    ids, scores = ivf.search(toy_queries, 10)
    check_ref_knn_with_draws(ref_scores, ref_ids, scores, ids)
    hnsw = VectorIndex.load(built["hnsw"])
    set_search_param(hnsw.index, "efSearch", 1024, on_gpu=False)
    found = hnsw.search(toy_queries, 10)[0]
    assert np.mean([len(set(a) & set(b)) for a, b in zip(found, ref_ids)]) / 10 >= 0.99


def test_reranked_ivf_at_every_list_is_exact_to_float16_also_over_an_hnsw_quantizer(
        built: dict[str, Path], toy_snapshot: EmbeddingSnapshot, toy_queries: np.ndarray, tmp_path: Path) -> None:
    ref_scores, ref_ids = brute_force(toy_snapshot, toy_queries, 10)
    graph_dir = build_index(toy_snapshot, unreferenced(toy_queries), tmp_path,
                            replace(TYPE_CONFIGS["ivf_pq_rerank"], coarse_hnsw_min_nlist=64))
    assert verify_index(graph_dir)["factory"] == "IVF128_HNSW32,PQ32x4fs"
    for index_dir in (built["ivf_pq_rerank"], graph_dir):
        index = VectorIndex.load(index_dir)
        assert index.manifest["recall"]["target_met"]
        # Every list probed and every vector a candidate: the float16 re-rank's order is the exact one.
        index.set_search("nprobe", index.manifest["params"]["nlist"], k_factor=600)
        ids, scores = index.search(toy_queries, 10)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-3)
        assert np.mean([len(set(a) & set(b)) for a, b in zip(ids, ref_ids)]) / 10 >= 0.99
    with pytest.raises(SearchError, match="has no re-rank to set k_factor=4"):
        VectorIndex.load(built["ivf_pq"]).set_search("nprobe", 2, k_factor=4)


def _resident_bytes(path: Path) -> int:
    """This process's resident bytes of its memory maps of `path` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split(" ", 1)[0]:  # a mapping's first line: "start-end perms ..."
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads Linux's /proc/self/smaps")
def test_the_float16_store_is_written_shard_by_shard_without_staying_resident(tmp_path: Path) -> None:
    """The store of a 10M x 512 catalog is 10 GB: its written pages must leave the build's memory as it goes."""
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(1, 100_001, dtype=np.int64) * 7919)
    vectors = rng.standard_normal((len(ids), 64)).astype(np.float32)
    path = tmp_path / "rerank.npy"
    writer = index_build.RowStoreWriter(path, np.sort(ids), 64, np.float16)
    try:
        for part in np.array_split(np.arange(len(ids)), 4):
            writer.write(ids[part], vectors[part])
            assert _resident_bytes(path) < 1 << 20, "the written rows stayed in this process's memory"
    finally:
        writer.close()
    stored = np.load(path, mmap_mode="r")
    assert stored.dtype == np.float16 and stored.shape == (len(ids), 64)
    np.testing.assert_array_equal(stored, vectors[np.argsort(ids)].astype(np.float16))


def test_unmerged_shards_search_like_the_merged_index(built: dict[str, Path], toy_snapshot: EmbeddingSnapshot,
                                                      toy_queries: np.ndarray, tmp_path: Path) -> None:
    sharded_dir = build_index(toy_snapshot, unreferenced(toy_queries), tmp_path,
                              replace(TYPE_CONFIGS["ivf_flat"], merge=False))
    manifest = verify_index(sharded_dir)
    assert manifest["layout"] == "shards" and manifest["counts"]["index_files"] == 3
    assert manifest["index_files"] == ["shard-00000.faiss", "shard-00001.faiss", "shard-00002.faiss"]
    merged = VectorIndex.load(built["ivf_flat"])
    # One trained quantizer: probing the same lists in every shard finds what the merged lists hold.
    assert manifest["search"] == merged.manifest["search"]
    (ids, scores), (sharded_ids, sharded_scores) = (merged.search(toy_queries, 10),
                                                    VectorIndex.load(sharded_dir).search(toy_queries, 10))
    check_ref_knn_with_draws(scores, ids, sharded_scores, sharded_ids)


def test_rerun_with_the_same_inputs_is_a_no_op(built: dict[str, Path], toy_snapshot: EmbeddingSnapshot,
                                               toy_queries: np.ndarray) -> None:
    index_dir, config = built["ivf_flat"], TYPE_CONFIGS["ivf_flat"]
    stamps = {p.name: p.stat().st_mtime_ns for p in index_dir.iterdir()}
    assert build_index(toy_snapshot, unreferenced(toy_queries), index_dir.parent.parent, config) == index_dir
    assert {p.name: p.stat().st_mtime_ns for p in index_dir.iterdir()} == stamps
    assert not [p for p in index_dir.parent.iterdir() if p.name.startswith(".")]  # no temp directory left
    # Where it runs is not part of the identity; what it indexes, how, and what tunes it are.
    queries = unreferenced(toy_queries)
    assert index_id(toy_snapshot, queries, replace(config, use_gpu="never")) == index_dir.name
    assert index_id(toy_snapshot, unreferenced(toy_queries[:-1]), config) != index_dir.name
    assert index_id(toy_snapshot, queries, replace(config, recall_target=0.9)) != index_dir.name
    # The references decide the split and what is left out: part of the identity too.
    assert index_id(toy_snapshot, Queries(toy_queries, ("a.png",) * 400), config) != index_dir.name



def test_a_planner_that_chooses_otherwise_makes_another_index(built: dict[str, Path], toy_snapshot: EmbeddingSnapshot,
                                                              toy_queries: np.ndarray,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The same configuration under a changed planner (a new default for pq_m: the 10M bench reused an index of
    the old codes) is another index, not the one built before."""
    index_dir, config = built["ivf_pq_rerank"], TYPE_CONFIGS["ivf_pq_rerank"]
    queries = unreferenced(toy_queries)
    assert index_id(toy_snapshot, queries, config) == index_dir.name
    planned = index_build.plan_index

    def other_codes(n: int, dim: int, cfg: IndexConfig, vector_store: bool = False) -> Any:
        return planned(n, dim, replace(cfg, pq_m=dim // 4), vector_store)

    monkeypatch.setattr(index_build, "plan_index", other_codes)
    assert index_id(toy_snapshot, queries, config) != index_dir.name


def test_damaged_existing_index_is_not_silently_reused(built: dict[str, Path], toy_snapshot: EmbeddingSnapshot,
                                                      toy_queries: np.ndarray, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(built["flat"], tmp_path / "toys" / built["flat"].name))
    with open(copy / "index.faiss", "r+b") as f:
        f.seek(-5, os.SEEK_END)
        f.write(b"\xff")
    with pytest.raises(IndexBuildError, match="exists but is damaged .*sha256.*; remove it to rebuild"):
        build_index(toy_snapshot, unreferenced(toy_queries), tmp_path, TYPE_CONFIGS["flat"])


def test_publish_replaces_current_atomically_and_loading_follows_it(built: dict[str, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = tmp_path / "toys"
    first = Path(shutil.copytree(built["flat"], catalog / built["flat"].name))
    second = Path(shutil.copytree(built["ivf_flat"], catalog / built["ivf_flat"].name))  # moved: ivfdata beside
    assert publish(first) == catalog / CURRENT
    assert (catalog / CURRENT).read_text() == first.name + "\n"
    assert VectorIndex.load(catalog).index_dir == first

    def crash(*args: object) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        publish(second)
    assert (catalog / CURRENT).read_text() == first.name + "\n"  # readers still see the old pointer, whole
    monkeypatch.undo()
    publish(second)
    loaded = VectorIndex.load(catalog)
    assert loaded.index_dir == second and loaded.manifest["type"] == "ivf_flat"
    assert sorted(p.name for p in catalog.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(IndexFormatError, match="no manifest.json"):
        publish(tmp_path / "not-an-index")


def test_bad_inputs_are_refused_before_any_work(toy_snapshot: EmbeddingSnapshot, toy_queries: np.ndarray,
                                                tmp_path: Path) -> None:
    with pytest.raises(IndexBuildError, match=r"queries must be \(Q, 32\) .* got \(400, 16\)"):
        build_index(toy_snapshot, unreferenced(toy_queries[:, :16]), tmp_path)
    with pytest.raises(IndexBuildError, match="at least 2 queries"):
        build_index(toy_snapshot, unreferenced(toy_queries[:1]), tmp_path)
    with pytest.raises(IndexBuildError, match=r"at least 2 reference images .* 400 queries of \['a.png'\]"):
        build_index(toy_snapshot, Queries(toy_queries, ("a.png",) * 400), tmp_path)
    with pytest.raises(IndexBuildError, match="unit vectors"):
        build_index(toy_snapshot, unreferenced(toy_queries * 2), tmp_path)
    empty = write_snapshot(tmp_path / "empty", np.zeros((0, 32), np.float32), rows_per_shard=10)
    with pytest.raises(IndexBuildError, match="holds no vectors"):
        build_index(empty, unreferenced(toy_queries), tmp_path)
    if gpu_count() == 0:
        with pytest.raises(FaissGpuUnavailableError, match="use_gpu='require' but faiss .* sees no GPU"):
            build_index(toy_snapshot, unreferenced(toy_queries), tmp_path, IndexConfig(use_gpu="require"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing half-built left behind


def test_failed_build_leaves_nothing(toy_snapshot: EmbeddingSnapshot, toy_queries: np.ndarray, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object) -> None:
        raise RuntimeError("simulated failure while tuning")

    monkeypatch.setattr(index_build, "tune_index", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        build_index(toy_snapshot, unreferenced(toy_queries), tmp_path, TYPE_CONFIGS["ivf_flat"])
    assert list((tmp_path / "toys").iterdir()) == []


def queries_on(run: EmbeddingSnapshot, rows: np.ndarray, per_reference: int, seed: int) -> Queries:
    """Stand-ins for composed queries made on catalog images: `per_reference` noisy copies of each row's vector
    (a composed query lies near its reference image), each naming that row's uri as its reference."""
    _, vectors, uris = run.read_all()
    base = np.repeat(vectors[rows], per_reference, axis=0)
    noise = np.random.default_rng(seed).standard_normal(base.shape) * 0.35 / np.sqrt(base.shape[1])
    return Queries(unit(base + noise), tuple(uris[int(r)] for r in np.repeat(rows, per_reference)))


def test_tuning_splits_by_reference_and_leaves_it_out_as_search_does(toy_snapshot: EmbeddingSnapshot, tmp_path: Path) -> None:
    rows = np.random.default_rng(1).choice(toy_snapshot.rows, 150, replace=False)
    queries = queries_on(toy_snapshot, rows, per_reference=2, seed=2)
    index_dir = build_index(toy_snapshot, queries, tmp_path, TYPE_CONFIGS["ivf_flat"])
    recall = verify_index(index_dir)["recall"]
    split = recall["split"]
    assert split["by"] == "reference image" and recall["reference_excluded"] == 300
    assert split["tuning"]["references"] + split["held_out"]["references"] == 150
    # A reference's two queries always land together: twice as many queries as references on each side.
    assert split["tuning"]["queries"] == 2 * split["tuning"]["references"]
    assert split["held_out"]["queries"] == 2 * split["held_out"]["references"]

    # The held-out recall, recomputed as a client searches: each query's reference left out of the results
    # (exclude_ids) and of the exact answer.
    ids, vectors, uris = toy_snapshot.read_all()
    reference_ids = catalog_ids(queries.references, ids, uris)
    np.testing.assert_array_equal(reference_ids, np.repeat(ids[rows], 2))
    _, held = split_by_reference(reference_groups(queries.references, reference_ids), 0.5, seed=0)
    index = VectorIndex.load(index_dir)  # the tuned nprobe applied
    exact = exact_knn(queries.vectors[held], [(ids, vectors)], 20, reference_ids[held])
    found = index.search(queries.vectors[held], 10, reference_ids[held])[0]
    assert recall["held_out"] == round(recall_at_k(found, exact, 10), 5)
    # Not leaving the reference out (what tuning did before) measures something else: the reference is every
    # query's easy first hit.
    exact_with = exact_knn(queries.vectors[held], [(ids, vectors)], 20)
    found_with = index.search(queries.vectors[held], 10)[0]
    assert (exact_with.ids[:, 0] == reference_ids[held]).mean() > 0.9
    assert recall_at_k(found_with, exact_with, 10) != pytest.approx(recall["held_out"], abs=1e-4)


def test_one_image_under_two_names_is_one_reference(tmp_path: Path) -> None:
    """Two spellings of one catalog file pass the count of reference strings, but the split groups by catalog
    id: a build whose queries all refer to one image is an IndexBuildError, not a crash in the split."""
    image = tmp_path / "img.png"
    image.write_bytes(b"x")
    os.symlink(image, tmp_path / "alias.png")
    vectors = unit(np.random.default_rng(0).standard_normal((50, 8)))
    uris = [str(image)] + [f"mem://toys/{i}.png" for i in range(1, 50)]
    run = write_snapshot(tmp_path / "run", vectors, rows_per_shard=50, uris=uris)
    references = (str(image), str(image), str(tmp_path / "alias.png"), str(tmp_path / "alias.png"))
    queries = Queries(unit(np.random.default_rng(1).standard_normal((4, 8))), references)
    with pytest.raises(IndexBuildError, match="one image under several names"):
        build_index(run, queries, tmp_path / "indexes", IndexConfig(index_type="flat"))

"""A version built as index shards by catalog id: the merged answer equals the single index's (exactly for Flat
shards), it validates, publishes and loads like any version, and a damaged shard is refused."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cirflow.indexing.embedding.shards import EmbeddingSnapshot, part_of
from cirflow.indexing.index.build import IndexBuildError
from cirflow.indexing.index.queries import Queries
from cirflow.indexing.index.sharded import build_sharded_index
from cirflow.indexing.index.validate import validate_index
from cirflow.indexing.index.versions import publish
from cirflow.indexing.search import ShardedIndex, VectorIndex, load_index
from cirflow.indexing.search.index_store import IndexFormatError, read_uris, verify_index
from tests.indexing.conftest import TYPE_CONFIGS, write_snapshot


@pytest.fixture(scope="module")
def sharded(toy_snapshot: EmbeddingSnapshot, toy_queries: np.ndarray, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded")
    queries = Queries.unreferenced(toy_queries)
    return {name: build_sharded_index(toy_snapshot, queries, root, TYPE_CONFIGS[name], shards=3)
            for name in ("flat", "ivf_pq_rerank")}


def test_flat_shards_answer_exactly_as_the_single_index(sharded: dict[str, Path], built: dict[str, Path],
                                                        toy_snapshot: EmbeddingSnapshot,
                                                        toy_queries: np.ndarray) -> None:
    whole, parts = VectorIndex.load(built["flat"]), load_index(sharded["flat"])
    assert isinstance(parts, ShardedIndex) and len(parts.shards) == 3 and parts.ntotal == whole.ntotal == 6000
    # Every catalog id in exactly one shard, the one its hash names.
    for part, shard in enumerate(parts.shards):
        assert (part_of(shard.entries.ids, 3) == part).all() and 1800 < shard.ntotal < 2200
    assert sum(shard.ntotal for shard in parts.shards) == 6000
    ids = read_uris(built["flat"])[0]
    exclude = [int(i) for i in ids[:len(toy_queries)]]
    allowed = np.random.default_rng(3).choice(ids, 700, replace=False)
    for kwargs in ({}, {"exclude_ids": exclude}, {"allow_ids": allowed}, {"allow_ids": allowed[:4]}):
        expected_ids, expected_scores = whole.search(toy_queries, 10, **kwargs)
        found_ids, found_scores = parts.search(toy_queries, 10, **kwargs)
        np.testing.assert_allclose(found_scores, expected_scores, atol=1e-6)
        assert (found_ids == expected_ids).mean() > 0.999  # equal scores may come in another order
    big_ids, _ = parts.search(toy_queries[:2], 10**9)
    assert big_ids.shape == (2, 6000) and (big_ids >= 0).all()
    (result,) = parts.results(*parts.search(toy_queries[:1], 3))
    assert result.uris == [f"mem://toys/{i}.png" for i in result.ids]


def test_approximate_shards_meet_the_target_merged_and_validate(sharded: dict[str, Path],
                                                               toy_snapshot: EmbeddingSnapshot,
                                                               toy_queries: np.ndarray) -> None:
    manifest = verify_index(sharded["ivf_pq_rerank"])
    assert manifest["layout"] == "sharded" and manifest["type"] == "ivf_pq_rerank"
    assert [s["dir"] for s in manifest["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    assert all(s["search"]["k_factor"] >= 1 for s in manifest["shards"])
    assert "shard-00001/rerank.npy" in manifest["files"] and "uris.parquet" in manifest["files"]
    recall = manifest["recall"]
    assert recall["target_met"] and recall["held_out"] >= TYPE_CONFIGS["ivf_pq_rerank"].recall_target - 0.03
    assert recall["split"]["held_out"]["queries"] == 200
    queries = Queries.unreferenced(toy_queries)
    result = validate_index(sharded["ivf_pq_rerank"], toy_snapshot, queries, 0.9)
    assert result.passed and result.recall == pytest.approx(recall["held_out"], abs=1e-4)
    # Same inputs: the same version, found, not built again.
    again = build_sharded_index(toy_snapshot, queries, sharded["ivf_pq_rerank"].parent.parent,
                                TYPE_CONFIGS["ivf_pq_rerank"], shards=3)
    assert again == sharded["ivf_pq_rerank"]


def test_a_sharded_version_publishes_loads_and_refuses_damage(sharded: dict[str, Path], toy_queries: np.ndarray,
                                                              tmp_path: Path) -> None:
    catalog = tmp_path / "toys"
    version = Path(shutil.copytree(sharded["flat"], catalog / sharded["flat"].name))
    publish(version)
    loaded = load_index(catalog)
    assert isinstance(loaded, ShardedIndex) and loaded.index_dir == version
    with pytest.raises(IndexFormatError, match="is a sharded version of 3 shards; load it with"):
        VectorIndex.load(version)
    faiss_file = version / "shard-00001" / "index.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:-8])
    with pytest.raises(IndexFormatError, match=r"file shard-00001/index\.faiss has \d+ bytes"):
        load_index(catalog, verify="size")


def test_ids_with_a_common_stride_spread_over_every_shard() -> None:
    for ids in (np.arange(1, 4001) * 1000, np.arange(4000) * 2 + 1, 10 * np.arange(4000) + 3):
        counts = np.bincount(part_of(ids, 4), minlength=4)
        assert counts.min() > 900, counts
    extremes = part_of(np.array([2**63 - 1, 0, -1, 12345]), 7)  # the whole int64 range, negatives included
    assert ((extremes >= 0) & (extremes < 7)).all()


def test_sharding_refuses_one_shard_and_empty_shards(toy_snapshot: EmbeddingSnapshot, toy_queries: np.ndarray,
                                                     tmp_path: Path) -> None:
    queries = Queries.unreferenced(toy_queries)
    with pytest.raises(IndexBuildError, match="at least 2 shards, got 1"):
        build_sharded_index(toy_snapshot, queries, tmp_path, TYPE_CONFIGS["flat"], shards=1)
    # More shards than vectors: some shard is empty.
    tiny = write_snapshot(tmp_path / "run", toy_queries[:3], rows_per_shard=3)
    with pytest.raises(IndexBuildError, match=r"shard \d of 5 holds no vectors \(3 in the catalog\)"):
        build_sharded_index(tiny, queries, tmp_path, replace(TYPE_CONFIGS["flat"]), shards=5)
    assert not any(tmp_path.rglob("*.faiss"))  # nothing half-built is left

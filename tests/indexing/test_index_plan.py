"""Index planning: the type chosen by catalog size and memory budget, its parameters, and the reason given."""

from __future__ import annotations

import pytest

from cirflow.core.config import ConfigError, from_dict
from cirflow.indexing.index.plan import IndexConfig, IndexConfigError, auto_nlist, plan_index, train_points

# (vectors, dim, memory budget MB) -> (type, parameters, phrases the reason must contain)
CASES = [
    ((10_000, 128, 4096), "flat", {}, ["10,000 vectors x 128 dims = 4.9 MB raw <= flat limit 16.0 MB"]),
    ((100_000, 128, 4096), "hnsw", {"hnsw_m": 32},
     ["48.8 MB raw > flat limit 16.0 MB", "~76.4 MB with the graph", "memory budget 4,096.0 MB"]),
    ((1_000_000, 128, 1024), "hnsw", {"hnsw_m": 32}, ["~763.7 MB with the graph", "memory budget 1,024.0 MB"]),
    ((1_000_000, 128, 600), "hnsw_sq", {"hnsw_m": 32},
     ["HNSW M=32 efConstruction=80 would need ~763.7 MB > memory budget 600.0 MB", "HNSW-SQ8", "~397.5 MB"]),
    ((3_000_000, 128, 100_000), "ivf_pq_rerank", {"nlist": 8192, "pq_m": 128, "pq_nbits": 4},
     ["3,000,000 > 2,000,000 vectors for HNSW", "m=128 x 4 bits = 64 B/code", "float16 vectors (256 B)"]),
    ((10_000_000, 512, 16_384), "ivf_pq_rerank", {"nlist": 16384, "pq_m": 512},
     ["19,531.2 MB raw", "~12,319.7 MB with the float16 store", "nlist=16384 (HNSW32 over the centroids)"]),
    ((3_000_000, 128, 600), "ivf_pq", {"nlist": 8192, "pq_m": 64, "pq_nbits": 8},
     ["re-ranked from float16 vectors (256 B) would need ~944.6 MB > memory budget 600.0 MB", "its codes cap"]),
    ((1_000_000, 128, 20), "ivf_pq", {"pq_m": 8}, ["m=8 x 8 bits = 8 B/code + 8 B id"]),
]


@pytest.mark.parametrize(("size", "index_type", "params", "phrases"), CASES,
                         ids=[f"{c[0][0]}x{c[0][1]}-{c[0][2]}MB" for c in CASES])
def test_plan_follows_size_and_budget(size: tuple[int, int, int], index_type: str, params: dict,
                                      phrases: list[str]) -> None:
    n, dim, budget = size
    plan = plan_index(n, dim, IndexConfig(memory_budget_mb=budget))
    assert plan.index_type == index_type
    assert params.items() <= plan.params.items()
    for phrase in phrases:
        assert phrase in plan.reason
    if index_type != "flat" or budget >= plan.estimated_bytes / 2**20:
        assert plan.estimated_bytes <= budget * 2**20
    assert not plan.warnings


def test_budget_too_small_for_any_index_is_an_error() -> None:
    with pytest.raises(IndexConfigError, match=r"even IVF-PQ .* needs ~10.6 MB, over memory_budget_mb=5; raise the budget, or build the catalog as several"):
        plan_index(1_000_000, 128, IndexConfig(memory_budget_mb=5))
    with pytest.raises(IndexConfigError, match="catalog is empty"):
        plan_index(0, 128, IndexConfig())


def test_a_re_rankers_vector_store_comes_out_of_the_budget_first() -> None:
    """An index kept for a re-ranking bundle holds its float32 vectors beside it (vectors.npy), read at random by
    every query's re-rank: at 4096 MB, 2M x 256 dims fit HNSW alone (~2.6 GB) but not beside the 2 GB store."""
    alone = plan_index(2_000_000, 256, IndexConfig(memory_budget_mb=4096))
    assert alone.index_type == "hnsw"
    beside = plan_index(2_000_000, 256, IndexConfig(memory_budget_mb=4096), vector_store=True)
    assert beside.index_type == "hnsw_sq"
    store = 2_000_000 * (256 * 4 + 8)
    assert beside.estimated_bytes + store <= 4096 * 2**20
    assert "the re-ranker's float32 vector store (~1,968.4 MB) leaves 2,127.6 MB of the budget" in beside.reason
    forced = plan_index(2_000_000, 256, IndexConfig(index_type="hnsw", memory_budget_mb=4096), vector_store=True)
    assert any("over the memory budget 2,127.6 MB" in w for w in forced.warnings)
    with pytest.raises(IndexConfigError, match=r"the re-ranker's float32 vector store alone needs ~1,968.4 MB, "
                                               r"over memory_budget_mb=1000; raise the budget, or build the catalog"):
        plan_index(2_000_000, 256, IndexConfig(memory_budget_mb=1000), vector_store=True)


def test_training_sample_grows_with_the_lists() -> None:
    assert train_points(50_000, IndexConfig()) == 50_000  # never more than the catalog
    assert train_points(1_000_000, IndexConfig()) == 39 * 4096  # 4 * sqrt(1M) = 4000 lists of 39 points
    assert train_points(10_000_000, IndexConfig()) == 39 * 16384
    assert train_points(10_000_000, IndexConfig(train_sample=200_000)) == 200_000
    assert plan_index(10_000_000, 128, IndexConfig(index_type="ivf_flat")).params["nlist"] == 16384


def test_nlist_is_a_power_of_two_with_39_training_points_per_list() -> None:
    assert auto_nlist(1_000_000, 1_000_000) == 4096  # 4 * sqrt(1M) = 4000
    assert auto_nlist(1_000_000, 100_000) == 2048  # 100k / 39 = 2564 allows no more
    assert auto_nlist(6000, 6000) == 128  # 4 * sqrt(6000) = 310 -> 256, but 6000 / 39 = 153
    assert auto_nlist(10, 10) == 1


def test_forced_type_is_recorded_and_small_samples_lower_pq_bits() -> None:
    plan = plan_index(3000, 32, IndexConfig(index_type="ivf_pq"))
    assert plan.index_type == "ivf_pq" and plan.factory == "IVF64,PQ16x6"
    assert plan.reason.startswith("index_type='ivf_pq' forced by the configuration; 3,000 vectors x 32 dims")
    assert plan.warnings == ("pq_nbits lowered from 8 to 6: 3,000 training vectors are too few for 256 "
                             "centroids per sub-quantizer",)
    tight = plan_index(3000, 32, IndexConfig(index_type="ivf_pq", memory_budget_mb=0.01))
    assert tight.params["pq_m"] == 1 and any("over the memory budget" in w for w in tight.warnings)
    assert plan_index(3000, 32, IndexConfig(index_type="hnsw")).search_param == "efSearch"
    assert plan_index(3000, 32, IndexConfig(index_type="flat")).search_param is None


def test_bad_options_name_the_valid_choices() -> None:
    with pytest.raises(IndexConfigError, match=r"index_type='ivf' is not one of \['auto', 'flat', 'hnsw'"):
        IndexConfig(index_type="ivf")
    with pytest.raises(IndexConfigError, match=r"use_gpu='sometimes' is not one of \['auto', 'never', 'require'\]"):
        IndexConfig(use_gpu="sometimes")
    with pytest.raises(IndexConfigError, match="recall_target must lie in"):
        IndexConfig(recall_target=1.5)
    with pytest.raises(IndexConfigError, match="pq_m=12 must divide the dimension 128"):
        plan_index(1_000_000, 128, IndexConfig(index_type="ivf_pq", pq_m=12))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['nprobe'\]; valid keys: .*'nlist'"):
        from_dict(IndexConfig, {"nprobe": 8})
    assert from_dict(IndexConfig, {"nlist": None, "index_type": "hnsw"}).nlist is None

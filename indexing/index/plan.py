"""Which FAISS index a catalog gets: the index configuration and a pure planning function.

`plan_index(n, dim, config)` turns the catalog size, the dimension and a memory budget into an index type, its
parameters and a sentence saying why, recorded in the index manifest. Every index uses the inner-product metric:
catalog and query vectors are unit length, so inner product is cosine, the evaluator's score.

The order of preference, by catalog size:
- Flat (exact) while one scan of the raw vectors is cheap: N*d*4 bytes per query batch, bounded by memory
  bandwidth; ~1 ms for 16 MB on one core here (32k vectors of 128 dims), so an approximate index would save
  little and cost exactness, training and tuning.
- HNSW while vectors + graph fit the budget and N is moderate: the best latency at high recall on CPU, but its
  build is a long sequential insertion and its random access does not suit memory-mapped files.
- HNSW-SQ while HNSW's graph fits with 8-bit scalar-quantised vectors (a quarter of float32): HNSW's latency
  at high dimensions where the raw vectors do not fit; the codes lose little recall, and tuning measures it.
- IVF-PQ + re-rank past HNSW's build limit or budget: 4-bit fast-scan PQ codes find k * k_factor candidates,
  re-scored exactly from float16 copies of the vectors memory-mapped beside the index (search/rerank.py); the
  float16 store (2 B/dim) is counted in the budget, since the re-rank reads it at random and must stay in the
  page cache to be fast. Fast build, no recall cap: tuning sets k_factor and nprobe together.
- IVF-PQ (8-bit codes, no re-rank) when not even that fits: its recall is capped by its codes.

An index kept for a re-ranking bundle (ARTEMIS) also holds its float32 catalog vectors (search/vector_store.py),
read at random by every query's re-rank: they come out of the budget first, and the choice above is made for the
rest.

IVF-Flat (exact distances inside the probed lists, on-disk merge, a GPU version) is never chosen by size: at
every size where it fits, the re-ranked IVF-PQ scans less memory per probed vector for the same recall and
needs less of it. Force it (index_type="ivf_flat") for GPU search: the re-ranked types run on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from cirflow.core.config import check_between, check_choice, check_positive
from cirflow.indexing.search.placement import USE_GPU

INDEX_TYPES = ("auto", "flat", "hnsw", "hnsw_sq", "ivf_flat", "ivf_pq", "ivf_pq_rerank")
RERANK_TYPES = ("ivf_pq_rerank",)  # types searched through a float16 re-rank (search/rerank.py)
MB = 1 << 20
ID_BYTES = 8  # every index stores an int64 catalog id per vector (IndexIDMap, or the IVF lists)
# faiss warns below 39 training points per centroid (k-means and PQ codebooks alike): too few to place them.
MIN_POINTS_PER_CENTROID = 39
# HNSW bytes per vector beyond the vector and id: level-0 links (2M int32) + upper levels (~M/(M-1) more) +
# levels and offsets; measured 2*M*4*1.05 + 12 against faiss 1.15 file sizes.
HNSW_LINK_OVERHEAD = 1.05
HNSW_NODE_BYTES = 12
COARSE_HNSW_M = 32  # links per centroid of an HNSW coarse quantizer (faiss's IVF<n>_HNSW32)
RERANK_BYTES_PER_DIM = 2  # the float16 store the re-rank reads
FAST_SCAN_BITS = 4  # faiss's fast-scan PQ (SIMD lookups in registers) has 4-bit codes only
# The fewest training points, even for a small nlist: PQ codebooks and the scalar quantizer's ranges learn from
# it too; the sample grows to MIN_POINTS_PER_CENTROID per list beyond (10M vectors: 16384 lists, 639k points).
MIN_TRAIN_SAMPLE = 100_000


class IndexConfigError(ValueError):
    """An index option has a bad value; the message names the option and the valid values."""


@dataclass(frozen=True)
class IndexConfig:
    index_type: str = "auto"  # or force one of INDEX_TYPES[1:] (benchmarks compare them at a fixed catalog)
    memory_budget_mb: float = 4096.0  # RAM the index may occupy when searched; decides HNSW / IVF-Flat / IVF-PQ
    flat_max_mb: float = 16.0  # exact scan up to this raw size: ~1 ms/query on one core (module docstring)
    hnsw_max_vectors: int = 2_000_000  # beyond this an HNSW build takes hours on a few cores; IVF builds faster
    recall_target: float = 0.95  # recall@k against exact search, measured with composed queries
    recall_k: int = 10
    tune_fraction: float = 0.5  # share of the queries that choose the setting; the rest measure it (held out)
    # Training points for IVF centroids, PQ codebooks and scalar-quantizer ranges (seeded sample); None: enough
    # for the auto nlist (>= 39 per list, at least MIN_TRAIN_SAMPLE). k-means cost grows with points x lists
    # (stack.md: IVF1024 on 200k x 256 takes over a minute here).
    train_sample: int | None = None
    hnsw_m: int = 32  # links per node: more raise recall at a given efSearch; the graph costs ~8*M B/vector
    hnsw_ef_construction: int = 80  # faiss's default is 40; a wider build search makes a better graph, slower
    nlist: int | None = None  # IVF lists; None: ~4*sqrt(N) as a power of two, >= 39 training points per list
    pq_m: int | None = None  # PQ sub-quantizers; None: ivf_pq the most that fit the budget, at most dim/2;
    # ivf_pq_rerank one per dimension (a 4-bit code each, dim/2 bytes: small beside the 2*dim of the float16
    # store). Coarser codes rank the candidates too poorly for a dense catalog: measured on 1M of the bench's
    # 128-d catalog at nprobe 64, recall@10 after the re-rank of 4*k candidates is 0.60 with dim/4 codes, 0.82
    # with dim/2, 0.98 with dim, and dim/4 needs 64*k candidates (0.25 ms of re-rank) to reach 0.97
    pq_nbits: int = 8  # bits per PQ code; lowered when the training sample is too small for 2**nbits centroids
    # From this many IVF lists on, the coarse quantizer is an HNSW graph over the centroids instead of a scan of
    # them: 16384 centroids of 512 dims are 8M multiply-adds per query (~1.5 ms on one core here) and per added
    # vector (an hour of adding for 10M); the graph finds the nearest lists in a few hundred.
    coarse_hnsw_min_nlist: int = 8192
    merge: bool = True  # one index (IVF: merged on disk, memory-mapped); False: one FAISS file per shard
    use_gpu: str = "auto"  # "auto": GPU when faiss sees one; "never"; "require": fail without a GPU
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice(self.index_type, "index_type", INDEX_TYPES, error=IndexConfigError)
        check_choice(self.use_gpu, "use_gpu", USE_GPU, error=IndexConfigError)
        check_between(self, 0, 1, "recall_target", exclude_low=True, error=IndexConfigError)
        check_between(self, 0, 1, "tune_fraction", exclude_low=True, exclude_high=True, error=IndexConfigError)
        check_between(self, 1, 16, "pq_nbits", error=IndexConfigError)
        check_positive(self, "memory_budget_mb", "flat_max_mb", "hnsw_max_vectors", "recall_k", "train_sample",
                       "hnsw_m", "hnsw_ef_construction", "nlist", "pq_m", "coarse_hnsw_min_nlist",
                       error=IndexConfigError)


@dataclass(frozen=True)
class IndexPlan:
    index_type: str  # one of INDEX_TYPES[1:]
    factory: str  # faiss.index_factory string, built with the inner-product metric
    params: dict[str, Any]  # the chosen numbers (nlist, pq_m, pq_nbits, hnsw_m, ...)
    search_param: str | None  # what tuning sweeps: "nprobe", "efSearch", or None (exact)
    estimated_bytes: int  # index size in memory, ids included
    train_points: int  # how many catalog vectors training samples (0: no training)
    reason: str
    warnings: tuple[str, ...] = field(default=())


def plan_index(n: int, dim: int, config: IndexConfig, vector_store: bool = False) -> IndexPlan:
    """The index for `n` vectors of `dim` dimensions under `config` (forced type, or chosen by size and budget).

    vector_store: the index keeps its catalog vectors beside it for a bundle's re-ranker (search/vector_store.py;
    the snapshot's bundle re-ranks). The re-rank reads the rows of its candidates at random on every query, so
    like the float16 store of ivf_pq_rerank they must stay in the page cache: they come out of the budget first,
    and the index gets what is left."""
    if n <= 0:
        raise IndexConfigError(f"cannot plan an index for {n} vectors; the catalog is empty")
    if dim <= 0:
        raise IndexConfigError(f"dimension must be positive, got {dim}")
    raw = n * dim * 4
    size = f"{n:,} vectors x {dim} dims = {_mb(raw)} raw"
    budget = config.memory_budget_mb * MB
    if vector_store:
        stored = n * (dim * 4 + ID_BYTES)
        if stored >= budget:
            raise IndexConfigError(f"{size}: the re-ranker's float32 vector store alone needs ~{_mb(stored)}, over "
                                   f"memory_budget_mb={config.memory_budget_mb}; raise the budget, or build the "
                                   f"catalog as several index shards (one per machine)")
        budget -= stored
        size += f"; the re-ranker's float32 vector store (~{_mb(stored)}) leaves {_mb(budget)} of the budget"
    if config.index_type != "auto":
        plan = _build_plan(config.index_type, n, dim, config, budget)
        reason = f"index_type={config.index_type!r} forced by the configuration; {size}; {plan.reason}"
        warnings = plan.warnings
        if plan.estimated_bytes > budget:
            warnings += (f"the forced {config.index_type} index needs ~{_mb(plan.estimated_bytes)}, over the "
                         f"memory budget {_mb(budget)}",)
        return replace(plan, reason=reason, warnings=warnings)

    if raw <= config.flat_max_mb * MB and raw + n * ID_BYTES <= budget:
        plan = _build_plan("flat", n, dim, config, budget)
        return replace(plan, reason=f"{size} <= flat limit {_mb(config.flat_max_mb * MB)}: an exact scan "
                                    f"(~1 ms/query per 16 MB) needs no training or tuning and is exact")
    why_not = [f"{size} > flat limit {_mb(config.flat_max_mb * MB)}" if raw > config.flat_max_mb * MB
               else f"{size} + ids > memory budget {_mb(budget)}"]
    if n <= config.hnsw_max_vectors:
        for kind in ("hnsw", "hnsw_sq"):
            plan = _build_plan(kind, n, dim, config, budget)
            if plan.estimated_bytes <= budget:
                return replace(plan, reason=f"{'; '.join(why_not)}; {plan.reason}, ~{_mb(plan.estimated_bytes)} "
                                            f"with the graph, fits the memory budget {_mb(budget)} and {n:,} <= "
                                            f"{config.hnsw_max_vectors:,} vectors: best latency at high recall on "
                                            f"CPU")
            why_not.append(f"{plan.reason} would need ~{_mb(plan.estimated_bytes)} > memory budget {_mb(budget)}")
    else:
        why_not.append(f"{n:,} > {config.hnsw_max_vectors:,} vectors for HNSW (a long sequential build)")
    rerank = _build_plan("ivf_pq_rerank", n, dim, config, budget)
    if rerank.estimated_bytes <= budget:
        return replace(rerank, reason=f"{'; '.join(why_not)}; {rerank.reason}, ~{_mb(rerank.estimated_bytes)} "
                                      f"with the float16 store, fits the memory budget {_mb(budget)}: a fast "
                                      f"build and exact scores for the candidates")
    why_not.append(f"{rerank.reason} would need ~{_mb(rerank.estimated_bytes)} > memory budget {_mb(budget)}")
    ivf_pq = _build_plan("ivf_pq", n, dim, config, budget)
    if ivf_pq.estimated_bytes > budget:
        raise IndexConfigError(f"{size}: even IVF-PQ ({ivf_pq.reason}) needs ~{_mb(ivf_pq.estimated_bytes)}, "
                               f"over memory_budget_mb={config.memory_budget_mb}; raise the budget, or build "
                               f"the catalog as several index shards (one per machine)")
    return replace(ivf_pq, reason=f"{'; '.join(why_not)}: {ivf_pq.reason}, ~{_mb(ivf_pq.estimated_bytes)} (its "
                                  f"codes cap its recall)")


def auto_nlist(n: int, train_points: int) -> int:
    """~4*sqrt(n) rounded to a power of two, lowered until every list has >= 39 training points."""
    nlist = 1 << max(0, round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    while nlist > 1 and train_points < MIN_POINTS_PER_CENTROID * nlist:
        nlist //= 2
    return nlist


def train_points(n: int, config: IndexConfig) -> int:
    """Catalog vectors sampled to train centroids, codebooks or quantizer ranges: config.train_sample, or enough
    for the auto nlist (MIN_POINTS_PER_CENTROID per list, at least MIN_TRAIN_SAMPLE); never more than n."""
    if config.train_sample is not None:
        return min(n, config.train_sample)
    return min(n, max(MIN_TRAIN_SAMPLE, MIN_POINTS_PER_CENTROID * auto_nlist(n, n)))


def _build_plan(index_type: str, n: int, dim: int, config: IndexConfig, budget: float) -> IndexPlan:
    """Parameters, factory string and size of one index type; `reason` describes the parameters only. `budget`:
    the bytes the index may take (ivf_pq's automatic pq_m fits its codes into it)."""
    if index_type == "flat":
        return IndexPlan("flat", "IDMap,Flat", {}, None, n * (dim * 4 + ID_BYTES), 0, "Flat (exact)")
    m = config.hnsw_m
    links = ID_BYTES + 2 * m * 4 * HNSW_LINK_OVERHEAD + HNSW_NODE_BYTES
    hnsw_params = {"hnsw_m": m, "ef_construction": config.hnsw_ef_construction}
    if index_type == "hnsw":
        return IndexPlan("hnsw", f"IDMap,HNSW{m},Flat", hnsw_params, "efSearch", int(n * (dim * 4 + links)), 0,
                         f"HNSW M={m} efConstruction={config.hnsw_ef_construction}")
    if index_type == "hnsw_sq":
        return IndexPlan("hnsw_sq", f"IDMap,HNSW{m},SQ8", hnsw_params, "efSearch", int(n * (dim + links)),
                         min(n, MIN_TRAIN_SAMPLE), f"HNSW-SQ8 M={m} efConstruction={config.hnsw_ef_construction}")

    points = train_points(n, config)
    warnings: tuple[str, ...] = ()
    nlist = config.nlist if config.nlist is not None else auto_nlist(n, points)
    if nlist > points:
        raise IndexConfigError(f"nlist={nlist} needs at least {nlist} training vectors, the catalog gives "
                               f"{points}; lower nlist or leave it None (auto)")
    if points < MIN_POINTS_PER_CENTROID * nlist:
        warnings += (f"nlist={nlist} has {points / nlist:.0f} training points per list (< "
                     f"{MIN_POINTS_PER_CENTROID}); centroids will be poorly placed",)
    centroids = nlist * dim * 4
    ivf, lists = f"IVF{nlist}", f"nlist={nlist}"
    if nlist >= config.coarse_hnsw_min_nlist:
        ivf, lists = f"{ivf}_HNSW{COARSE_HNSW_M}", f"{lists} (HNSW{COARSE_HNSW_M} over the centroids)"
        centroids += int(nlist * (2 * COARSE_HNSW_M * 4 * HNSW_LINK_OVERHEAD + HNSW_NODE_BYTES))
    if index_type == "ivf_flat":
        params = {"nlist": nlist}
        return IndexPlan("ivf_flat", f"{ivf},Flat", params, "nprobe", n * (dim * 4 + ID_BYTES) + centroids,
                         points, f"IVF-Flat {lists}", warnings)
    if index_type == "ivf_pq_rerank":
        m = config.pq_m if config.pq_m is not None else dim
        if dim % m:
            raise IndexConfigError(f"pq_m={m} must divide the dimension {dim}")
        code_bytes = math.ceil(m * FAST_SCAN_BITS / 8)
        params = {"nlist": nlist, "pq_m": m, "pq_nbits": FAST_SCAN_BITS}
        per_vector = code_bytes + ID_BYTES + RERANK_BYTES_PER_DIM * dim
        return IndexPlan("ivf_pq_rerank", f"{ivf},PQ{m}x{FAST_SCAN_BITS}fs", params, "nprobe",
                         n * per_vector + centroids, points,
                         f"IVF-PQ fast-scan {lists}, m={m} x {FAST_SCAN_BITS} bits = {code_bytes} B/code + "
                         f"{ID_BYTES} B id, re-ranked from float16 vectors ({RERANK_BYTES_PER_DIM * dim} B)",
                         warnings)
    if index_type != "ivf_pq":
        raise IndexConfigError(f"index type {index_type!r} is not one of {list(INDEX_TYPES[1:])}")

    # Each sub-quantizer needs 2**nbits centroids with >= 39 training points each.
    nbits = min(config.pq_nbits, max(1, int(math.log2(points / MIN_POINTS_PER_CENTROID))))
    if nbits < config.pq_nbits:
        warnings += (f"pq_nbits lowered from {config.pq_nbits} to {nbits}: {points:,} training vectors are "
                     f"too few for {2 ** config.pq_nbits} centroids per sub-quantizer",)
    m = config.pq_m if config.pq_m is not None else _auto_pq_m(n, dim, nbits, budget - centroids)
    if dim % m:
        raise IndexConfigError(f"pq_m={m} must divide the dimension {dim}")
    code_bytes = math.ceil(m * nbits / 8)
    params = {"nlist": nlist, "pq_m": m, "pq_nbits": nbits}
    return IndexPlan("ivf_pq", f"{ivf},PQ{m}x{nbits}", params, "nprobe",
                     n * (code_bytes + ID_BYTES) + centroids, points,
                     f"IVF-PQ {lists}, m={m} x {nbits} bits = {code_bytes} B/code + {ID_BYTES} B id", warnings)


def _auto_pq_m(n: int, dim: int, nbits: int, budget: float) -> int:
    """The most sub-quantizers (a divisor of dim, at most dim/2) whose codes + ids fit `budget`; else the fewest.
    More sub-quantizers = finer codes = higher recall; one dimension per sub-quantizer is a scalar quantizer."""
    choices = [m for m in range(max(1, dim // 2), 0, -1) if dim % m == 0]
    for m in choices:
        if n * (math.ceil(m * nbits / 8) + ID_BYTES) <= budget:
            return m
    return choices[-1]


def _mb(nbytes: float) -> str:
    return f"{nbytes / MB:,.1f} MB"

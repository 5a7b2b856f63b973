"""Recall of an approximate index against exact search, and the smallest search setting that meets a target.

Functions take arrays, iterators and search callables; the caller owns I/O and the index. The queries must be
real composed query vectors (encoded through the bundle, or logged in production): catalog vectors as queries
find themselves at rank 1, and random Gaussians have no neighbours, so either would tune to the wrong setting.

Recall is measured the way search answers: where a query's reference image is in the catalog, its catalog id
is left out of the exact top-k and of the index's results alike (VectorIndex.search's `exclude_ids`), and the
queries are split into tuning and held-out sides by reference image, so that no held-out query shares its
reference (and so most of its vector) with a query that chose the setting.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from cirflow.core.files import write_atomic
from cirflow.indexing.search import topk
from cirflow.indexing.search.topk import drop_excluded

log = logging.getLogger(__name__)

# Scores within this of the k-th exact score count as ties: float32 dot products of unit vectors computed by
# different kernels (BLAS vs faiss's SIMD loops, CPU vs GPU) differ by ~1e-7.
TIE_TOLERANCE = 1e-5
# The exact top list is computed this much deeper than k, so that ties across position k are seen.
TRUTH_DEPTH = 2
# Below this many held-out queries the measured recall moves by more than a point between runs.
FEW_QUERIES = 100
# The sweep gives up on a target once this many successive settings (each about doubling the search cost)
# together gained less than PLATEAU: IVF-PQ's recall is capped by its codes, and scanning every list of a large
# catalog for every tuning query would cost minutes to learn nothing.
PATIENCE, PLATEAU = 2, 1e-3

# How a setting passes: in the index id, so that indexes tuned by an earlier rule are tuned again.
PASS_RULE = "tuning recall - 1 standard error >= target"
# search(queries (Q, D), exclude_ids (Q,), k, setting) -> ids (Q, <= k) of the k best catalog ids per query, each
# row without its excluded id (-1: none), as VectorIndex.search answers; setting None: the index has none
SearchFn = Callable[[np.ndarray, np.ndarray, int, int | None], np.ndarray]


@dataclass(frozen=True)
class GroundTruth:
    scores: np.ndarray  # (Q, K) float32 inner products, best first; -inf where the catalog has fewer than K
    ids: np.ndarray  # (Q, K) int64 catalog ids; -1 where the catalog has fewer than K
    excluded: np.ndarray | None = None  # (Q,) catalog id left out of each row (-1: none); None: nothing left out

    def take(self, rows: np.ndarray) -> GroundTruth:
        return GroundTruth(self.scores[rows], self.ids[rows], None if self.excluded is None else self.excluded[rows])

    def exclude_ids(self) -> np.ndarray:
        """(Q,) the id each row leaves out, -1 for none: what the index's search must leave out too."""
        return np.full(len(self.ids), -1, np.int64) if self.excluded is None else self.excluded


@dataclass(frozen=True)
class TuningResult:
    param: str | None  # "nprobe", "efSearch", or None for an exact index
    value: int | None  # the chosen setting
    recall: float  # recall@k at `value` on the held-out queries
    tuning_recall: float  # recall@k at `value` on the queries that chose it
    target: float
    target_met: bool  # some setting reached the target on the tuning queries
    k: int
    queries_tuning: int
    queries_held_out: int
    references_tuning: int  # distinct reference images (split groups) on each side
    references_held_out: int
    # (setting, recall on the tuning queries, ms per query of that batch search), in sweep order
    sweep: tuple[tuple[int | None, float, float], ...]


def exact_knn(queries: np.ndarray, batches: Iterable[tuple[np.ndarray, np.ndarray]], k: int,
              exclude_ids: np.ndarray | None = None) -> GroundTruth:
    """Exact top-k by inner product over `batches` of (ids, vectors), streamed: only one batch in memory.
    exclude_ids: (Q,) a catalog id to leave out of each query's top-k (-1: none), as search leaves it out."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    exclude = None if exclude_ids is None else np.asarray(exclude_ids, dtype=np.int64)
    if exclude is not None and exclude.shape != (len(queries),):
        raise ValueError(f"exclude_ids must hold one id per query ({len(queries)}), got shape {exclude.shape}")
    depth = k + 1 if exclude is not None and bool((exclude >= 0).any()) else k  # one more to drop one
    scores, ids = topk.exact(queries, batches, depth)
    if depth > k:
        ids, scores = drop_excluded(ids, scores, exclude, k)
    missing = ids < 0  # fewer than k vectors in the whole catalog (besides the excluded one)
    return GroundTruth(np.where(missing, -np.inf, scores).astype(np.float32), ids, exclude)


def save_truth(path: Path, truth: GroundTruth) -> None:
    """The exact top lists beside an index (index/build.py), for validation and the next refresh to start from."""
    excluded = truth.exclude_ids()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temp name
            np.savez(f, ids=truth.ids, scores=truth.scores, excluded=excluded)

    write_atomic(path, write)


def load_truth(path: Path) -> GroundTruth:
    with np.load(path) as data:
        excluded = data["excluded"]
        return GroundTruth(data["scores"], data["ids"], excluded if (excluded >= 0).any() else None)


def refresh_truth(old: GroundTruth, queries: np.ndarray, gone: np.ndarray, new_ids: np.ndarray,
                  new_vectors: np.ndarray, exclude_ids: np.ndarray, catalog: Callable[[], Iterable[tuple[
                      np.ndarray, np.ndarray]]]) -> GroundTruth:
    """The exact top lists of a changed catalog from those of the catalog before, as exact as computing them
    anew: `gone` are the ids whose old vectors left (removed or changed), (`new_ids`, `new_vectors`) the vectors
    that came (added or changed). A row that held none of `gone` and excludes the same id is the merge of its old
    list with the new vectors' best; any other row is computed again over `catalog()` (every vector)."""
    depth = old.ids.shape[1]
    exclude = np.asarray(exclude_ids, dtype=np.int64)
    fresh = exact_knn(queries, [(new_ids, new_vectors)], depth, exclude)
    scores, ids = topk.merge([(old.scores, old.ids), (fresh.scores, fresh.ids)], len(queries), depth)
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)  # GroundTruth's missing slots
    stale = np.isin(old.ids, gone).any(axis=1) | (old.exclude_ids() != exclude)
    if stale.any():
        redone = exact_knn(queries[stale], catalog(), depth, exclude[stale])
        scores[stale], ids[stale] = redone.scores, redone.ids
    log.info("ground truth refreshed: %d of %d rows merged with %d new vectors, %d computed again", int((~stale).sum()),
             len(stale), len(new_ids), int(stale.sum()))
    return GroundTruth(scores, ids, exclude if (exclude >= 0).any() else None)


def recall_at_k(found: np.ndarray, truth: GroundTruth, k: int, tol: float = TIE_TOLERANCE) -> float:
    """Mean share of the exact top-k in `found[:, :k]` (k-recall@k), tie-tolerant: a found id whose exact score
    equals the k-th best within `tol` counts as a hit, as faiss.contrib.evaluation compares kNN results."""
    return float(np.mean(recall_per_query(found, truth, k, tol)))


def recall_per_query(found: np.ndarray, truth: GroundTruth, k: int, tol: float = TIE_TOLERANCE) -> np.ndarray:
    """(Q,) each query's share of its exact top-k found (recall_at_k's terms)."""
    if truth.ids.shape[1] < k:
        raise ValueError(f"the ground truth holds {truth.ids.shape[1]} neighbours per query, fewer than k={k}")
    if found.shape[0] != truth.ids.shape[0]:
        raise ValueError(f"found has {found.shape[0]} rows, the ground truth {truth.ids.shape[0]}")
    found = found[:, :k]
    kth = truth.scores[:, k - 1:k]  # (Q, 1)
    # Every exact neighbour scoring at least the k-th (minus tol) is an acceptable answer.
    acceptable = np.where(truth.scores >= kth - tol, truth.ids, -1)  # (Q, K)
    hits = (found[:, :, None] == acceptable[:, None, :]) & (found[:, :, None] >= 0)  # (Q, k, K)
    # Rows of a catalog with fewer than k vectors are judged on what exists.
    wanted = np.minimum(k, (truth.ids[:, :k] >= 0).sum(axis=1))
    return np.minimum(hits.any(axis=2).sum(axis=1), wanted) / np.maximum(wanted, 1)


def split_by_reference(groups: np.ndarray, tune_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of query rows into (tuning, held-out), sorted, every group (the queries of one reference
    image) whole on one side. Groups are taken in seeded order until the tuning side holds the share of the
    queries nearest `tune_fraction`; each side gets at least one group."""
    groups = np.asarray(groups)
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if len(counts) < 2:
        raise ValueError(f"tuning needs queries of at least 2 reference images (one side chooses a setting, the "
                         f"other measures it), got {len(groups)} queries of {len(counts)}")
    order = np.random.default_rng(seed).permutation(len(counts))
    tuning_sizes = np.cumsum(counts[order])[:-1]  # queries on the tuning side when it takes 1, 2, ... groups
    cut = int(np.argmin(np.abs(tuning_sizes - tune_fraction * len(groups)))) + 1
    tuning = np.isin(inverse, order[:cut])
    return np.flatnonzero(tuning), np.flatnonzero(~tuning)


def tune_setting(search: SearchFn, param: str | None, candidates: Sequence[int], queries: np.ndarray,
                 truth: GroundTruth, groups: np.ndarray, k: int, target: float, tune_fraction: float = 0.5,
                 seed: int = 0) -> TuningResult:
    """The smallest of `candidates` (ascending; cost grows with them) whose recall@k on the tuning queries meets
    `target` by one standard error (the mean's, over the tuning queries): the first setting that meets it
    exactly is as likely to fall under it on other queries as not (measured at 10M: 0.9536 tuning, 0.9459 held
    out), and the target is what search should hold. Returns it with its recall on the held-out queries. When none meets it (or recall stops rising first), the
    best setting is kept and a warning says the target was missed. `param=None` (exact index): one measurement.

    groups: (Q,) the reference image of each query (any labels; a query without one gets a label of its own):
    split_by_reference keeps each whole. The index is searched leaving out what `truth` left out."""
    if len(groups) != len(queries):
        raise ValueError(f"groups has {len(groups)} labels for {len(queries)} queries")
    tune_rows, held_rows = split_by_reference(groups, tune_fraction, seed)
    tune_truth = truth.take(tune_rows)
    tune_queries, tune_exclude = queries[tune_rows], tune_truth.exclude_ids()
    settings: list[int | None] = list(candidates) if param is not None else [None]
    if not settings:
        raise ValueError(f"no candidate values to tune {param}")
    sweep: list[tuple[int | None, float, float]] = []
    margins: dict[int | None, float] = {}  # setting -> standard error of its tuning recall

    def measure(value: int | None) -> tuple[int | None, float, float]:
        started = time.perf_counter()
        found = search(tune_queries, tune_exclude, k, value)
        ms = (time.perf_counter() - started) * 1000 / len(tune_rows)
        recalls = recall_per_query(found, tune_truth, k)
        margins[value] = float(np.std(recalls) / np.sqrt(len(recalls)))
        return value, float(np.mean(recalls)), ms

    def meets(entry: tuple[int | None, float, float]) -> bool:
        return entry[1] - margins[entry[0]] >= target

    for value in settings:
        sweep.append(measure(value))
        recall = sweep[-1][1]
        log.debug("%s=%s: recall@%d %.4f (standard error %.4f) on %d tuning queries", param, value, k, recall,
                  margins[value], len(tune_rows))
        if meets(sweep[-1]):
            break
        if len(sweep) > PATIENCE and recall - sweep[-1 - PATIENCE][1] < PLATEAU:
            log.info("%s sweep stopped at %s=%s: recall@%d %.4f has stopped rising", param, param, value, k, recall)
            break
    met = meets(sweep[-1])
    value, tuning_recall, _ = sweep[-1] if met else max(sweep, key=lambda s: s[1])  # first best: the cheapest
    if met and len(sweep) > 1:
        # Settings double, and so does the search cost: the midpoint below the first passing setting often
        # passes too, for up to a third less latency.
        below = sweep[-2][0]
        assert below is not None and value is not None  # several settings: a parameter is being swept
        mid = (below + value) // 2
        if below < mid < value:
            sweep.append(measure(mid))
            if meets(sweep[-1]):
                value, tuning_recall = mid, sweep[-1][1]
    held_truth = truth.take(held_rows)
    held = recall_at_k(search(queries[held_rows], held_truth.exclude_ids(), k, value), held_truth, k)
    if not met:
        log.warning("TARGET NOT MET: recall@%d target %.3f is out of reach; best %s=%s gives %.4f on the tuning "
                    "queries, %.4f held out (sweep: %s)", k, target, param, value, tuning_recall, held,
                    [(v, round(r, 4)) for v, r, _ in sweep])
    elif held < target:
        log.warning("%s=%s met recall@%d >= %.3f on %d tuning queries but gives %.4f on %d held-out queries "
                    "(sampling noise; more queries measure it better)", param, value, k, target, len(tune_rows),
                    held, len(held_rows))
    if len(held_rows) < FEW_QUERIES:
        log.warning("recall measured on %d held-out queries only; expect it to move by a point or more",
                    len(held_rows))
    references = [len(np.unique(np.asarray(groups)[rows])) for rows in (tune_rows, held_rows)]
    return TuningResult(param, value, held, tuning_recall, target, met, k, len(tune_rows), len(held_rows),
                        *references, tuple(sweep))


def nprobe_candidates(nlist: int, limit: int | None = None) -> list[int]:
    """1, 2, 4, ... up to nlist (nprobe = nlist scans every list: exact up to PQ coding), capped at `limit`."""
    top = min(nlist, limit) if limit else nlist
    values = [1 << i for i in range(top.bit_length()) if 1 << i < top]
    return values + [top]


def ef_search_candidates(k: int, ntotal: int) -> list[int]:
    """16, 32, ... (at least k: HNSW keeps efSearch >= k anyway) until the search list covers the catalog."""
    values, ef = [], max(16, k)
    while True:
        values.append(ef)
        if ef >= ntotal or ef >= 4096:
            return values
        ef *= 2

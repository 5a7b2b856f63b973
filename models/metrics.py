"""Retrieval metrics of the CIRR and FashionIQ protocols, on score matrices.

Every function takes `scores` (Q, G): one row per query of the split (in order), one column per gallery image
(in the order of `gallery_names`), higher = better. One tie rule everywhere: equal scores rank by gallery
order, lower index first, as a stable sort by descending score would. Metrics are fractions in [0, 1].
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from cirflow.models.data.types import CIRSplit

logger = logging.getLogger(__name__)

CIRR_RECALL_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
FASHIONIQ_RECALL_KS = (10, 50)
# Test-server format (CIRR's submission guide): top-50 of the gallery, top-3 of the subset.
SUBMISSION_TOPK = 50
SUBMISSION_SUBSET_TOPK = 3
# img_set.members holds 6 images: the reference and 5 candidates for Recall_subset.
CIRR_SUBSET_OTHERS = 5
# Rows per chunk are chosen so a chunk holds about this many scores: bounds the temporaries for large G.
_CHUNK_ELEMENTS = 1 << 22


def rank_gallery(scores: np.ndarray, exclude: np.ndarray | None, k: int) -> np.ndarray:
    """Top-k gallery indices per query (Q, k), best first; `exclude[q]` (-1 = none) is never returned."""
    scores = _check_scores(scores)
    num_queries, gallery = scores.shape
    skip = _check_exclude(exclude, num_queries, gallery)
    excluding = bool((skip >= 0).any())
    available = gallery - 1 if excluding else gallery
    if not 0 <= k <= available:
        raise ValueError(f"k must be in [0, {available}] for a gallery of {gallery} (minus the excluded), got {k}")
    out = np.empty((num_queries, k), dtype=np.int64)
    if k == 0:
        return out
    # Take one extra when excluding: dropping one item from a ranking keeps the order of the rest.
    kk = k + 1 if excluding else k
    for start, stop in _chunks(num_queries, gallery):
        top = _top_stable(scores[start:stop], kk)
        if excluding:
            hit = top == skip[start:stop, None]  # (C, kk), at most one True per row
            keep = np.argsort(hit, axis=1, kind="stable")[:, :k]  # non-excluded first, in rank order
            top = np.take_along_axis(top, keep, axis=1)
        out[start:stop] = top
    return out


def target_ranks(scores: np.ndarray, target_idx: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """0-based rank (Q,) of each target: the non-excluded items that beat it (higher, or equal and earlier)."""
    scores = _check_scores(scores)
    num_queries, gallery = scores.shape
    target_idx = _check_index(target_idx, num_queries, gallery, "target_idx", low=0)
    skip = _check_exclude(exclude, num_queries, gallery)
    if bool((skip == target_idx).any()):
        bad = int(np.flatnonzero(skip == target_idx)[0])
        raise ValueError(f"query {bad}: the target is the excluded item, so it can never be retrieved")
    ranks = np.empty(num_queries, dtype=np.int64)
    columns = np.arange(gallery)
    for start, stop in _chunks(num_queries, gallery):
        block = scores[start:stop]  # (C, G)
        rows = np.arange(stop - start)
        t = target_idx[start:stop]
        t_score = block[rows, t][:, None]  # (C, 1)
        beats = (block > t_score) | ((block == t_score) & (columns < t[:, None]))  # (C, G)
        e = skip[start:stop]
        has = e >= 0
        beats[rows[has], e[has]] = False
        ranks[start:stop] = beats.sum(axis=1)
    return ranks


def cirr_metrics(scores: np.ndarray, split: CIRSplit, gallery_names: list[str]) -> dict[str, float]:
    """R@1/5/10/50 over the gallery, Rsubset@1/2/3 over img_set.members minus the reference, and Avg."""
    scores = _check_scores(scores)
    _check_split(scores, split, gallery_names, needs_targets=True)
    index = _name_index(gallery_names)
    reference = _indices(index, [q.reference for q in split.queries], "reference")
    target = _indices(index, [q.target for q in split.queries], "target")  # type: ignore[misc]
    exclude = reference if split.remove_reference else None
    ranks = target_ranks(scores, target, exclude)
    metrics = {f"R@{k}": float(np.mean(ranks < k)) for k in CIRR_RECALL_KS}

    subset = _subset_indices(split, index)  # (Q, 5) gallery indices, reference removed
    sub_scores = np.take_along_axis(scores, subset, axis=1)  # (Q, 5)
    is_target = subset == target[:, None]  # exactly one True per row: members are distinct
    if not bool(is_target.any(axis=1).all()):
        bad = int(np.flatnonzero(~is_target.any(axis=1))[0])
        raise ValueError(f"{split.name}: query {bad}: the target is not among img_set.members")
    t_score = sub_scores[is_target][:, None]  # (Q, 1)
    beats = (sub_scores > t_score) | ((sub_scores == t_score) & (subset < target[:, None]))
    sub_ranks = beats.sum(axis=1)
    metrics.update({f"Rsubset@{k}": float(np.mean(sub_ranks < k)) for k in CIRR_SUBSET_KS})
    metrics["Avg"] = (metrics["R@5"] + metrics["Rsubset@1"]) / 2
    return metrics


def fashioniq_metrics(scores: np.ndarray, split: CIRSplit, gallery_names: list[str]) -> dict[str, float]:
    """R@10 and R@50 over the category's gallery; the reference stays in unless the split removes it."""
    _check_split(scores, split, gallery_names, needs_targets=True)
    index = _name_index(gallery_names)
    target = _indices(index, [q.target for q in split.queries], "target")  # type: ignore[misc]
    exclude = _indices(index, [q.reference for q in split.queries], "reference") if split.remove_reference else None
    ranks = target_ranks(scores, target, exclude)
    return {f"R@{k}": float(np.mean(ranks < k)) for k in FASHIONIQ_RECALL_KS}


PROTOCOLS: dict[str, Callable[[np.ndarray, CIRSplit, list[str]], dict[str, float]]] = {
    "cirr": cirr_metrics,
    "fashioniq": fashioniq_metrics,
}


def evaluate_scores(scores: np.ndarray, split: CIRSplit, gallery_names: list[str]) -> dict[str, float]:
    """The metrics of `split.protocol`."""
    try:
        metric_fn = PROTOCOLS[split.protocol]
    except KeyError as e:
        choices = ", ".join(PROTOCOLS)
        raise ValueError(f"{split.name}: unknown protocol {split.protocol!r}; choose one of {choices}") from e
    return metric_fn(scores, split, gallery_names)


def cirr_submission(
    scores: np.ndarray, split: CIRSplit, gallery_names: list[str]
) -> tuple[dict[str, object], dict[str, object]]:
    """The two test-server JSON objects: (recall: pairid -> top-50 names, recall_subset: pairid -> top-3)."""
    scores = _check_scores(scores)
    _check_split(scores, split, gallery_names, needs_targets=False)
    if split.protocol != "cirr":
        raise ValueError(f"{split.name}: a CIRR submission needs a split of protocol 'cirr', got {split.protocol!r}")
    index = _name_index(gallery_names)
    reference = _indices(index, [q.reference for q in split.queries], "reference")
    exclude = reference if split.remove_reference else None
    available = len(gallery_names) - (1 if exclude is not None else 0)
    k = min(SUBMISSION_TOPK, available)
    if k < SUBMISSION_TOPK:
        logger.warning("%s: gallery has only %d candidates; submitting top-%d", split.name, available, k)
    top = rank_gallery(scores, exclude, k)

    subset = _subset_indices(split, index)  # (Q, 5)
    # Subset order under the tie rule: sort members by gallery index, then stably by descending score.
    subset = np.sort(subset, axis=1)
    sub_scores = np.take_along_axis(scores, subset, axis=1)
    order = np.argsort(-sub_scores, axis=1, kind="stable")[:, :SUBMISSION_SUBSET_TOPK]
    sub_top = np.take_along_axis(subset, order, axis=1)

    recall: dict[str, object] = {"version": "rc2", "metric": "recall"}
    recall_subset: dict[str, object] = {"version": "rc2", "metric": "recall_subset"}
    for q, query in enumerate(split.queries):
        recall[str(query.pair_id)] = [gallery_names[i] for i in top[q]]
        recall_subset[str(query.pair_id)] = [gallery_names[i] for i in sub_top[q]]
    return recall, recall_subset


def average_fashioniq(per_category: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean R@10 and R@50 over the categories (the FashionIQ headline numbers)."""
    if not per_category:
        raise ValueError("average_fashioniq needs at least one category")
    out: dict[str, float] = {}
    for key in (f"R@{k}" for k in FASHIONIQ_RECALL_KS):
        missing = [c for c, m in per_category.items() if key not in m]
        if missing:
            raise ValueError(f"{key} is missing for categories {missing}")
        out[key] = float(np.mean([m[key] for m in per_category.values()]))
    return out


def _top_stable(block: np.ndarray, kk: int) -> np.ndarray:
    """(C, kk) indices of the kk best per row: descending score, ties by lower index."""
    gallery = block.shape[1]
    neg = -block
    if kk < gallery:
        part = np.argpartition(neg, kk - 1, axis=1)[:, :kk]  # the kk best, but arbitrary among boundary ties
        part_neg = np.take_along_axis(neg, part, axis=1)  # (C, kk)
        # kk-th best score per row; everything strictly better is already in `part`.
        bound = part_neg.max(axis=1)  # (C,)
        in_part = (part_neg == bound[:, None]).sum(axis=1)
        total = (neg == bound[:, None]).sum(axis=1)
        # Rows where ties straddle the boundary: keep the lowest-index tied items instead.
        for row in np.flatnonzero(in_part < total):
            better = np.flatnonzero(neg[row] < bound[row])
            tied = np.flatnonzero(neg[row] == bound[row])[: kk - better.size]
            part[row] = np.concatenate([better, tied])
    else:
        part = np.broadcast_to(np.arange(gallery), block.shape).copy()
    # Index order first, then a stable sort by score, gives the tie rule.
    part.sort(axis=1)
    order = np.argsort(np.take_along_axis(neg, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _chunks(num_queries: int, gallery: int) -> list[tuple[int, int]]:
    rows = max(1, _CHUNK_ELEMENTS // max(gallery, 1))
    return [(s, min(s + rows, num_queries)) for s in range(0, num_queries, rows)]


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (Q, G), got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        # Negation must be exact and order-reversing: unsigned integers are neither.
        scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN, which has no place in a ranking")
    return scores


def _check_exclude(exclude: np.ndarray | None, num_queries: int, gallery: int) -> np.ndarray:
    """Per-query index to leave out of the ranking, -1 for none; None means none for every query."""
    if exclude is None:
        return np.full(num_queries, -1, dtype=np.int64)
    return _check_index(exclude, num_queries, gallery, "exclude", low=-1)


def _check_index(values: np.ndarray, num_queries: int, gallery: int, what: str, low: int) -> np.ndarray:
    """One gallery index per query, in [low, gallery); low = -1 lets -1 mean "none"."""
    values = np.asarray(values)
    if values.shape != (num_queries,) or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(
            f"{what} must be an integer array of shape ({num_queries},), got {values.dtype} {values.shape}"
        )
    if values.size and (values.min() < low or values.max() >= gallery):
        raise ValueError(f"{what} must lie in [{low}, {gallery}), got range [{values.min()}, {values.max()}]")
    return values.astype(np.int64, copy=False)


def _check_split(scores: np.ndarray, split: CIRSplit, gallery_names: list[str], needs_targets: bool) -> None:
    shape = np.shape(scores)
    if shape != (len(split.queries), len(gallery_names)):
        expected = (len(split.queries), len(gallery_names))
        raise ValueError(f"{split.name}: scores must be (queries, gallery) = {expected}, got {shape}")
    if not split.queries:
        raise ValueError(f"{split.name}: no queries to evaluate")
    if needs_targets and not split.has_targets:
        raise ValueError(f"{split.name}: the split hides its targets; use cirr_submission for a test split")


def _name_index(gallery_names: list[str]) -> dict[str, int]:
    index = {name: i for i, name in enumerate(gallery_names)}
    if len(index) != len(gallery_names):
        raise ValueError("gallery_names contains duplicates")
    return index


def _indices(index: dict[str, int], names: list[str], what: str) -> np.ndarray:
    try:
        return np.array([index[n] for n in names], dtype=np.int64)
    except KeyError as e:
        raise ValueError(f"{what} image {e.args[0]!r} is not in the gallery") from e


def _subset_indices(split: CIRSplit, index: dict[str, int]) -> np.ndarray:
    """(Q, 5) gallery indices of each query's img_set.members other than its reference."""
    rows = []
    for q, query in enumerate(split.queries):
        others = [m for m in query.subset if m != query.reference]
        if len(others) != CIRR_SUBSET_OTHERS or len(set(others)) != CIRR_SUBSET_OTHERS:
            raise ValueError(
                f"{split.name}: query {q}: subset must be the reference and {CIRR_SUBSET_OTHERS} other distinct "
                f"images, got {query.subset}"
            )
        rows.append(_indices(index, others, "subset member"))
    return np.stack(rows)

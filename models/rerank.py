"""Two-stage retrieval for a composer whose exact score is not one dot product (ARTEMIS, models/artemis.py): the
folded query vector ranks the gallery, then its top-N are re-scored exactly and put first, in the exact order.

Evaluation runs it over a whole gallery here; the search library runs the same two stages over an index's top-N
(indexing/search/searcher.py), with the exported re-ranker (export: reranker.onnx).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

DEFAULT_RERANK_N = 100  # candidates re-scored per query when a bundle does not say (its manifest's rerank.n)

# (Q, F, D) query features, (Q, N, D) candidates' vectors -> (Q, N) exact scores
Rescore = Callable[[np.ndarray, np.ndarray], np.ndarray]


def rerank_gallery(folded: np.ndarray, features: np.ndarray, gallery: np.ndarray, n: int | None,
                   rescore: Rescore) -> np.ndarray:
    """(Q, G) scores whose ranking is the two-stage one: each query's top-`n` by `folded` (Q, G) re-scored
    exactly and ranked first in that order, the rest after them in the folded order. n None, or n >= G: the
    exact score of the whole gallery (a brute-force ranking)."""
    queries, size = folded.shape
    if n is not None and n <= 0:
        raise ValueError(f"rerank n must be a positive number of candidates, got {n}")
    if n is None or n >= size:
        return np.concatenate([rescore(features[rows], np.broadcast_to(gallery[None], (len(rows), *gallery.shape)))
                               for rows in _chunks(queries, size * gallery.shape[1])])
    top = np.argpartition(-folded, n - 1, axis=1)[:, :n]  # (Q, n) candidates, in no order
    exact = np.concatenate([rescore(features[rows], gallery[top[rows]])
                            for rows in _chunks(queries, n * gallery.shape[1])])
    out = folded.astype(np.float32, copy=True)
    # Above every folded score (cosines in [-1, 1]) whatever the exact score's range: the candidates come first.
    lift = np.abs(folded).max() + np.abs(exact).max() + 1.0
    np.put_along_axis(out, top, exact + lift, axis=1)
    return out


def _chunks(queries: int, floats_per_query: int, budget: int = 1 << 24) -> list[np.ndarray]:
    """Rows of the queries in chunks whose candidates hold at most `budget` floats (64 MB)."""
    step = max(1, budget // max(1, floats_per_query))
    return [np.arange(i, min(i + step, queries)) for i in range(0, queries, step)]

"""A compressed index's candidates re-scored exactly: the k * k_factor best by the index's codes, then the k best
of those by q . x, with x read from float16 copies of the vectors memory-mapped beside the index (rerank.npy).

Compressed codes (4-bit fast-scan PQ) rank well enough to find the true neighbours among a few times k candidates,
not to order them: the re-rank restores the order, so recall is no longer capped by the codes. Float16 holds a
unit vector's components to ~5e-4 relative, a score to ~1e-5: order-preserving for all but exact ties, at half
the bytes of float32. The store is memory-mapped: service replicas on one machine share its pages, and a store
larger than free memory degrades to disk reads instead of failing. Its rows are the base's ids in sorted order.

`Reranked` wraps the FAISS index and answers the two calls the search paths make of one (`search(x, k,
params=None)` with the same (scores, ids) padding, and `ntotal`), so plain, filtered (a selector in `params`
reaches the candidates' search) and overlay searches (the base re-ranked, the delta exact) all run through it.
"""

from __future__ import annotations

import faiss
import numpy as np

from cirflow.indexing.search import topk
from cirflow.indexing.search.topk import PAD_SCORE

RERANK_TYPES = ("ivf_pq_rerank",)  # index types built with a float16 store and searched through Reranked
STORE_DTYPE = np.float16


class Reranked:
    """A FAISS index whose k * k_factor candidates are re-scored from `vectors` (rows: `ids`, sorted)."""

    def __init__(self, index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, k_factor: int = 1) -> None:
        if vectors.shape[0] != len(ids) or len(ids) != index.ntotal:
            raise ValueError(f"the re-rank store holds {vectors.shape[0]} vectors for {len(ids)} ids; the index "
                             f"holds {index.ntotal}")
        self.index, self.vectors, self.ids = index, vectors, ids
        self.k_factor = k_factor

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int,
               params: faiss.SearchParameters | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) (Q, k) as faiss answers, padded: the index's k * k_factor best re-scored, the k best kept."""
        fetch = max(k, min(self.ntotal, k * self.k_factor))
        _, candidates = self.index.search(queries, fetch, params=params)
        return topk.merge([self.rescore(queries, candidates)], len(queries), k)

    def rescore(self, queries: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of `candidates` (Q, F) ids of the store, -1 for none: exact inner products, PAD_SCORE
        where the id is -1."""
        found = candidates >= 0
        rows = np.searchsorted(self.ids, np.where(found, candidates, self.ids[0] if len(self.ids) else 0))
        # One gather of every row the batch needs, in file order: a memory map reads it page by page.
        unique, inverse = np.unique(rows, return_inverse=True)
        vectors = np.asarray(self.vectors[unique], dtype=np.float32)
        scores = np.einsum("qfd,qd->qf", vectors[inverse.reshape(rows.shape)], queries, dtype=np.float32)
        return np.where(found, scores, PAD_SCORE).astype(np.float32), candidates


def store_vectors(vectors: np.ndarray) -> np.ndarray:
    """`vectors` as the re-rank scores them: rounded to the store's float16, back in float32 (an overlay's delta
    holds these, so its scores are on the re-rank's scale)."""
    return np.asarray(vectors, dtype=STORE_DTYPE).astype(np.float32)

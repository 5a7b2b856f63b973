"""The catalog vectors of an index version, by catalog id: what a bundle's re-ranker scores its candidates from
(export: reranker.onnx; the search library's re-rank stage, search/searcher.py).

An index built from a snapshot whose bundle re-ranks keeps them beside its FAISS files (`vectors.npy`, float32,
one row per catalog id in sorted id order, memory-mapped: only the rows of the candidates a search re-scores are
read); an overlay version links its base's and adds its new and changed vectors (`delta-vectors.npy`), which
take precedence over the base's rows of the same ids.
"""

from __future__ import annotations

import numpy as np

from cirflow.indexing.search.entries import SearchError


class VectorStore:
    """(sorted ids, rows) parts, the first holding an id answering for it."""

    def __init__(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.parts = parts
        self.dim = int(parts[0][1].shape[1])

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """(*ids.shape, D) float32 vectors of catalog `ids`; faiss's -1 padding gives zero rows. An id in no
        part is a SearchError (the index and its store disagree)."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        out = np.zeros((len(flat), self.dim), np.float32)
        todo = flat >= 0
        for sorted_ids, rows in self.parts:
            if not todo.any() or not len(sorted_ids):
                continue
            at = np.searchsorted(sorted_ids, flat).clip(max=len(sorted_ids) - 1)
            hit = todo & (sorted_ids[at] == flat)
            if hit.any():
                order = np.argsort(at[hit])  # ascending rows: a memory map is read in file order
                out[np.flatnonzero(hit)[order]] = rows[at[hit][order]]
            todo &= ~hit
        if todo.any():
            raise SearchError(f"no stored vector for catalog id(s) {flat[todo][:5].tolist()}: the index's vector "
                              "store does not match its entries")
        return out.reshape(*ids.shape, self.dim)

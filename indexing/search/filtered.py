"""Search restricted to some ids, on a FAISS index: through faiss's selectors on a CPU index, by over-fetching on
an index that takes none (faiss GPU), by an exact scan of the allowed vectors for a small set on HNSW.

A selector travels in SearchParameters, with the tuned nprobe / efSearch carried in (parameters given replace the
index's own), scaled by the inverse of the share of the index the filter allows: the tuned setting finds the k
nearest among all vectors; among a third of them the k nearest lie about three times as far down the ranking,
and a setting that looks three times as far finds them (measured on the toy overlays: IVF-PQ + re-rank, 1/3
allowed, recall 0.89 at the tuned nprobe). A filter can still leave an approximate index too few candidates
where it looks (IVF: the probed lists; HNSW: the visited part of the graph), so rows left short are searched
again with a doubled setting, up to an exhaustive one. HNSW answers a small allowed set (raw vectors up to EXACT_SUBSET_BYTES) by an exact scan of those
vectors, since a graph walk that skips nearly every node finds few of them (measured: 0.5% of 20k allowed,
efSearch 256: recall 0.2). faiss GPU indexes take no selector: they fetch more neighbours and keep the allowed
ones, at most GPU_MAX_K per query, so a very selective filter on a GPU index may return fewer than k.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import faiss
import numpy as np

from cirflow.indexing.search import topk
from cirflow.indexing.search.entries import members
from cirflow.indexing.search.rerank import Reranked
from cirflow.indexing.search.topk import PAD_SCORE

# An allowed set of HNSW vectors up to this size is scanned exactly: the index plan's flat_max_mb default, the
# size an exact scan handles in ~1 ms per query.
EXACT_SUBSET_BYTES = 16 << 20
# The first over-fetch of a GPU index with an allow-list: this many neighbours at least, doubled while rows lack
# allowed ones.
OVERFETCH_MIN = 64

SearchAll = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # (queries, n) -> the n best of all


def search_setting(index: faiss.Index | Reranked) -> tuple[str | None, int, int]:
    """(name, current value, exhaustive value) of a CPU index's search setting: ("nprobe", nprobe, nlist) for
    IVF, ("efSearch", efSearch, ntotal) for HNSW, (None, 0, 0) for an exact index. A faiss.IndexShards is read
    from its first shard: ParameterSpace sets them all alike; a re-ranked index from the index it wraps."""
    if isinstance(index, Reranked):
        index = index.index
    first = faiss.downcast_index(index.at(0)) if isinstance(index, faiss.IndexShards) and index.count() else index
    ivf = faiss.try_extract_index_ivf(first)
    if ivf is not None:
        return "nprobe", int(ivf.nprobe), int(ivf.nlist)
    inner = faiss.downcast_index(first.index) if isinstance(first, faiss.IndexIDMap) else first
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch", int(inner.hnsw.efSearch), int(index.ntotal)
    return None, 0, 0


def filtered_search(index: faiss.Index | Reranked, queries: np.ndarray, k: int,
                    allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) (Q, k) of a CPU index's k best among `allowed` (sorted ids, all in the index), through a
    faiss selector at the index's own setting scaled by the share allowed (module docstring)."""
    scale = index.ntotal / max(len(allowed), 1)
    return selector_search(index, queries, k, faiss.IDSelectorBatch(allowed), min(k, len(allowed)), scale)


def selector_search(index: faiss.Index | Reranked, queries: np.ndarray, k: int, selector: faiss.IDSelector,
                    want: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) (Q, k) of a CPU index's k best among the ids `selector` accepts, at the index's own setting
    times `scale`; rows short of `want` (at most k: as many as the selector accepts) are searched again with the
    setting doubled, up to an exhaustive one."""
    scores = np.full((len(queries), k), PAD_SCORE, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    if want == 0:
        return scores, ids
    param, value, limit = search_setting(index)
    value = min(limit, math.ceil(value * scale))
    # The shards of a faiss.IndexShards are searched one by one, each with parameters of its own: IndexIDMap
    # swaps its own id translation into the selector it is given while it searches, so shards searching in
    # parallel with one SearchParameters read each other's ids (seen with faiss 1.15.1).
    count = index.count() if isinstance(index, faiss.IndexShards) else 0
    parts = [faiss.downcast_index(index.at(i)) for i in range(count)] if count else [index]
    rows = np.arange(len(queries))
    while True:
        found = [part.search(queries[rows], k, params=_selector_params(param, value, selector)) for part in parts]
        found_scores, found_ids = topk.merge(found, len(rows), k)
        scores[rows], ids[rows] = found_scores, found_ids
        short = (found_ids >= 0).sum(axis=1) < want
        if param is None or value >= limit or not short.any():
            return scores, ids
        rows, value = rows[short], min(limit, 2 * value)


def _selector_params(param: str | None, value: int, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters with the selector and the setting: given parameters replace the index's own nprobe /
    efSearch, so the setting is carried in."""
    if param == "nprobe":
        return faiss.SearchParametersIVF(sel=selector, nprobe=value)
    if param == "efSearch":
        return faiss.SearchParametersHNSW(sel=selector, efSearch=value)
    return faiss.SearchParameters(sel=selector)


def overfetch_allowed(search: SearchAll, queries: np.ndarray, k: int, allowed: np.ndarray,
                      limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) (Q, k) of the k best among `allowed` (sorted ids) from an index that takes no selector
    (faiss GPU); rows short of min(k, len(allowed)) allowed ones ask again for twice as many, up to `limit`
    (k <= limit)."""
    return overfetch(search, queries, k, lambda found: members(allowed, found), min(k, len(allowed)), limit,
                     min(limit, max(2 * k, OVERFETCH_MIN)))


def overfetch(search: SearchAll, queries: np.ndarray, k: int, keep: Callable[[np.ndarray], np.ndarray], want: int,
              limit: int, fetch: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) (Q, k) of the k best ids that `keep` (ids -> bool mask) accepts, from an index that takes no
    selector: first the `fetch` best of all; the rows left with fewer than `want` kept ones (and those alone) ask
    again for twice as many, up to `limit` (k <= fetch <= limit), then stay short."""
    scores = np.full((len(queries), k), PAD_SCORE, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    if want == 0:
        return scores, ids
    rows = np.arange(len(queries))
    while True:
        found_scores, found_ids = search(queries[rows], fetch)
        kept = keep(found_ids) & (found_ids >= 0)
        order = np.argsort(~kept, axis=1, kind="stable")[:, :k]  # kept ones first, in rank order
        kept = np.take_along_axis(kept, order, axis=1)
        row_ids = np.where(kept, np.take_along_axis(found_ids, order, axis=1), -1)
        row_scores = np.where(kept, np.take_along_axis(found_scores, order, axis=1), PAD_SCORE)
        scores[rows], ids[rows] = row_scores, row_ids
        short = kept.sum(axis=1) < want
        if fetch >= limit or not short.any():
            return scores, ids
        rows, fetch = rows[short], min(limit, 2 * fetch)


class ExactSubset:
    """An exact scan of some ids' vectors, read from an HNSW index's storage (flat, or SQ8 decoded as the graph
    scores it; one IndexIDMap part, or one per shard of a faiss.IndexShards). The id lookup is made on first use
    and published whole: request threads may search at once."""

    def __init__(self, index: faiss.Index) -> None:
        self._index = index
        self._parts: list[tuple[np.ndarray, np.ndarray, faiss.Index]] | None = None

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) (Q, k) of the k best among `allowed` (sorted ids), padded."""
        return topk.exact(queries, self._vectors(allowed), k)

    def _vectors(self, allowed: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of the allowed ids, one pair per part that holds some."""
        for sorted_ids, order, storage in self._lookup():
            pos = np.searchsorted(sorted_ids, allowed).clip(max=max(len(sorted_ids) - 1, 0))
            hit = sorted_ids[pos] == allowed if len(sorted_ids) else np.zeros(len(allowed), bool)
            if hit.any():
                yield allowed[hit], storage.reconstruct_batch(order[pos[hit]])

    def _lookup(self) -> list[tuple[np.ndarray, np.ndarray, faiss.Index]]:
        if self._parts is None:
            count = self._index.count() if isinstance(self._index, faiss.IndexShards) else 0
            parts = []
            for part in [self._index.at(i) for i in range(count)] if count else [self._index]:
                part = faiss.downcast_index(part)
                part_ids = faiss.vector_to_array(part.id_map)
                order = np.argsort(part_ids, kind="stable")
                storage = faiss.downcast_index(faiss.downcast_index(part.index).storage)
                parts.append((part_ids[order], order, storage))
            self._parts = parts
        return self._parts

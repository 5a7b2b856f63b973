"""An overlay version's search (indexing/index/refresh.py): its base's FAISS files without their dead ids, merged
with its delta, the new and changed vectors (stored as the base's codec reconstructs them, so their scores are on
the base's scale; the delta is scanned whole).

A CPU base leaves the dead out inside faiss, with a selector of all but them (IDSelectorNot, made once per loaded
index), so a query whose nearest neighbours are all dead costs one search of k, not a growing over-fetch; a GPU
base takes no selector: it fetches a margin more than k and asks again, for the rows left short alone, up to
GPU_MAX_K.
"""

from __future__ import annotations

import logging
from typing import Callable

import faiss
import numpy as np

from cirflow.indexing.search import topk
from cirflow.indexing.search.entries import members
from cirflow.indexing.search.filtered import filtered_search, overfetch, selector_search
from cirflow.indexing.search.placement import GPU_MAX_K

log = logging.getLogger(__name__)

# (queries, k, allowed base ids) -> (scores, ids) of the base's k best among them
BaseSearch = Callable[[np.ndarray, int, np.ndarray], tuple[np.ndarray, np.ndarray]]


class Overlay:
    """The dead ids of a base index and the delta index beside it."""

    def __init__(self, name: str, base: faiss.Index, on_gpu: bool, dead: np.ndarray, delta: faiss.Index) -> None:
        self.name = name  # the index's, for the log
        self.base, self.on_gpu, self.dead, self.delta = base, on_gpu, dead, delta
        self.delta_ids = np.sort(faiss.vector_to_array(delta.id_map))
        # Made once per loaded index: faiss only reads a selector while it searches, so request threads share
        # it (the SearchParameters that carry it are made per search: IndexIDMap writes into them).
        self._not_dead = faiss.IDSelectorNot(faiss.IDSelectorBatch(dead)) if len(dead) else None
        self._short_logged = False

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) (Q, k) of the k best live vectors per query, padded."""
        parts = [self._live_base(queries, k)]
        if self.delta.ntotal:
            parts.append(self.delta.search(queries, min(k, self.delta.ntotal)))
        return topk.merge(parts, len(queries), k)

    def search_allowed(self, queries: np.ndarray, k: int, allowed: np.ndarray,
                       base_search: BaseSearch) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) (Q, k) of the k best live vectors among `allowed` (sorted catalog ids), padded: the
        base's share through `base_search`, the delta's by a selector."""
        # `allowed` holds catalog ids only, so the base's share (those not in the delta) holds no dead id: its
        # selector leaves the dead out, where an unfiltered search must over-fetch past them.
        in_delta = np.isin(allowed, self.delta_ids, assume_unique=True)
        parts = [base_search(queries, k, allowed[~in_delta])]
        if in_delta.any():
            parts.append(filtered_search(self.delta, queries, k, allowed[in_delta]))
        return topk.merge(parts, len(queries), k)

    def _live_base(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The base's k best per query without its dead ids."""
        if self._not_dead is None:
            return self.base.search(queries, k)
        want = min(k, self.base.ntotal - len(self.dead))
        if not self.on_gpu:
            return selector_search(self.base, queries, k, self._not_dead, want)
        limit = max(k, min(self.base.ntotal, GPU_MAX_K))
        first = min(limit, k + min(len(self.dead), max(k, 16)))
        scores, ids = overfetch(self.base.search, queries, k, lambda found: ~members(self.dead, found), want,
                                limit, first)
        if not self._short_logged and ((ids >= 0).sum(axis=1) < want).any():
            self._short_logged = True  # once per loaded index: it says what happened, it is not an alarm
            log.debug("index %s: a query found fewer than %d live base vectors among its %d nearest (dead ids "
                      "crowd that neighbourhood); answered short", self.name, want, limit)
        return scores, ids

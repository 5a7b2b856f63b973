"""Top-k lists as faiss lays them out: (scores, ids) of shape (Q, k), best first, padded with id -1 and PAD_SCORE.

`merge` is the one merge of partial results (a base's and a delta's, shards', old and new ground truth, batches of
an exact scan): faiss's own ResultHeap. Equal scores come out in no promised order, as from faiss itself.
`drop_excluded` leaves ids out of lists fetched with room for them.
"""

from __future__ import annotations

from typing import Iterable

import faiss
import numpy as np

PAD_SCORE = np.finfo(np.float32).min  # the score faiss gives its -1 padding under the inner-product metric


def merge(parts: Iterable[tuple[np.ndarray, np.ndarray]], queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) (queries, k) of the k best of row-aligned partial results (scores, ids) (queries, any width),
    padded; padding in the parts (id -1, whatever score faiss gave it) never displaces a found id."""
    heap = faiss.ResultHeap(queries, k, keep_max=True)
    for scores, ids in parts:
        if scores.shape[1]:
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            heap.add_result(np.where(ids < 0, PAD_SCORE, scores).astype(np.float32), ids)
    heap.finalize()
    return heap.D, heap.I


def drop_excluded(ids: np.ndarray, scores: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k columns of rankings (Q, >= k) without each row's excluded ids: `exclude` (Q,) one id per row,
    or (Q, E) several; -1: none. The others keep their rank order; a row that lost ids within its first k gains
    faiss's padding at the end."""
    exclude = exclude.reshape(len(ids), -1)
    hit = ((ids[:, :, None] == exclude[:, None, :]) & (exclude[:, None, :] >= 0)).any(axis=2)
    order = np.argsort(hit, axis=1, kind="stable")  # the others first, in rank order
    ids, scores = np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)
    dropped = np.take_along_axis(hit, order, axis=1)
    ids[dropped], scores[dropped] = -1, PAD_SCORE
    return ids[:, :k], scores[:, :k]


def exact(queries: np.ndarray, batches: Iterable[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) (Q, k) of the k best by inner product over `batches` of (ids, vectors), streamed (one batch in
    memory at a time), padded where they hold fewer than k."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)

    def scanned() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        for ids, vectors in batches:
            if len(ids):
                scores, rows = faiss.knn(queries, np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(ids)),
                                         metric=faiss.METRIC_INNER_PRODUCT)
                yield scores, np.asarray(ids, dtype=np.int64)[rows]

    return merge(scanned(), len(queries), k)

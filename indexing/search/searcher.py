"""The search library's front: composed queries (reference image + text) in, catalog ids, scores and uris out.

    searcher = Searcher.load("workdir/indexes/shoes", "workdir/bundles/<bundle_id>")  # CURRENT is followed
    result = searcher.search(Path("ref.jpg"), "make it red", k=10, exclude_id=ref_id)

A Searcher refuses an index built from another bundle's vectors: the scores would be meaningless.

A bundle with a re-ranker (ARTEMIS: its exact score is not the query vector's cosine; models/rerank.py) searches
in two stages: the index's top N by the query vector, then those N re-scored exactly (`rescore_candidates`: the
re-ranker over the query's features and the candidates' stored catalog vectors) and the best k kept. A bundle
without one searches as it always did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cirflow.export.runtime import BundleRuntime, ImageInput
from cirflow.indexing.search import topk
from cirflow.indexing.search.entries import SearchError
from cirflow.indexing.search.sharded import ShardedIndex, load_index
from cirflow.indexing.search.vector_index import IndexVersion, SearchResult, VectorIndex


class IndexMismatchError(ValueError):
    """The index was built from another bundle's vectors than the bundle given to search it."""


class Searcher:
    """A bundle's query encoder and an index made from the same bundle's catalog vectors."""

    def __init__(self, index: VectorIndex | ShardedIndex, runtime: BundleRuntime) -> None:
        if index.bundle_id != runtime.bundle_id:
            raise IndexMismatchError(f"index {index.index_dir} was built from vectors of bundle {index.bundle_id}, "
                                     f"but bundle {runtime.bundle_dir} is {runtime.bundle_id}; search it with "
                                     f"bundle {index.bundle_id}, or rebuild the index from this bundle's "
                                     "embeddings")
        if index.dim != runtime.embed_dim:  # same bundle_id implies the same dim; a hand-edited manifest does not
            raise IndexMismatchError(f"index {index.index_dir} has dimension {index.dim}, bundle "
                                     f"{runtime.bundle_dir} encodes {runtime.embed_dim}")
        if runtime.reranks and index.vector_store is None:
            raise IndexMismatchError(f"bundle {runtime.bundle_dir} re-ranks from the catalog vectors, but index "
                                     f"{index.index_dir} keeps none (built before its snapshot said so); rebuild "
                                     "it from this bundle's embeddings")
        self.index = index
        self.runtime = runtime

    @classmethod
    def load(cls, index_dir: Path, bundle_dir: Path, providers: str = "auto", use_gpu: str = "auto",
             verify: str = "sha256", mmap: bool = True) -> Searcher:
        """An index directory, single or sharded (or a catalog directory with CURRENT), and the bundle it was
        built with."""
        index = load_index(index_dir, use_gpu=use_gpu, verify=verify, mmap=mmap)
        return cls(index, BundleRuntime.load(bundle_dir, providers=providers))

    def search(self, reference_image: ImageInput, text: str, k: int = 10, exclude_id: int | None = None,
               allow_ids: Sequence[int] | np.ndarray | None = None, rerank_n: int | None = None) -> SearchResult:
        """The k catalog images that best match the reference image modified by `text` (among allow_ids)."""
        return self.search_batch([reference_image], [text], k, None if exclude_id is None else [exclude_id],
                                 allow_ids, rerank_n)[0]

    def search_batch(self, images: Sequence[ImageInput], texts: Sequence[str], k: int = 10,
                     exclude_ids: Sequence[int | None] | None = None,
                     allow_ids: Sequence[int] | np.ndarray | None = None,
                     rerank_n: int | None = None) -> list[SearchResult]:
        """Images: PIL RGB, encoded bytes, Paths or (H, W, 3) uint8 arrays (BundleRuntime.embed_queries).
        allow_ids: catalog ids all queries are restricted to (VectorIndex.search). rerank_n: for a bundle with a
        re-ranker, the index's candidates re-scored exactly per query (None: the bundle's default; 0: none, the
        query vector's ranking); a bundle without one ignores it."""
        if not self.reranks(rerank_n):
            return self.search_vectors(self.runtime.embed_queries(images, texts), k, exclude_ids, allow_ids)
        queries, features = self.runtime.embed_queries_with_features(images, texts)
        return self.search_vectors(queries, k, exclude_ids, allow_ids, features, rerank_n)

    def search_vectors(self, queries: np.ndarray, k: int = 10,
                       exclude_ids: Sequence[int | None] | np.ndarray | None = None,
                       allow_ids: Sequence[int] | np.ndarray | None = None, features: np.ndarray | None = None,
                       rerank_n: int | None = None) -> list[SearchResult]:
        """Already encoded (Q, D) query vectors, e.g. a batch encoded elsewhere; with their re-ranker `features`
        (Q, F, D), the index's top max(k, rerank_n) re-scored exactly (search_batch)."""
        if features is None or not self.reranks(rerank_n):
            ids, scores = self.index.search(queries, k, exclude_ids, allow_ids)
        else:
            ids, _ = self.index.search(queries, self.candidates(k, rerank_n), exclude_ids, allow_ids)
            ids, scores = rescore_candidates(self.index, self.runtime, features, ids, k)
        return self.index.results(ids, scores)

    def reranks(self, rerank_n: int | None) -> bool:
        """Whether a search with this rerank_n re-scores candidates (a bundle with a re-ranker, n not 0)."""
        check_rerank_n(rerank_n)
        return self.runtime.reranks and rerank_n != 0

    def candidates(self, k: int, rerank_n: int | None) -> int:
        """How many of the index's results a search of k re-scores."""
        return max(k, self.runtime.rerank_n if rerank_n is None else rerank_n)


def check_rerank_n(rerank_n: int | None) -> None:
    if rerank_n is not None and (isinstance(rerank_n, bool) or not isinstance(rerank_n, (int, np.integer))
                                 or rerank_n < 0):
        raise SearchError(f"rerank_n must be a non-negative integer or None, got {rerank_n!r}")


def rescore_candidates(index: IndexVersion, runtime: BundleRuntime, features: np.ndarray, ids: np.ndarray,
                       k: int) -> tuple[np.ndarray, np.ndarray]:
    """The re-rank stage: the index's candidates `ids` (Q, N; -1 padded) scored exactly by the bundle's re-ranker
    from each query's `features` (Q, F, D) and the candidates' stored catalog vectors, best first; the top k
    (ids (Q, min(k, N)), scores), padded as faiss pads."""
    exact = runtime.rescore(features, index.vectors_of(ids))
    scores, ids = topk.merge([(exact, ids)], len(ids), min(k, ids.shape[1]))
    return ids, scores

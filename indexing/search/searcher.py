"""The search library's front: composed queries (reference image + text) in, catalog ids, scores and uris out.

    searcher = Searcher.load("workdir/indexes/shoes", "workdir/bundles/<bundle_id>")  # CURRENT is followed
    result = searcher.search(Path("ref.jpg"), "make it red", k=10, exclude_id=ref_id)

A Searcher refuses an index built from another bundle's vectors: the scores would be meaningless.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cirflow.export.runtime import BundleRuntime, ImageInput
from cirflow.indexing.search.sharded import ShardedIndex, load_index
from cirflow.indexing.search.vector_index import SearchResult, VectorIndex


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
               allow_ids: Sequence[int] | np.ndarray | None = None) -> SearchResult:
        """The k catalog images that best match the reference image modified by `text` (among allow_ids)."""
        return self.search_batch([reference_image], [text], k, None if exclude_id is None else [exclude_id],
                                 allow_ids)[0]

    def search_batch(self, images: Sequence[ImageInput], texts: Sequence[str], k: int = 10,
                     exclude_ids: Sequence[int | None] | None = None,
                     allow_ids: Sequence[int] | np.ndarray | None = None) -> list[SearchResult]:
        """Images: PIL RGB, encoded bytes, Paths or (H, W, 3) uint8 arrays (BundleRuntime.embed_queries).
        allow_ids: catalog ids all queries are restricted to (VectorIndex.search)."""
        return self.search_vectors(self.runtime.embed_queries(images, texts), k, exclude_ids, allow_ids)

    def search_vectors(self, queries: np.ndarray, k: int = 10,
                       exclude_ids: Sequence[int | None] | np.ndarray | None = None,
                       allow_ids: Sequence[int] | np.ndarray | None = None) -> list[SearchResult]:
        """Already encoded (Q, D) query vectors, e.g. a batch encoded elsewhere."""
        ids, scores = self.index.search(queries, k, exclude_ids, allow_ids)
        return self.index.results(ids, scores)

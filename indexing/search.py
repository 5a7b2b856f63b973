"""The search library: composed queries (reference image + text) in, catalog ids, scores and uris out.

    searcher = Searcher.load("workdir/indexes/shoes", "workdir/bundles/<bundle_id>")  # CURRENT is followed
    result = searcher.search(Path("ref.jpg"), "make it red", k=10, exclude_id=ref_id)

`VectorIndex` is the index alone (vectors in): what benchmarks time without the encoder. Loading checks every
index file against the manifest, memory-maps what faiss can map (index_store), and sets the tuned nprobe /
efSearch. A Searcher refuses an index built from another bundle's vectors: the scores would be meaningless.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np
import pyarrow as pa

from cirflow.export.runtime import BundleRuntime, ImageInput
from cirflow.indexing import index_store as store
from cirflow.indexing.faiss_device import GPU_MAX_K, resolve_gpu, set_search_param
from cirflow.indexing.tuning import PAD_SCORE, drop_excluded

log = logging.getLogger(__name__)

VERIFY = ("sha256", "size")


class SearchError(ValueError):
    """A bad search request (k, query shape, exclusion list); the message names the argument."""


class IndexMismatchError(ValueError):
    """The index was built from another bundle's vectors than the bundle given to search it."""


@dataclass(frozen=True)
class SearchResult:
    ids: np.ndarray  # (n,) int64 catalog ids, best first; n = k unless the index found fewer
    scores: np.ndarray  # (n,) float32 inner products = cosine similarities (approximate for IVF-PQ)
    uris: list[str]


class VectorIndex:
    """A loaded index directory: (Q, D) query vectors in, the top-k catalog ids and scores out.

    An overlay version (index_refresh.py) answers from its base FAISS files without their dead ids, merged with
    its delta's exact results."""

    def __init__(self, index_dir: Path, manifest: dict[str, Any], index: faiss.Index, on_gpu: bool,
                 ids: np.ndarray, uris: pa.StringArray, dead: np.ndarray | None = None,
                 delta: faiss.Index | None = None) -> None:
        self.index_dir = index_dir
        self.manifest = manifest
        self.index = index  # the base: the whole index unless this is an overlay
        self.on_gpu = on_gpu
        self._ids = ids  # sorted catalog ids, aligned with _uris
        self._uris = uris
        self._dead = np.zeros(0, np.int64) if dead is None else dead
        self._delta = delta

    @classmethod
    def open(cls, index_dir: Path, manifest: dict[str, Any], mmap: bool, on_gpu: bool) -> VectorIndex:
        """The index of a verified directory, its base, overlay and uris (load and index tuning share this)."""
        index = store.open_index(index_dir, manifest, mmap=mmap, on_gpu=on_gpu)
        ids, uris = store.read_uris(index_dir)
        dead, delta = store.read_dead(index_dir, manifest), store.open_delta(index_dir, manifest)
        live = index.ntotal - len(dead) + (delta.ntotal if delta is not None else 0)
        if len(ids) != live:
            raise store.IndexFormatError(f"{index_dir}: {store.URIS} lists {len(ids)} ids, the index holds "
                                         f"{live} live vectors")
        return cls(index_dir, manifest, index, on_gpu, ids, uris, dead, delta)

    @classmethod
    def load(cls, index_dir: Path, use_gpu: str = "auto", verify: str = "sha256", mmap: bool = True) -> VectorIndex:
        """Open an index directory, or the CURRENT index of a catalog directory.

        verify: "sha256" checks every file's checksum (reads each file once), "size" only sizes (fast start on
        huge indexes). mmap: memory-map the vectors / lists where the index type allows (module docstring of
        index_store); the pages are shared between processes serving the same index.
        """
        if verify not in VERIFY:
            raise ValueError(f"verify={verify!r} is not one of {list(VERIFY)}")
        index_dir = store.resolve_index_dir(Path(index_dir))
        manifest = store.verify_index(index_dir, checksums=verify == "sha256")
        on_gpu = resolve_gpu(use_gpu, manifest["type"], "search")
        loaded = cls.open(index_dir, manifest, mmap, on_gpu)
        setting = manifest["search"]
        if setting["param"] is not None:
            set_search_param(loaded.index, setting["param"], int(setting["value"]), on_gpu)
        recall = manifest["recall"]
        tuned = "exact" if setting["param"] is None else f"{setting['param']}={setting['value']}"
        log.info("index %s: %s, %d vectors, %s (recall@%d %.3f held out)%s", index_dir, manifest["type"],
                 loaded.ntotal, tuned, recall["k"], recall["held_out"],
                 "" if recall["target_met"] else " RECALL TARGET NOT MET")
        return loaded

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def ntotal(self) -> int:
        """Live vectors: every catalog id once."""
        return len(self._ids)

    def search(self, queries: np.ndarray, k: int = 10,
               exclude_ids: Sequence[int | None] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids (Q, n) int64, scores (Q, n) float32), best first, n = min(k, ntotal); faiss pads with id -1 where
        it found fewer.

        k is capped at the index size: a client asking for a billion results gets the whole catalog, not a
        Q x k allocation. exclude_ids: per query a catalog id to leave out (the reference's own image), None/-1
        for none. One extra neighbour is asked for, so dropping it still returns k whenever the catalog holds k
        others; a row that loses its excluded id from a whole-catalog answer ends in one padding slot.
        """
        queries = self._check_queries(queries)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise SearchError(f"k must be a positive integer, got {k!r}")
        exclude = self._check_exclude(exclude_ids, len(queries))
        excluding = bool((exclude >= 0).any())
        kk = min(int(k) + excluding, self.ntotal)
        if self.on_gpu and kk > GPU_MAX_K:
            raise SearchError(f"k={k} is over faiss's GPU limit of {GPU_MAX_K - excluding} results per query")
        if kk == 0:
            return np.empty((len(queries), 0), np.int64), np.empty((len(queries), 0), np.float32)
        scores, ids = self._top(queries, kk)
        if excluding:
            ids, scores = drop_excluded(ids, scores, exclude, min(int(k), kk))
        return ids, scores

    def _top(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k best live vectors per query, faiss's layout and padding."""
        if self._delta is None:
            return self.index.search(queries, k)
        scores, ids = self._live_base(queries, k)
        if self._delta.ntotal:
            delta_scores, delta_ids = self._delta.search(queries, min(k, self._delta.ntotal))
            scores, ids = np.hstack([scores, delta_scores]), np.hstack([ids, delta_ids])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def _live_base(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The base's k best per query without dead ids: asks for more, and for rows that lost too many, asks
        again with twice as many, until k live ones or the whole base."""
        fetch = min(self.index.ntotal, k + min(len(self._dead), max(k, 16)))
        if fetch == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        while True:
            scores, ids = self.index.search(queries, fetch)
            dead = np.isin(ids, self._dead)
            ids[dead], scores[dead] = -1, PAD_SCORE
            short = ((ids >= 0).sum(axis=1) < k).any()
            if not short or fetch >= self.index.ntotal:
                order = np.argsort(dead, axis=1, kind="stable")[:, :k]  # live ones first, in rank order
                return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
            fetch = min(self.index.ntotal, fetch * 2)

    def uris_of(self, ids: np.ndarray) -> list[str]:
        """The uri of each catalog id (ids the index returned)."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = np.searchsorted(self._ids, ids)
        if ids.size and (rows.max() >= len(self._ids) or (self._ids[rows] != ids).any()):
            raise SearchError(f"ids {ids.tolist()} include ids that are not in the catalog")
        return self._uris.take(pa.array(rows)).to_pylist()

    def results(self, ids: np.ndarray, scores: np.ndarray) -> list[SearchResult]:
        """One SearchResult per row of search()'s output, without faiss's -1 padding."""
        out = []
        for row_ids, row_scores in zip(ids, scores):
            found = row_ids >= 0
            out.append(SearchResult(row_ids[found], row_scores[found], self.uris_of(row_ids[found])))
        return out

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise SearchError(f"queries must be (Q, {self.dim}) for this index ({self.index_dir.name}), got "
                              f"shape {queries.shape}")
        return np.ascontiguousarray(queries, dtype=np.float32)

    @staticmethod
    def _check_exclude(exclude_ids: Sequence[int | None] | np.ndarray | None, count: int) -> np.ndarray:
        if exclude_ids is None:
            return np.full(count, -1, dtype=np.int64)
        if len(exclude_ids) != count:
            raise SearchError(f"exclude_ids has {len(exclude_ids)} entries for {count} queries")
        try:
            return np.array([-1 if e is None else int(e) for e in exclude_ids], dtype=np.int64)
        except (TypeError, ValueError) as e:
            raise SearchError(f"exclude_ids must hold catalog ids (int) or None: {e}") from e


class Searcher:
    """A bundle's query encoder and an index made from the same bundle's catalog vectors."""

    def __init__(self, index: VectorIndex, runtime: BundleRuntime) -> None:
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
        """An index directory (or catalog directory with CURRENT) and the bundle it was built with."""
        index = VectorIndex.load(index_dir, use_gpu=use_gpu, verify=verify, mmap=mmap)
        return cls(index, BundleRuntime.load(bundle_dir, providers=providers))

    def search(self, reference_image: ImageInput, text: str, k: int = 10,
               exclude_id: int | None = None) -> SearchResult:
        """The k catalog images that best match the reference image modified by `text`."""
        return self.search_batch([reference_image], [text], k, None if exclude_id is None else [exclude_id])[0]

    def search_batch(self, images: Sequence[ImageInput], texts: Sequence[str], k: int = 10,
                     exclude_ids: Sequence[int | None] | None = None) -> list[SearchResult]:
        """Images: PIL RGB, encoded bytes, Paths or (H, W, 3) uint8 arrays (BundleRuntime.embed_queries)."""
        return self.search_vectors(self.runtime.embed_queries(images, texts), k, exclude_ids)

    def search_vectors(self, queries: np.ndarray, k: int = 10,
                       exclude_ids: Sequence[int | None] | np.ndarray | None = None) -> list[SearchResult]:
        """Already encoded (Q, D) query vectors, e.g. a batch encoded elsewhere."""
        ids, scores = self.index.search(queries, k, exclude_ids)
        return self.index.results(ids, scores)

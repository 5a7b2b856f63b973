"""A loaded index directory: (Q, D) query vectors in, the top-k catalog ids and scores out.

Loading checks every index file against the manifest, memory-maps what faiss can map (index_store), places the
index on a GPU or the CPU (placement), wraps a re-ranked type's index in its float16 re-rank (rerank) and sets
the tuned nprobe / efSearch and candidate count. `search` checks its arguments and
answers from the plain index, an overlay version's base and delta (overlay), or among allowed ids (filtered);
`entries` holds the catalog's entries the index serves (uris, metadata, image sources).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from cirflow.indexing.search import index_store as store
from cirflow.indexing.search.entries import Entries, SearchError
from cirflow.indexing.search.filtered import (
    EXACT_SUBSET_BYTES,
    ExactSubset,
    filtered_search,
    overfetch_allowed,
)
from cirflow.indexing.search.overlay import Overlay
from cirflow.indexing.search.placement import GPU_MAX_K, resolve_gpu, set_search_param
from cirflow.indexing.search.rerank import Reranked
from cirflow.indexing.search.topk import drop_excluded
from cirflow.indexing.search.vector_store import VectorStore

log = logging.getLogger(__name__)

VERIFY = ("sha256", "size")


@dataclass(frozen=True)
class SearchResult:
    ids: np.ndarray  # (n,) int64 catalog ids, best first; n = k unless the index found fewer
    scores: np.ndarray  # (n,) float32 inner products = cosine similarities (approximate for IVF-PQ)
    uris: list[str]


class IndexVersion:
    """What every loaded index version answers with (VectorIndex, a sharded version in one process, a sharded
    front's remote shards): its directory, manifest and catalog entries, and the checks of a search's queries and k."""

    index_dir: Path
    manifest: dict[str, Any]
    entries: Entries
    # True where the vectors are searched in other processes (service/ray_shards.py): `await search_async(...)`
    # on the event loop, the request thread not held while they answer; False: search() in this process.
    remote = False
    # The catalog vectors by id, kept where the snapshot's bundle re-ranks (search/vector_store.py); None: none.
    vector_store: VectorStore | None = None

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """The stored catalog vectors of `ids` (any shape; -1 padding gives zero rows): the re-ranker's input."""
        if self.vector_store is None:
            raise SearchError(f"index {self.index_dir.name} keeps no catalog vectors to re-rank from: it was built "
                              "from a snapshot whose bundle has no re-ranker")
        return self.vector_store.vectors_of(ids)

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def ntotal(self) -> int:
        """Live vectors: every catalog id once."""
        return len(self.entries)

    def results(self, ids: np.ndarray, scores: np.ndarray) -> list[SearchResult]:
        """One SearchResult per row of search()'s output, without faiss's -1 padding."""
        out = []
        for row_ids, row_scores in zip(ids, scores):
            found = row_ids >= 0
            out.append(SearchResult(row_ids[found], row_scores[found], self.entries.uris_of(row_ids[found])))
        return out

    def check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise SearchError(f"queries must be (Q, {self.dim}) for this index ({self.index_dir.name}), got "
                              f"shape {queries.shape}")
        return np.ascontiguousarray(queries, dtype=np.float32)

    @staticmethod
    def check_k(k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise SearchError(f"k must be a positive integer, got {k!r}")


class VectorIndex(IndexVersion):
    """One index version: its FAISS index (the base, for an overlay version), where it runs, and its entries."""

    def __init__(self, index_dir: Path, manifest: dict[str, Any], index: faiss.Index | Reranked, on_gpu: bool,
                 entries: Entries, overlay: Overlay | None = None) -> None:
        self.index_dir = index_dir
        self.manifest = manifest
        self.index = index
        self.on_gpu = on_gpu
        self.entries = entries
        self.overlay = overlay
        self._exact_subset = ExactSubset(index)

    @classmethod
    def open(cls, index_dir: Path, manifest: dict[str, Any], mmap: bool, on_gpu: bool) -> VectorIndex:
        """The index of a verified directory, its base, overlay, uris and metadata (load and index tuning share
        this)."""
        index: faiss.Index | Reranked = store.open_index(index_dir, manifest, mmap=mmap, on_gpu=on_gpu)
        vectors = store.open_rerank_store(index_dir, manifest)
        if vectors is not None:
            index = Reranked(index, vectors, store.read_base_ids(index_dir, manifest))
        ids, uris = store.read_uris(index_dir)
        dead, delta = store.read_dead(index_dir, manifest), store.open_delta(index_dir, manifest)
        live = index.ntotal - len(dead) + (delta.ntotal if delta is not None else 0)
        if len(ids) != live:
            raise store.IndexFormatError(f"{index_dir}: {store.URIS} lists {len(ids)} ids, the index holds "
                                         f"{live} live vectors")
        entries = Entries(index_dir.name, ids, uris, store.read_metadata(index_dir), store.read_sources(index_dir))
        overlay = None if delta is None else Overlay(index_dir.name, index, on_gpu, dead, delta)
        loaded = cls(index_dir, manifest, index, on_gpu, entries, overlay)
        loaded.vector_store = store.open_vector_store(index_dir, manifest)
        return loaded

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
        if manifest.get("layout") == store.SHARDED_LAYOUT:
            raise store.IndexFormatError(f"{index_dir} is a sharded version of {len(manifest['shards'])} shards; "
                                         "load it with cirflow.indexing.search.load_index")
        on_gpu = resolve_gpu(use_gpu, manifest["type"], "search")
        loaded = cls.open(index_dir, manifest, mmap, on_gpu)
        loaded.use_tuned_setting()
        setting, recall = manifest["search"], manifest["recall"]
        tuned = "exact" if setting["param"] is None else f"{setting['param']}={setting['value']}"
        if setting.get("k_factor"):
            tuned += f", re-rank of k x {setting['k_factor']} candidates"
        log.info("index %s: %s, %d vectors, %s (recall@%d %.3f held out)%s", index_dir, manifest["type"],
                 loaded.ntotal, tuned, recall["k"], recall["held_out"],
                 "" if recall["target_met"] else " RECALL TARGET NOT MET")
        return loaded

    def set_search(self, param: str | None, value: int | None, k_factor: int | None = None) -> None:
        """Apply a search setting: nprobe / efSearch (None: an exact index has none) and, for a re-ranked index,
        the candidates re-scored per result (tuning sweeps both; load applies the manifest's)."""
        if param is not None and value is not None:
            faiss_index = self.index.index if isinstance(self.index, Reranked) else self.index
            set_search_param(faiss_index, param, int(value), self.on_gpu)
        if k_factor is not None:
            if not isinstance(self.index, Reranked):
                raise SearchError(f"index {self.index_dir.name} ({self.manifest['type']}) has no re-rank to set "
                                  f"k_factor={k_factor} on")
            self.index.k_factor = int(k_factor)

    def use_tuned_setting(self) -> None:
        """Apply the setting tuning recorded in the manifest."""
        setting = self.manifest["search"]
        self.set_search(setting["param"], setting["value"], setting.get("k_factor"))

    def search(self, queries: np.ndarray, k: int = 10,
               exclude_ids: Sequence[int | None] | np.ndarray | None = None,
               allow_ids: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids (Q, n) int64, scores (Q, n) float32), best first, n = min(k, ntotal); faiss pads with id -1 where
        it found fewer.

        k is capped at the index size: a client asking for a billion results gets the whole catalog, not a
        Q x k allocation. exclude_ids: per query a catalog id to leave out (the reference's own image), None/-1
        for none. One extra neighbour is asked for, so dropping it still returns k whenever the catalog holds k
        others; a row that loses its excluded id from a whole-catalog answer ends in one padding slot.
        allow_ids: None, or catalog ids shared by all queries (1-D): only these are returned, padded with -1
        where fewer are allowed (none for an empty list); ids not in the catalog are never returned.
        """
        queries = self.check_queries(queries)
        self.check_k(k)
        exclude = self._check_exclude(exclude_ids, len(queries))
        allowed = None if allow_ids is None else self._check_allow(allow_ids)
        excluding = bool((exclude >= 0).any())
        kk = min(int(k) + excluding, self.ntotal)
        if self.on_gpu and kk > GPU_MAX_K:
            raise SearchError(f"k={k} is over faiss's GPU limit of {GPU_MAX_K - excluding} results per query")
        if kk == 0:
            return np.empty((len(queries), 0), np.int64), np.empty((len(queries), 0), np.float32)
        if allowed is None:
            scores, ids = self.index.search(queries, kk) if self.overlay is None else self.overlay.search(queries, kk)
        elif self.overlay is None:
            scores, ids = self._base_allowed(queries, kk, allowed)
        else:
            scores, ids = self.overlay.search_allowed(queries, kk, allowed, self._base_allowed)
        if excluding:
            ids, scores = drop_excluded(ids, scores, exclude, min(int(k), kk))
        return ids, scores

    def _base_allowed(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the index's k best per query among `allowed` (sorted ids it holds), padded."""
        if self.on_gpu:
            return overfetch_allowed(self.index.search, queries, k, allowed, min(self.index.ntotal, GPU_MAX_K))
        if self.manifest["type"] in ("hnsw", "hnsw_sq") and len(allowed) * self.dim * 4 <= EXACT_SUBSET_BYTES:
            return self._exact_subset.search(queries, k, allowed)
        return filtered_search(self.index, queries, k, allowed)

    def _check_allow(self, allow_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Sorted unique ids of allow_ids that the catalog holds."""
        if isinstance(allow_ids, (set, frozenset)):
            allow_ids = list(allow_ids)
        allowed = np.asarray(allow_ids)
        if allowed.ndim != 1:
            raise SearchError(f"allow_ids must be a 1-D sequence of catalog ids, got shape {allowed.shape}")
        if allowed.size == 0:
            return np.zeros(0, np.int64)
        if allowed.dtype.kind not in "iu":
            raise SearchError(f"allow_ids must hold integer catalog ids, got {allowed.dtype} values")
        if allowed.dtype.kind == "u":  # above int64: in no catalog
            allowed = allowed[allowed <= np.iinfo(np.int64).max]
        allowed = np.unique(allowed.astype(np.int64))
        return allowed[self.entries.held(allowed)]

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

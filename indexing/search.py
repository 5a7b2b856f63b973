"""The search library: composed queries (reference image + text) in, catalog ids, scores and uris out.

    searcher = Searcher.load("workdir/indexes/shoes", "workdir/bundles/<bundle_id>")  # CURRENT is followed
    result = searcher.search(Path("ref.jpg"), "make it red", k=10, exclude_id=ref_id)

`VectorIndex` is the index alone (vectors in): what benchmarks time without the encoder. Loading checks every
index file against the manifest, memory-maps what faiss can map (index_store), and sets the tuned nprobe /
efSearch. A Searcher refuses an index built from another bundle's vectors: the scores would be meaningless.

The index also serves its catalog's entries: `item(id)` and `page(offset, limit)` give each entry's uri and
metadata (catalog.py), `matching_ids(filters)` the ids whose metadata match, `source(id)` where its image is and
what the embedding job read there (the format its bytes decoded as and their sha256: a server checks the bytes
it serves against it and names their content type from it, never from the file name). `search(..., allow_ids=...)`
restricts results to a set of ids (e.g. the matching ones) with faiss's own selectors (IDSelectorBatch in
SearchParameters, with the tuned nprobe / efSearch carried in: parameters given replace the index's own). A
filter can leave an approximate index too few candidates where it looks (IVF: the probed lists; HNSW: the visited
part of the graph), so rows left short of k are searched again with a doubled setting, up to an exhaustive one;
HNSW answers a small allowed set (raw vectors up to EXACT_SUBSET_BYTES) by an exact scan of those vectors, since a
graph walk that skips nearly every node finds few of them (measured: 0.5% of 20k allowed, efSearch 256: recall
0.2). faiss GPU indexes take no selector: they fetch more neighbours and keep the allowed ones, at most
GPU_MAX_K per query, so a very selective filter on a GPU index may return fewer than k.

An overlay version (index_refresh.py) leaves its base's dead ids out the same way: a CPU base is searched with
a selector of all but them (IDSelectorNot, made once per loaded index), so a query whose nearest neighbours
are all dead costs one search of k, not a growing over-fetch; a GPU base fetches a margin more than k and asks
again, for the rows left short alone, up to GPU_MAX_K. The delta (the new and changed vectors, stored as the
base's codec reconstructs them) is scanned whole and merged by score.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cirflow.export.runtime import BundleRuntime, ImageInput
from cirflow.indexing import index_store as store
from cirflow.indexing.catalog import METADATA_TYPES, metadata_fields
from cirflow.indexing.faiss_device import GPU_MAX_K, resolve_gpu, set_search_param
from cirflow.indexing.tuning import PAD_SCORE, drop_excluded

log = logging.getLogger(__name__)

VERIFY = ("sha256", "size")
# An allowed set of HNSW vectors up to this size is scanned exactly: index_plan's flat_max_mb default, the size
# an exact scan handles in ~1 ms per query.
EXACT_SUBSET_BYTES = 16 << 20
# The first over-fetch of a GPU index with an allow-list: this many neighbours at least, doubled while rows lack
# allowed ones.
OVERFETCH_MIN = 64


class SearchError(ValueError):
    """A bad search request (k, query shape, exclusion list, filter, id); the message names the argument."""


class UnknownFieldError(SearchError):
    """A metadata filter names a field the index does not have; the message lists the ones it has."""


class UnknownIdError(SearchError):
    """An id that is not in the index's catalog."""


class IndexMismatchError(ValueError):
    """The index was built from another bundle's vectors than the bundle given to search it."""


@dataclass(frozen=True)
class ImageSource:
    """A catalog entry's image: where it is and what the embedding job read there. format and sha256 are None in
    an index built before they were recorded (or from vectors made elsewhere)."""

    uri: str
    format: str | None  # what the bytes decoded as (PIL's name: "PNG", "JPEG", ...)
    sha256: str | None  # hex digest of exactly the bytes that were embedded


@dataclass(frozen=True)
class SearchResult:
    ids: np.ndarray  # (n,) int64 catalog ids, best first; n = k unless the index found fewer
    scores: np.ndarray  # (n,) float32 inner products = cosine similarities (approximate for IVF-PQ)
    uris: list[str]


class VectorIndex:
    """A loaded index directory: (Q, D) query vectors in, the top-k catalog ids and scores out.

    An overlay version (index_refresh.py) answers from its base FAISS files without their dead ids, merged with
    its delta's results (the delta's vectors are stored as the base's codec reconstructs them, so its scores are
    on the base's scale)."""

    def __init__(self, index_dir: Path, manifest: dict[str, Any], index: faiss.Index, on_gpu: bool,
                 ids: np.ndarray, uris: pa.StringArray, dead: np.ndarray | None = None,
                 delta: faiss.Index | None = None, metadata: pa.Table | None = None,
                 sources: pa.Table | None = None) -> None:
        self.index_dir = index_dir
        self.manifest = manifest
        self.index = index  # the base: the whole index unless this is an overlay
        self.on_gpu = on_gpu
        self._ids = ids  # sorted catalog ids, aligned with _uris, _metadata and _sources
        self._uris = uris
        self._sources = sources  # (format, sha256) per id; None: not recorded
        self._dead = np.zeros(0, np.int64) if dead is None else dead
        self._delta = delta
        self._delta_ids = (np.sort(faiss.vector_to_array(delta.id_map)) if delta is not None
                           else np.zeros(0, np.int64))
        self._metadata = metadata if metadata is not None and metadata.num_columns else None
        self._fields = metadata_fields(self._metadata.schema) if self._metadata is not None else {}
        self._subset_parts: list[tuple[np.ndarray, np.ndarray, faiss.Index]] | None = None
        # Made once per loaded index: faiss only reads a selector while it searches, so request threads share
        # it (the SearchParameters that carry it are made per search: IndexIDMap writes into them).
        self._not_dead = faiss.IDSelectorNot(faiss.IDSelectorBatch(self._dead)) if len(self._dead) else None
        self._short_logged = False

    @classmethod
    def open(cls, index_dir: Path, manifest: dict[str, Any], mmap: bool, on_gpu: bool) -> VectorIndex:
        """The index of a verified directory, its base, overlay, uris and metadata (load and index tuning share
        this)."""
        index = store.open_index(index_dir, manifest, mmap=mmap, on_gpu=on_gpu)
        ids, uris = store.read_uris(index_dir)
        dead, delta = store.read_dead(index_dir, manifest), store.open_delta(index_dir, manifest)
        live = index.ntotal - len(dead) + (delta.ntotal if delta is not None else 0)
        if len(ids) != live:
            raise store.IndexFormatError(f"{index_dir}: {store.URIS} lists {len(ids)} ids, the index holds "
                                         f"{live} live vectors")
        return cls(index_dir, manifest, index, on_gpu, ids, uris, dead, delta, store.read_metadata(index_dir),
                   store.read_sources(index_dir))

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

    @property
    def metadata_fields(self) -> dict[str, str]:
        """Metadata column name -> "string", "int", "float" or "bool"; empty for an index without metadata (a
        folder catalog's, or one built before metadata existed)."""
        return dict(self._fields)

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
        queries = self._check_queries(queries)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise SearchError(f"k must be a positive integer, got {k!r}")
        exclude = self._check_exclude(exclude_ids, len(queries))
        allowed = None if allow_ids is None else self._check_allow(allow_ids)
        excluding = bool((exclude >= 0).any())
        kk = min(int(k) + excluding, self.ntotal)
        if self.on_gpu and kk > GPU_MAX_K:
            raise SearchError(f"k={k} is over faiss's GPU limit of {GPU_MAX_K - excluding} results per query")
        if kk == 0:
            return np.empty((len(queries), 0), np.int64), np.empty((len(queries), 0), np.float32)
        scores, ids = self._top(queries, kk) if allowed is None else self._top_allowed(queries, kk, allowed)
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
        return best_k(scores, ids, k)

    def _live_base(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The base's k best per query without its dead ids. A CPU index leaves them out inside faiss (a selector,
        at the tuned setting); a GPU index takes none: it fetches more than k, drops the dead, and asks again
        for the rows left short only, up to GPU_MAX_K."""
        if self._not_dead is None:
            return self.index.search(queries, k)
        want = min(k, self.index.ntotal - len(self._dead))
        if not self.on_gpu:
            return selector_search(self.index, queries, k, self._not_dead, want)
        limit = max(k, min(self.index.ntotal, GPU_MAX_K))
        first = min(limit, k + min(len(self._dead), max(k, 16)))
        scores, ids = overfetch(self.index.search, queries, k, lambda found: ~_members(self._dead, found), want,
                                limit, first)
        if not self._short_logged and ((ids >= 0).sum(axis=1) < want).any():
            self._short_logged = True  # once per loaded index: it says what happened, it is not an alarm
            log.debug("index %s: a query found fewer than %d live base vectors among its %d nearest (dead ids "
                      "crowd that neighbourhood); answered short", self.index_dir.name, want, limit)
        return scores, ids

    def _top_allowed(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k best live vectors per query among `allowed` (sorted catalog ids), padded."""
        # `allowed` holds catalog ids only, so the base's share (those not in an overlay's delta) holds no dead id:
        # its selector leaves the dead out, where an unfiltered search must over-fetch past them.
        in_delta = np.isin(allowed, self._delta_ids, assume_unique=True)
        base = allowed[~in_delta]
        if self.on_gpu:
            limit = min(self.index.ntotal, GPU_MAX_K)
            scores, ids = overfetch_allowed(self.index.search, queries, k, base, limit)
        elif self.manifest["type"] == "hnsw" and len(base) * self.dim * 4 <= EXACT_SUBSET_BYTES:
            scores, ids = self._exact_subset(queries, k, base)
        else:
            scores, ids = filtered_search(self.index, queries, k, base)
        if self._delta is not None and in_delta.any():
            delta_scores, delta_ids = filtered_search(self._delta, queries, k, allowed[in_delta])
            scores, ids = best_k(np.hstack([scores, delta_scores]), np.hstack([ids, delta_ids]), k)
        return scores, ids

    def _exact_subset(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k best among `allowed` by an exact scan of their vectors, read from the HNSW
        base's flat storage (one IndexIDMap part, or one per shard)."""
        if self._subset_parts is None:  # made once, on first use, and published whole (threads may search)
            count = self.index.count() if isinstance(self.index, faiss.IndexShards) else 0
            parts = []
            for part in [self.index.at(i) for i in range(count)] if count else [self.index]:
                part = faiss.downcast_index(part)
                part_ids = faiss.vector_to_array(part.id_map)
                order = np.argsort(part_ids, kind="stable")
                storage = faiss.downcast_index(faiss.downcast_index(part.index).storage)
                parts.append((part_ids[order], order, storage))
            self._subset_parts = parts
        ids, vectors = [], []
        for sorted_ids, order, storage in self._subset_parts:
            pos = np.searchsorted(sorted_ids, allowed).clip(max=max(len(sorted_ids) - 1, 0))
            hit = sorted_ids[pos] == allowed if len(sorted_ids) else np.zeros(len(allowed), bool)
            ids.append(allowed[hit])
            vectors.append(storage.reconstruct_batch(order[pos[hit]]) if hit.any()
                           else np.zeros((0, self.dim), np.float32))
        return top_k(queries @ np.concatenate(vectors).T, np.concatenate(ids), k)

    def matching_ids(self, filters: Mapping[str, Any]) -> np.ndarray:
        """Sorted int64 ids whose metadata match every field of `filters` (AND); a field's value is one scalar or a
        list of scalars (any of them matches; None matches entries without a value). UnknownFieldError for a
        field the index lacks, SearchError for a value that its field's type cannot hold."""
        if not isinstance(filters, Mapping):
            raise SearchError(f"filters must map metadata fields to values, got {type(filters).__name__}")
        match = np.ones(self.ntotal, bool)
        for field, value in filters.items():
            kind = self._fields.get(field)
            if kind is None or self._metadata is None:
                available = ", ".join(sorted(self._fields)) or "none: the index has no metadata"
                raise UnknownFieldError(f"unknown metadata field {field!r}; fields: {available}")
            values = list(value) if isinstance(value, (list, tuple, set, frozenset, np.ndarray)) else [value]
            for v in values:
                if v is not None and not _fits(kind, v):
                    raise SearchError(f"metadata field {field!r} holds {kind} values; {v!r} ({type(v).__name__}) "
                                      "cannot match it")
            try:
                value_set = pa.array(values, METADATA_TYPES[kind])
            except (pa.ArrowInvalid, OverflowError) as e:
                raise SearchError(f"metadata field {field!r} ({kind}): {values!r} cannot match it ({e})") from e
            column = self._metadata.column(field)
            # Nulls match only a None in the values: is_in matches null to null and otherwise says false.
            hit = pc.is_in(column, value_set=value_set).combine_chunks()
            match &= hit.to_numpy(zero_copy_only=False)
        return self._ids[match]

    def item(self, id: int) -> dict[str, Any]:
        """{"id", "uri", then each metadata field (None where the entry has no value)} of a catalog id;
        UnknownIdError when the index does not hold it."""
        row = self._row(id)
        return self._items(row, row + 1)[0]

    def source(self, id: int) -> ImageSource:
        """Where a catalog id's image is and what the embedding job read there; UnknownIdError when the index does
        not hold it."""
        row = self._row(id)
        recorded = self._sources.slice(row, 1).to_pylist()[0] if self._sources is not None else {}
        return ImageSource(self._uris[row].as_py(), recorded.get("format"), recorded.get("sha256"))

    def _row(self, id: int) -> int:
        """The row of a catalog id in _ids; SearchError for what is not an integer, UnknownIdError for an id the
        index does not hold."""
        if isinstance(id, (bool, np.bool_)) or not isinstance(id, (int, np.integer)):
            raise SearchError(f"id must be an integer catalog id, got {id!r}")
        row = int(np.searchsorted(self._ids, id)) if 0 <= id < 2**63 else len(self._ids)
        if row >= len(self._ids) or self._ids[row] != id:
            raise UnknownIdError(f"catalog id {id} is not in index {self.index_dir.name}")
        return row

    def page(self, offset: int, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` items (as item() gives them) in id order from the `offset`-th; empty at the end."""
        for name, value, low in (("offset", offset, 0), ("limit", limit, 1)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
                raise SearchError(f"{name} must be an integer >= {low}, got {value!r}")
        if offset > self.ntotal:
            raise SearchError(f"offset {offset} is past the end of the catalog ({self.ntotal} items)")
        return self._items(int(offset), min(int(offset) + int(limit), self.ntotal))

    def _items(self, start: int, stop: int) -> list[dict[str, Any]]:
        ids = self._ids[start:stop].tolist()
        uris = self._uris.slice(start, stop - start).to_pylist()
        extra = (self._metadata.slice(start, stop - start).to_pylist() if self._metadata is not None
                 else [{}] * len(ids))
        return [{"id": i, "uri": u, **m} for i, u, m in zip(ids, uris, extra)]

    def unknown_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Sorted unique int64 ids among `ids` that the index's catalog does not hold (empty when all are known)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        return ids[~self._held(ids)]

    def _held(self, ids: np.ndarray) -> np.ndarray:
        """Which of the sorted int64 `ids` the catalog holds (a bool mask)."""
        if not len(self._ids):
            return np.zeros(len(ids), bool)
        pos = np.searchsorted(self._ids, ids).clip(max=len(self._ids) - 1)
        return self._ids[pos] == ids

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
        return allowed[self._held(allowed)]

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


def _fits(kind: str, value: Any) -> bool:
    """Whether a filter value can equal a value of a metadata column of this kind."""
    if isinstance(value, (bool, np.bool_)):
        return kind == "bool"
    if kind == "int":
        return isinstance(value, (int, np.integer))
    if kind == "float":
        return isinstance(value, (int, float, np.integer, np.floating))
    return kind == "string" and isinstance(value, str)


def best_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (scores, ids) of each row of row-aligned (Q, m) results, best first; ties keep their order (the
    merge of a base's and a delta's results, or of shards')."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) (Q, k) of the k best columns of scores (Q, m) over ids (m,), best first, padded as faiss
    pads (id -1, PAD_SCORE)."""
    out_scores = np.full((len(scores), k), PAD_SCORE, np.float32)
    out_ids = np.full((len(scores), k), -1, np.int64)
    take = min(k, len(ids))
    if take:
        best = np.argpartition(-scores, take - 1, axis=1)[:, :take] if take < len(ids) else np.broadcast_to(
            np.arange(len(ids)), (len(scores), len(ids)))
        best = np.take_along_axis(best, np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1,
                                                   kind="stable"), axis=1)
        out_scores[:, :take], out_ids[:, :take] = np.take_along_axis(scores, best, axis=1), ids[best]
    return out_scores, out_ids


def search_setting(index: faiss.Index) -> tuple[str | None, int, int]:
    """(name, current value, exhaustive value) of a CPU index's search setting: ("nprobe", nprobe, nlist) for
    IVF, ("efSearch", efSearch, ntotal) for HNSW, (None, 0, 0) for an exact index. A faiss.IndexShards is read
    from its first shard: ParameterSpace sets them all alike."""
    first = faiss.downcast_index(index.at(0)) if isinstance(index, faiss.IndexShards) and index.count() else index
    ivf = faiss.try_extract_index_ivf(first)
    if ivf is not None:
        return "nprobe", int(ivf.nprobe), int(ivf.nlist)
    inner = faiss.downcast_index(first.index) if isinstance(first, faiss.IndexIDMap) else first
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch", int(inner.hnsw.efSearch), int(index.ntotal)
    return None, 0, 0


def filtered_search(index: faiss.Index, queries: np.ndarray, k: int,
                    allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) (Q, k) of a CPU index's k best among `allowed` (sorted ids, all in the index), through a
    faiss selector at the index's own setting (selector_search)."""
    return selector_search(index, queries, k, faiss.IDSelectorBatch(allowed), min(k, len(allowed)))


def selector_search(index: faiss.Index, queries: np.ndarray, k: int, selector: faiss.IDSelector,
                    want: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) (Q, k) of a CPU index's k best among the ids `selector` accepts, at the index's own setting;
    rows short of `want` (at most k: as many as the selector accepts) are searched again with the setting
    doubled, up to an exhaustive one (module docstring)."""
    scores = np.full((len(queries), k), PAD_SCORE, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    if want == 0:
        return scores, ids
    param, value, limit = search_setting(index)
    # The shards of a faiss.IndexShards are searched one by one, each with parameters of its own: IndexIDMap
    # swaps its own id translation into the selector it is given while it searches, so shards searching in
    # parallel with one SearchParameters read each other's ids (seen with faiss 1.15.1).
    count = index.count() if isinstance(index, faiss.IndexShards) else 0
    parts = [faiss.downcast_index(index.at(i)) for i in range(count)] if count else [index]
    rows = np.arange(len(queries))
    while True:
        found = [part.search(queries[rows], k, params=_selector_params(param, value, selector)) for part in parts]
        found_scores, found_ids = np.hstack([f[0] for f in found]), np.hstack([f[1] for f in found])
        found_scores[found_ids < 0] = PAD_SCORE
        if len(parts) > 1:
            found_scores, found_ids = best_k(found_scores, found_ids, k)
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


def overfetch_allowed(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], queries: np.ndarray,
                      k: int, allowed: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) (Q, k) of the k best among `allowed` (sorted ids) from an index that takes no selector
    (faiss GPU): `search(queries, n)` gives the n best of all; rows short of min(k, len(allowed)) allowed ones
    ask again for twice as many, up to `limit` (k <= limit)."""
    return overfetch(search, queries, k, lambda found: _members(allowed, found), min(k, len(allowed)), limit,
                     min(limit, max(2 * k, OVERFETCH_MIN)))


def overfetch(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], queries: np.ndarray, k: int,
              keep: Callable[[np.ndarray], np.ndarray], want: int, limit: int,
              fetch: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) (Q, k) of the k best ids that `keep` (ids -> bool mask) accepts, from an index that takes no
    selector: `search(queries, n)` gives the n best of all, first `fetch` of them; the rows left with fewer than
    `want` kept ones (and those alone) ask again for twice as many, up to `limit` (k <= fetch <= limit), then
    stay short."""
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


def _members(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which of `ids` (any shape) are in `sorted_ids` (sorted, unique): a bool mask of ids' shape, by binary search
    (np.isin would sort the large side on every search)."""
    if not len(sorted_ids):
        return np.zeros(ids.shape, bool)
    pos = np.searchsorted(sorted_ids, ids).clip(max=len(sorted_ids) - 1)
    return sorted_ids[pos] == ids


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

"""The index directory on disk: file names, manifest, verification, the CURRENT pointer, and opening FAISS files.

    indexes/<catalog>/<index_id>/
        index.faiss (+ index.ivfdata)   merge=True: one index; IVF lists merged on disk in index.ivfdata
        shard-00000.faiss ...           merge=False: one index per embedding shard, searched together
        uris.parquet                    id int64, uri string, format string, sha256 string (what the embedding
                                        job read: the format the bytes decoded as and their sha256, null where not
                                        recorded), then the catalog's metadata columns (none in indexes of folder
                                        catalogs), sorted by id; indexes of older cirflow lack format and sha256
                                        (read as nulls) and may lack metadata
        truth.npz                       the tuning queries' exact top lists (ids, scores, excluded id per query)
        rerank.npy                      a re-ranked type only: float16 (N, D), the base's vectors in id order
        delta.faiss, dead.npy, base_ids.npy    an overlay version only (indexing/index/refresh.py)
        shard-00000/ ...                a sharded version only: one index directory per shard, and no FAISS
                                        file of its own (layout "sharded", indexing/index/sharded.py)
        manifest.json                   written last: type, parameters, tuned setting and recall, files + sha256
    indexes/<catalog>/CURRENT           the published index_id, replaced by an atomic rename (indexing/index/versions.py)

Index directories are immutable once renamed into place, so a server may memory-map their files.

Memory mapping in faiss 1.15 (checked in faiss/impl/index_read.cpp and on this machine): IO_FLAG_MMAP_IFC maps
the vector codes of IndexFlat, the storage of HNSW, and the lists of an IVF file ("ilar") through a
MappedFileIOReader, instead of reading them into RAM (the IndexIDMap ids, 8 B/vector, are still read). An IVF
index merged on disk (OnDiskInvertedLists, "ilod") is always memory-mapped; it records the absolute path of its
.ivfdata, and IO_FLAG_ONDISK_SAME_DIR makes faiss look beside the .faiss file instead, which the temp-then-rename
build needs. The two cannot be combined: MMAP_IFC refuses on-disk lists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cirflow.core.files import (
    CURRENT,
    check_files,
    describe_files,
    follow_current,
    read_json,
    write_json_atomic,
)
from cirflow.indexing.embedding.catalog import SOURCE_COLUMNS, metadata_columns
from cirflow.indexing.embedding.shards import read_columns, write_parquet_atomic
from cirflow.indexing.search.placement import to_gpu
from cirflow.indexing.search.rerank import STORE_DTYPE
from cirflow.indexing.search.vector_store import VectorStore

FORMAT = "cirflow-index-v1"
MANIFEST, URIS = "manifest.json", "uris.parquet"
INDEX_FILE, IVFDATA = "index.faiss", "index.ivfdata"
DELTA_FILE, DEAD_FILE, BASE_IDS_FILE = "delta.faiss", "dead.npy", "base_ids.npy"
RERANK_FILE = "rerank.npy"  # search/rerank.py
VECTORS_FILE = "vectors.npy"  # the catalog vectors, for a bundle's re-ranker (search/vector_store.py)
DELTA_VECTORS_FILE = "delta-vectors.npy"  # an overlay's new and changed ones
TRUTH_FILE = "truth.npz"  # the tuning queries' exact top lists over the catalog (build.tune_index)
URIS_SCHEMA = pa.schema([("id", pa.int64()), ("uri", pa.string()), *((name, pa.string()) for name in SOURCE_COLUMNS)])


class IndexFormatError(ValueError):
    """An index directory is missing, incomplete, damaged or of another format; the message names the file."""


SHARDED_LAYOUT = "sharded"  # a version of index shards, each a directory of its own (indexing/index/sharded.py)


def shard_file(shard: int) -> str:
    return f"shard-{shard:05d}.faiss"


def shard_dir(part: int) -> str:
    """An index shard's directory inside a sharded version (not to be confused with shard_file: the FAISS files
    of one index built per embedding shard, merge=False)."""
    return f"shard-{part:05d}"


def write_manifest(index_dir: Path, manifest: dict[str, Any]) -> None:
    """Record every file of the directory and below (size, sha256; a sharded version's shards are directories
    in it) and write the manifest last."""
    names = sorted(name for name in (str(p.relative_to(index_dir)) for p in index_dir.rglob("*") if p.is_file())
                   if name != MANIFEST and not Path(name).name.startswith("."))
    write_json_atomic(index_dir / MANIFEST, {**manifest, "files": describe_files(index_dir, names)}, sort_keys=True)


def read_manifest(index_dir: Path) -> dict[str, Any]:
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise IndexFormatError(f"{index_dir}: no {MANIFEST}; not a built index directory (build it with "
                               "`cirflow index build`)")
    manifest = read_json(path, IndexFormatError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{path}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}"
                               f" is not {FORMAT!r}")
    return manifest


def verify_index(index_dir: Path, checksums: bool = True) -> dict[str, Any]:
    """The manifest, after checking every listed file's size (and sha256 with `checksums`)."""
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    problem = check_files(index_dir, manifest["files"], checksums)
    if problem:
        raise IndexFormatError(f"index {index_dir}: {problem} (truncated, damaged or replaced)")
    return manifest


def resolve_index_dir(path: Path) -> Path:
    """An index directory as given, or the one a catalog directory's CURRENT names."""
    path = Path(path)
    current = follow_current(path, IndexFormatError)
    if current is not None:
        return current
    if not (path / MANIFEST).is_file():
        raise IndexFormatError(f"{path}: neither an index directory ({MANIFEST}) nor a catalog directory with "
                               f"{CURRENT}")
    return path


def write_uris(index_dir: Path, sources: pa.Table, metadata: pa.Table | None = None) -> None:
    """id -> uri, format, sha256 (and metadata) for the whole catalog, sorted by id. sources: the embedded rows'
    (id, uri, format, sha256) (EmbeddingSnapshot.read_sources), ids unique; metadata: (id, then its columns) rows of the
    snapshot's catalog (EmbeddingSnapshot.read_metadata), a row for every id at least."""
    table = sources.select(URIS_SCHEMA.names).cast(URIS_SCHEMA).sort_by("id")
    ids = table.column("id").to_numpy()
    if len(ids) > 1 and bool((ids[1:] == ids[:-1]).any()):
        dup = int(ids[1:][ids[1:] == ids[:-1]][0])
        raise IndexFormatError(f"catalog id {dup} occurs in more than one embedding row; ids must be unique")
    if metadata is not None and metadata.num_columns > 1:
        metadata = metadata.sort_by("id")
        known = metadata.column("id").to_numpy()
        rows = np.searchsorted(known, ids).clip(max=max(len(known) - 1, 0))
        missing = ids[known[rows] != ids] if len(known) else ids
        if len(missing):
            raise IndexFormatError(f"catalog ids {missing[:5].tolist()} have vectors but no metadata row")
        taken = metadata.take(pa.array(rows, pa.int64()))
        for field in metadata.schema:
            if field.name != "id":
                table = table.append_column(field, taken.column(field.name))
    write_parquet_atomic(table, index_dir / URIS)


def read_uris(index_dir: Path) -> tuple[np.ndarray, pa.StringArray]:
    """(ids sorted int64, uris in the same order); uris stay an Arrow array, compact for millions of rows."""
    table = pq.read_table(Path(index_dir) / URIS, columns=["id", "uri"])
    return table.column("id").to_numpy(), table.column("uri").combine_chunks()


def read_sources(index_dir: Path) -> pa.Table:
    """The format and sha256 columns of uris.parquet, row for row with read_uris; nulls in an index built before
    they were recorded."""
    return read_columns(Path(index_dir) / URIS, list(SOURCE_COLUMNS))


def read_metadata(index_dir: Path) -> pa.Table:
    """The metadata columns of uris.parquet, row for row with read_uris; a table without columns for an index
    without metadata."""
    path = Path(index_dir) / URIS
    return pq.read_table(path, columns=metadata_columns(pq.read_schema(path)))


def read_faiss(path: Path, layout: str, mmap: bool) -> faiss.Index:
    """One FAISS file, memory-mapped where the format allows (module docstring)."""
    if layout == "ondisk":
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY  # lists are mapped whatever `mmap` says
    else:
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as e:  # faiss raises RuntimeError for unreadable, truncated or foreign files
        raise IndexFormatError(f"{path}: faiss cannot read it ({str(e).splitlines()[0]})") from e
    if layout == "ondisk":
        # OnDiskInvertedLists starts prefetch_nthread (32) threads on every search to page lists in; for
        # single queries that thread start-up dominated (IVF-Flat at 10k: p50 0.44 -> 0.03 ms without it).
        # The page cache serves a mapped index that fits in memory; one that does not is IO-bound either way.
        faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).prefetch_nthread = 0
    return index


def open_index(index_dir: Path, manifest: dict[str, Any], mmap: bool = True, on_gpu: bool = False) -> faiss.Index:
    """The index's FAISS files as one searchable index: shards become a faiss.IndexShards that merges their
    top-k (threaded, each shard keeping its catalog ids); `on_gpu` copies each onto the GPUs."""
    parts = [read_faiss(Path(index_dir) / name, manifest["layout"], mmap) for name in manifest["index_files"]]
    if on_gpu:
        parts = [to_gpu(part, manifest["type"]) for part in parts]
    if len(parts) == 1:
        return parts[0]
    shards = faiss.IndexShards(int(manifest["embed_dim"]), True, False)
    for part in parts:
        shards.add_shard(part)  # faiss's wrapper keeps a reference to each part
    return shards


def open_rerank_store(index_dir: Path, manifest: dict[str, Any]) -> np.ndarray | None:
    """The float16 re-rank store of a re-ranked index, memory-mapped read-only; None for other types."""
    if not manifest.get("rerank"):
        return None
    return _stored_rows(Path(index_dir) / RERANK_FILE, int(manifest["embed_dim"]), STORE_DTYPE)


def open_vector_store(index_dir: Path, manifest: dict[str, Any]) -> VectorStore | None:
    """The catalog vectors kept for a bundle's re-ranker (the manifest's "vectors"), memory-mapped read-only:
    the base's rows, and an overlay's delta rows before them; None when the index keeps none."""
    section = manifest.get("vectors")
    if not section:
        return None
    dim = int(manifest["embed_dim"])
    parts = []
    if manifest.get("overlay"):
        delta = open_delta(index_dir, manifest)
        assert delta is not None
        parts.append((np.sort(faiss.vector_to_array(delta.id_map)),
                      _stored_rows(Path(index_dir) / DELTA_VECTORS_FILE, dim, np.float32)))
    parts.append((read_base_ids(index_dir, manifest), _stored_rows(Path(index_dir) / section["file"], dim, np.float32)))
    for ids, rows in parts:
        if len(ids) != len(rows):
            raise IndexFormatError(f"{index_dir}: a vector store holds {len(rows)} rows for {len(ids)} ids")
    return VectorStore(parts)


def _stored_rows(path: Path, dim: int, dtype: Any) -> np.ndarray:
    """An (N, dim) .npy of `dtype` (a row store: build.RowStoreWriter), memory-mapped read-only."""
    try:
        rows = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"{path}: not a readable .npy file ({e})") from e
    if rows.dtype != dtype or rows.ndim != 2 or rows.shape[1] != dim:
        raise IndexFormatError(f"{path}: holds {rows.dtype} {rows.shape}, not {np.dtype(dtype).name} (N, {dim})")
    return rows


def read_base_ids(index_dir: Path, manifest: dict[str, Any]) -> np.ndarray:
    """Sorted ids the index's base FAISS files hold: all of its ids, unless it is an overlay."""
    if manifest.get("overlay"):
        return np.load(Path(index_dir) / BASE_IDS_FILE)
    return read_uris(index_dir)[0]


def read_dead(index_dir: Path, manifest: dict[str, Any]) -> np.ndarray:
    """Sorted ids whose base vectors search must skip (an overlay's removed and changed ids); empty otherwise."""
    if manifest.get("overlay"):
        return np.load(Path(index_dir) / DEAD_FILE)
    return np.zeros(0, np.int64)


def open_delta(index_dir: Path, manifest: dict[str, Any]) -> faiss.Index | None:
    """An overlay's flat index of its new and changed vectors, stored as the base's codec reconstructs them
    (indexing/index/refresh.py); None for a full build."""
    if not manifest.get("overlay"):
        return None
    return read_faiss(Path(index_dir) / DELTA_FILE, "single", mmap=False)

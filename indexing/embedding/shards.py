"""The embedding snapshot format: Parquet shards with an explicit schema, an errors table, and the run manifest.

An embedding snapshot (one snapshot of a catalog, indexing/embedding/job.py) lives in `embeddings/<catalog>/<bundle_id>/<snapshot>/`
under a local path or any fsspec URI (core/files.py `location`: every function here takes either);
the bundle directory's CURRENT names the latest complete one, and `open_snapshot` follows it:

    catalog.parquet          id int64, uri string, version string, then the catalog's metadata columns (indexing/embedding/catalog.py):
                             the catalog state this snapshot embeds; index builds take the metadata from it
    changes.parquet          id int64, change string (added, changed, removed): against the previous snapshot
    part-00000.parquet ...   id int64, uri string, embedding fixed_size_list<float32, D>, bundle_id string,
                             format string, sha256 string: the format the image's bytes decoded as (PIL's name)
                             and the sha256 of exactly those bytes, carried over with the vector; null in shards
                             written before they were recorded (those lack the columns) and in runs written from
                             vectors made elsewhere
    errors.parquet           id int64, uri string, reason string, transient bool (written when the run completes);
                             transient: the read failed for a reason of the moment (indexing/embedding/embed_stages.py), the next run
                             reads it again. Files written before the column existed read as all permanent.
    _errors/part-00000.parquet   the same rows, per shard (kept: a damaged errors.parquet is merged again)
    manifest.json            catalog fingerprint, bundle id, shard plan, finished shards (rows, bytes, sha256 of
                             the shard and of its errors file, errors and transient counts), errors.parquet's size
                             and sha256, errors and transient_errors (the snapshot's counts), complete

Shard k holds the catalog entries k*rows_per_shard ... (k+1)*rows_per_shard - 1 in id order, so a shard's
membership never depends on scheduling: a rerun redoes exactly the shards the manifest does not list as
finished, and the union of rows is the same whatever was interrupted. Every file is written under a temp name
and renamed; the manifest is updated after the shard's files are in place, so it never lists a missing file
that nobody deleted. A file deleted or changed afterwards is found by `damaged_shards` (the job redoes its shard).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cirflow.core.files import (
    check_files,
    follow_current,
    location,
    read_json,
    sha256_file,
    write_atomic,
    write_json_atomic,
)
from cirflow.indexing.embedding.catalog import SOURCE_COLUMNS, metadata_columns

if TYPE_CHECKING:
    from cirflow.core.files import Location

FORMAT = "cirflow-embeddings-v1"
MANIFEST = "manifest.json"
CATALOG = "catalog.parquet"
CHANGES = "changes.parquet"
ERRORS = "errors.parquet"
SHARD_ERRORS_DIR = "_errors"
ERROR_SCHEMA = pa.schema([("id", pa.int64()), ("uri", pa.string()), ("reason", pa.string()),
                          ("transient", pa.bool_())])


class EmbeddingsError(ValueError):
    """An embedding snapshot is missing, incomplete, damaged or from another bundle; the message names the file."""


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.int64()), ("uri", pa.string()), ("embedding", pa.list_(pa.float32(), dim)),
                      ("bundle_id", pa.string()), *((name, pa.string()) for name in SOURCE_COLUMNS)])


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def embedding_table(ids: np.ndarray, uris: list[str], vectors: np.ndarray, bundle_id: str,
                    formats: list[str | None] | None = None, sha256s: list[str | None] | None = None) -> pa.Table:
    """Rows sorted by id, in the explicit schema (fixed-size lists, not Ray's tensor extension type). formats,
    sha256s: per row (None: unknown, e.g. vectors made elsewhere)."""
    order = np.argsort(ids, kind="stable")
    vectors = np.ascontiguousarray(vectors[order], dtype=np.float32)
    n, dim = vectors.shape
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
    sources = [pa.nulls(n, pa.string()) if values is None else pa.array([values[i] for i in order], pa.string())
               for values in (formats, sha256s)]
    return pa.table([pa.array(ids[order], pa.int64()), pa.array([uris[i] for i in order], pa.string()),
                     embedding, pa.array([bundle_id] * n, pa.string()), *sources], schema=embedding_schema(dim))


def error_table(ids: np.ndarray, uris: list[str], reasons: list[str],
                transient: np.ndarray | None = None) -> pa.Table:
    """Rows sorted by id; `transient` (bool per row) marks failures of the moment (None: every one permanent)."""
    order = np.argsort(ids, kind="stable")
    transient = np.zeros(len(ids), bool) if transient is None else np.asarray(transient, bool)
    return pa.table([pa.array(ids[order], pa.int64()), pa.array([uris[i] for i in order], pa.string()),
                     pa.array([reasons[i] for i in order], pa.string()), pa.array(transient[order], pa.bool_())],
                    schema=ERROR_SCHEMA)


def read_errors(path: Location, filters: Any = None) -> pa.Table:
    """An errors file (a snapshot's errors.parquet or a shard's) in ERROR_SCHEMA; one written before failures
    were classified has no `transient` column, and each of its rows reads as permanent."""
    names = parquet_file(path).schema_arrow.names
    table = read_table(path, columns=[c for c in ERROR_SCHEMA.names if c in names], filters=filters)
    if "transient" not in names:
        table = table.append_column("transient", pa.array(np.zeros(table.num_rows, bool)))
    return table.select(ERROR_SCHEMA.names).cast(ERROR_SCHEMA)


def transient_errors(manifest: dict[str, Any]) -> int:
    """How many of a snapshot's errors rows are transient (read again by the next run: indexing/embedding/job.py makes a retry
    snapshot of an unchanged catalog for them); 0 for a manifest written before failures were classified."""
    return int(manifest.get("transient_errors", 0))


def write_parquet_atomic(table: pa.Table, path: Location, row_group_size: int | None = None) -> dict[str, Any]:
    """Write under a temp name, rename into place; returns {"rows", "bytes", "sha256"} of the final file,
    taken from the temp file before it is published (a remote file is not downloaded again to hash it)."""
    described: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        pq.write_table(table, tmp, row_group_size=row_group_size)
        described.update(rows=table.num_rows, bytes=tmp.stat().st_size, sha256=sha256_file(tmp))

    write_atomic(path, write)
    return described


def new_manifest(bundle_id: str, dim: int, catalog: dict[str, Any], rows_per_shard: int,
                 num_shards: int, reranks: bool = False) -> dict[str, Any]:
    """The manifest of a run that has not finished a shard. `catalog`: name, source, entries, fingerprint.
    reranks: the bundle carries a re-ranker, which scores candidates from their catalog vectors: the run's
    indexes keep them (indexing/index/build.py)."""
    return {"format": FORMAT, "bundle_id": bundle_id, "embed_dim": dim, "catalog": catalog,
            "rows_per_shard": rows_per_shard, "num_shards": num_shards, "shards": {}, "rows": 0, "errors": 0,
            "transient_errors": 0, "complete": False, **({"reranks": True} if reranks else {})}


def record_shard(manifest: dict[str, Any], name: str, info: dict[str, Any],
                 errors_info: dict[str, Any] | None, transient: int = 0) -> None:
    """Add a finished shard: {"rows", "bytes", "sha256"} of its Parquet file and, when some of its entries
    failed, of its errors file (None when none did), `transient` of them for a reason of the moment."""
    errors = {"errors": errors_info["rows"], "errors_file": errors_info} if errors_info else {"errors": 0}
    manifest["shards"][name] = {**info, **errors, "transient": transient}
    _count_rows(manifest)


def drop_shard(manifest: dict[str, Any], name: str) -> None:
    """Forget a finished shard (its files are damaged): the run is incomplete until it is redone."""
    del manifest["shards"][name]
    manifest["complete"] = False
    manifest.pop("errors_file", None)
    _count_rows(manifest)


def _count_rows(manifest: dict[str, Any]) -> None:
    manifest["rows"] = sum(s["rows"] for s in manifest["shards"].values())
    manifest["errors"] = sum(s["errors"] for s in manifest["shards"].values())
    manifest["transient_errors"] = sum(s.get("transient", 0) for s in manifest["shards"].values())


def write_snapshot(snapshot_dir: Location, parts: Iterable[tuple[np.ndarray, np.ndarray, list[str]]], bundle_id: str,
              catalog: dict[str, Any], rows_per_shard: int, reranks: bool = False) -> "EmbeddingSnapshot":
    """A complete run from vectors already in memory, one shard per (ids, vectors, uris) part: vectors made
    elsewhere (benchmark catalogs, tests). The manifest, written last, marks it complete; ids must be unique.
    reranks: as new_manifest's."""
    manifest = None
    seen: set[int] = set()
    for k, (ids, vectors, uris) in enumerate(parts):
        seen.update(ids.tolist())
        if manifest is None:
            manifest = new_manifest(bundle_id, vectors.shape[1], catalog, rows_per_shard, 0, reranks)
        info = write_parquet_atomic(embedding_table(ids, uris, vectors, bundle_id), snapshot_dir / shard_name(k))
        record_shard(manifest, shard_name(k), info, None)
    if manifest is None:
        raise EmbeddingsError(f"{snapshot_dir}: no parts to write")
    if len(seen) != manifest["rows"]:
        raise EmbeddingsError(f"{snapshot_dir}: {manifest['rows'] - len(seen)} duplicate ids among the parts")
    manifest["num_shards"] = len(manifest["shards"])
    manifest["complete"] = True
    write_manifest(snapshot_dir, manifest)
    return open_snapshot(snapshot_dir)


def damaged_shards(snapshot_dir: Location, manifest: dict[str, Any]) -> dict[str, str]:
    """Recorded shard name -> what is wrong with its files (missing, another size or sha256: its Parquet file or,
    when it had errors, its errors file), for each recorded shard that fails the check."""
    damaged = {}
    for name, info in sorted(manifest["shards"].items()):
        files = {name: info}
        errors_path = f"{SHARD_ERRORS_DIR}/{name}"
        if info["errors"] and "errors_file" in info:
            files[errors_path] = info["errors_file"]
        elif info["errors"] and not (snapshot_dir / errors_path).is_file():
            # Runs written before errors files were recorded list only the count: the file must at least exist.
            damaged[name] = f"file {errors_path} of the shard's {info['errors']} errors is missing"
            continue
        problem = check_files(snapshot_dir, files)
        if problem:
            damaged[name] = problem
    return damaged


def write_manifest(snapshot_dir: Location, manifest: dict[str, Any]) -> None:
    write_json_atomic(snapshot_dir / MANIFEST, manifest, sort_keys=True)


def read_manifest(snapshot_dir: Location | str) -> dict[str, Any] | None:
    """The run's manifest, or None when the run has not started."""
    path = location(snapshot_dir) / MANIFEST
    if not path.exists():
        return None
    manifest = read_json(path, EmbeddingsError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise EmbeddingsError(f"{path}: format {found!r} is not {FORMAT!r}")
    return manifest


@dataclass(frozen=True)
class EmbeddingSnapshot:
    """A complete, verified embedding snapshot: what index building and search read."""

    snapshot_dir: Location  # a local path, or a URI's UPath
    manifest: dict[str, Any]

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def reranks(self) -> bool:
        """Its bundle re-ranks search results from the catalog vectors: indexes keep them (new_manifest)."""
        return bool(self.manifest.get("reranks", False))

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def shard_files(self) -> list[Location]:
        return [self.snapshot_dir / name for name in sorted(self.manifest["shards"])]

    def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """(ids int64 (n,), vectors float32 (n, D), uris) per shard, in shard order."""
        for path in self.shard_files:
            yield read_shard(path, self.dim)

    def read_sources(self) -> pa.Table:
        """Every row's id, uri, format and sha256 (null where not recorded), in shard order, without the vectors."""
        columns = ["id", "uri", *SOURCE_COLUMNS]
        tables = [read_columns(path, columns) for path in self.shard_files]
        if not tables:
            return pa.schema([embedding_schema(self.dim).field(name) for name in columns]).empty_table()
        return pa.concat_tables(tables)

    def read_metadata(self) -> pa.Table | None:
        """The catalog's metadata as (id, then each metadata column) rows of catalog.parquet, checked against the
        manifest when the run was opened; None when it has none (a folder catalog, a run written from vectors
        made elsewhere, a snapshot of an older cirflow)."""
        path = self.snapshot_dir / CATALOG
        if not path.is_file():
            return None
        names = metadata_columns(parquet_file(path).schema_arrow)
        return read_table(path, columns=["id", *names]) if names else None

    def partition(self, part: int, parts: int) -> SnapshotPart:
        """The rows whose catalog id falls in `part` of `parts` (part_of), as a snapshot of their own (an index
        shard's input)."""
        if not 0 <= part < parts:
            raise EmbeddingsError(f"partition {part} of {parts} does not exist")
        rows = sum(int((part_of(read_columns(path, ["id"]).column("id").to_numpy(), parts) == part).sum())
                   for path in self.shard_files)
        manifest = {**self.manifest, "rows": rows, "partition": {"part": part, "parts": parts}}
        return SnapshotPart(self.snapshot_dir, manifest, part, parts)

    def read_all(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        parts = list(self.iter_shards())
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32), []
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                [u for p in parts for u in p[2]])


# Fibonacci hashing: 2**64 / golden ratio, odd; the product's high bits mix every bit of the id.
_MIX = np.uint64(0x9E3779B97F4A7C15)


def part_of(ids: np.ndarray, parts: int) -> np.ndarray:
    """The partition (0 .. parts-1) of each catalog id: a hash of the id, not id % parts, so that ids with a
    common stride (1000, 2000, ...; ids all odd) still spread over every part."""
    with np.errstate(over="ignore"):
        mixed = np.asarray(ids, dtype=np.int64).astype(np.uint64) * _MIX
    return ((mixed >> np.uint64(32)) % np.uint64(parts)).astype(np.int64)


@dataclass(frozen=True)
class SnapshotPart(EmbeddingSnapshot):
    """The rows of a snapshot whose catalog id falls in `part` (EmbeddingSnapshot.partition); its manifest says
    so under "partition", with the part's row count."""

    part: int = 0
    parts: int = 1

    def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        for ids, vectors, uris in super().iter_shards():
            keep = part_of(ids, self.parts) == self.part
            yield ids[keep], vectors[keep], [u for u, k in zip(uris, keep.tolist()) if k]

    def read_sources(self) -> pa.Table:
        table = super().read_sources()
        return table.filter(pa.array(part_of(table.column("id").to_numpy(), self.parts) == self.part))

    def read_metadata(self) -> pa.Table | None:
        table = super().read_metadata()
        return None if table is None else table.filter(
            pa.array(part_of(table.column("id").to_numpy(), self.parts) == self.part))


def open_snapshot(snapshot_dir: Location | str, verify: bool = True) -> EmbeddingSnapshot:
    """Open a finished run (a snapshot directory, or the bundle directory whose CURRENT names one; a local path
    or a URI); `verify` checks every shard's and the catalog file's size and sha256 against the manifest."""
    snapshot_dir = location(snapshot_dir)
    snapshot_dir = follow_current(snapshot_dir, EmbeddingsError) or snapshot_dir
    manifest = read_manifest(snapshot_dir)
    if manifest is None:
        raise EmbeddingsError(f"{snapshot_dir}: no {MANIFEST}; run the embedding job first")
    if not manifest.get("complete"):
        done, total = len(manifest.get("shards", {})), manifest.get("num_shards")
        raise EmbeddingsError(f"{snapshot_dir}: the embedding snapshot is incomplete ({done}/{total} shards); rerun the "
                              "embedding job to finish it")
    recorded = {**manifest["shards"], **manifest.get("catalog_file", {}), **manifest.get("changes_file", {})}
    problem = check_files(snapshot_dir, recorded) if verify else None
    if problem:
        raise EmbeddingsError(f"embedding snapshot {snapshot_dir}: {problem} (damaged or replaced)")
    return EmbeddingSnapshot(snapshot_dir, manifest)


def read_table(path: Location, **kwargs: Any) -> pa.Table:
    """pq.read_table of a local or remote file (`columns`, `filters`, ...)."""
    if isinstance(path, Path):
        return pq.read_table(path, **kwargs)
    return pq.read_table(path.path, filesystem=path.fs, **kwargs)


def parquet_file(path: Location) -> pq.ParquetFile:
    return pq.ParquetFile(path if isinstance(path, Path) else path.fs.open(path.path, "rb"))


def read_rows(path: Location, lo: int, hi: int, columns: list[str]) -> pa.Table:
    """Rows lo..hi-1 of a Parquet file, reading only the row groups that hold them (a snapshot's catalog file
    has one row group per shard)."""
    file = parquet_file(path)
    groups, start = [], 0
    for i in range(file.metadata.num_row_groups):
        end = start + file.metadata.row_group(i).num_rows
        if start < hi and end > lo:
            groups.append((i, start))
        start = end
    if not groups:
        return file.schema_arrow.empty_table().select(columns)
    table = file.read_row_groups([i for i, _ in groups], columns=columns)
    first = groups[0][1]
    return table.slice(lo - first, hi - lo)


def id_range(path: Location) -> tuple[int | None, int | None]:
    """(smallest, largest) id of a shard from its Parquet statistics, without reading it; (None, None) when
    empty."""
    metadata = parquet_file(path).metadata
    column = metadata.schema.to_arrow_schema().get_field_index("id")
    lows, highs = [], []
    for i in range(metadata.num_row_groups):
        group = metadata.row_group(i)
        stats = group.column(column).statistics
        if group.num_rows and (stats is None or not stats.has_min_max):
            ids = read_table(path, columns=["id"]).column("id").to_numpy()  # a writer that kept no statistics
            return int(ids.min()), int(ids.max())
        if group.num_rows:
            lows.append(stats.min)
            highs.append(stats.max)
    return (min(lows), max(highs)) if lows else (None, None)


def read_shard(path: Location, dim: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    table = read_table(path, columns=["id", "uri", "embedding"])
    return table.column("id").to_numpy(), shard_vectors(table, dim, path), table.column("uri").to_pylist()


def shard_vectors(table: pa.Table, dim: int, path: Location) -> np.ndarray:
    """The (n, dim) float32 vectors of a shard's `embedding` column (read from `path`, which errors name)."""
    column = table.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(column.type) or column.type.list_size != dim:
        raise EmbeddingsError(f"{path}: embedding column is {column.type}, expected fixed_size_list<float, {dim}>")
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def read_columns(path: Location, columns: list[str]) -> pa.Table:
    """These columns of a Parquet file (a shard, an index's uris.parquet); SOURCE_COLUMNS, which files written
    before they were recorded lack, read as nulls there."""
    names = parquet_file(path).schema_arrow.names
    table = read_table(path, columns=[c for c in columns if c in names])
    for name in columns:
        if name not in names and name in SOURCE_COLUMNS:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    return table.select(columns)


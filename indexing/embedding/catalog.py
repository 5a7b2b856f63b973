"""Catalogs: what to embed, as a table of (id, uri) rows with stable ids, and how to read one entry's bytes.

Two sources: an image folder or a manifest (Parquet or CSV with `id` and `uri` columns: the ids are the shop's
own). Ids are never row numbers.

A manifest's other columns (all but `id`, `uri` and `version`) are the entries' **metadata** (a `category`, a
`price`): scalar columns only, stored as string, int64, float64 or bool (dictionary-encoded columns, e.g. pandas
categoricals, are decoded; an all-empty CSV column is a string column), nulls allowed. CSV gives no types:
integers, floats and booleans are inferred, everything else (dates included) stays the text as written. They
travel with the catalog's state (`fingerprint`) into each embedding snapshot and index version, so a change of
metadata alone makes a new snapshot (whose vectors are all reused) and a new index version. Folder catalogs have
none. A metadata column may not take a RESERVED_NAMES name: `format` and `sha256` are what the embedding job
records of each image, `image` and `index_id` fields the search service adds to an item's JSON (where the
column's values would be overwritten).

A folder catalog lists every non-hidden entry under the folder that is not a directory, so that each one ends
up embedded or in the job's errors table, never silently dropped:
- files, whatever their content (a non-image becomes an errors row);
- symlinks, each an entry under its own path whatever it points at: a link to another entry is embedded twice,
  under two ids, as `ls` shows two names; a dangling or looping link, or a link to a directory (never followed,
  so a link cannot make the listing loop), becomes an errors row when read;
- not FIFOs, sockets or devices: reading one can block forever, so they are left out with a warning each.
An entry's id is a hash of its path relative to the folder (the raw bytes of a name that is not valid UTF-8),
so it survives re-listing, catalog growth and re-embedding. A directory that cannot be listed stops the job:
its entries would otherwise be missing without a trace.

URIs are local paths (relative ones in a manifest are relative to the manifest's folder), `file://` URIs, or
any fsspec URI whose scheme's package is installed (s3fs for s3://, gcsfs for gs://, ...). A folder entry whose
name is not valid UTF-8 (Parquet strings must be) gets a `file://` URI percent-encoding its raw bytes, which
read_bytes decodes back to the same file; every other folder entry's uri is its absolute path.

Every entry also gets a `version`: a string that changes when its image does, so that a refresh of the catalog
re-embeds only new and changed entries (indexing/embedding/job.py). A manifest may bring its own (column `version`: an
ETag, a content hash, an updated-at stamp); otherwise `change_key` decides: "stat" (default) is the size and the
modification time in nanoseconds (for fsspec URIs: the ETag, else size and mtime that the store reports): one
metadata call per entry, never a read, so a refresh of a large catalog costs a listing, not a pass over its
bytes. It misses only a rewrite that keeps the size and restores the mtime to the nanosecond (a deliberate
`touch -d`, or a copy with preserved times of a same-sized picture): "sha256" hashes every entry's bytes
instead, at the cost of reading the whole catalog on every refresh. An entry that cannot be stat'ed or read
gets the version "unreadable": its read fails again in the job and becomes an errors row. Hashing streams the
bytes (a huge file costs time, not memory) and never opens what is not a regular file (a FIFO would block).

read_bytes reads an image for the embedding job through the image gate (models/images.py) when given its
ImageLimits: a file that is not a regular file or is over the size limit is refused before it is read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote_to_bytes, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cirflow.core.config import check_choice
from cirflow.models.images import ImageLimits, open_regular, read_file, read_stream, shown

log = logging.getLogger(__name__)

CATALOG_SCHEMA = pa.schema([("id", pa.int64()), ("uri", pa.string()), ("version", pa.string())])
# What the embedding job records of each embedded image beside its uri (indexing/embedding/shards.py, indexing/search/index_store.py): the format
# its bytes decoded as (PIL's name) and their sha256. Not metadata.
SOURCE_COLUMNS = ("format", "sha256")
# Names no metadata column may take: the catalog's own columns, SOURCE_COLUMNS, and the fields the search service
# adds to an item's JSON (indexing/service/app.py), which would overwrite the column's values there.
RESERVED_NAMES = (*CATALOG_SCHEMA.names, *SOURCE_COLUMNS, "image", "index_id")
# Metadata column types by the name search reports them under (Entries.fields).
METADATA_TYPES = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
CHANGE_KEYS = ("stat", "sha256")
UNREADABLE = "unreadable"
# Metadata calls (and sha256 reads) overlap well on network file systems and object stores; local disks do not mind.
VERSION_THREADS = 16


class CatalogError(ValueError):
    """A catalog source is missing or malformed; the message names the file, row or id."""


@dataclass(frozen=True)
class CatalogConfig:
    name: str = ""  # the catalog's name in embeddings/<name>/ and indexes/<name>/
    folder: str | None = None  # an image folder ...
    # ... or a Parquet/CSV file with `id` and `uri` columns, and metadata columns (exactly one of the two)
    manifest: str | None = None
    # How an entry's version is found when the manifest has no `version` column: "stat" or "sha256" (module doc).
    change_key: str = "stat"

    def __post_init__(self) -> None:
        check_choice(self.change_key, "catalog.change_key", CHANGE_KEYS)

    def check(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"catalog name {self.name!r} must be a non-empty directory name")
        if (self.folder is None) == (self.manifest is None):
            raise ValueError("give exactly one of catalog.folder and catalog.manifest")

    @property
    def source(self) -> str:
        return str(Path(self.folder or self.manifest or "").resolve())


def stable_id(key: str) -> int:
    """A 63-bit non-negative id from a key string: independent of listing order, machine and run. A key from a
    file name that is not valid UTF-8 (surrogate escapes, as os.listdir returns it) hashes as the raw bytes."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "big") >> 1


def load_catalog(config: CatalogConfig) -> pa.Table:
    """(id int64, uri string, version string, then the manifest's metadata columns) rows sorted by id; ids
    unique. Raises CatalogError naming what is wrong."""
    config.check()
    if config.folder:
        table = _list_folder(Path(config.folder), config.change_key)
    else:
        table = _read_manifest(Path(config.manifest or ""))
    if "version" not in table.column_names:
        versions = entry_versions(table.column("uri").to_pylist(), config.change_key)
        table = table.append_column("version", pa.array(versions, pa.string()))
    metadata = metadata_columns(table.schema)
    table = table.select(CATALOG_SCHEMA.names + metadata).cast(pa.schema([*CATALOG_SCHEMA, *(
        table.schema.field(name) for name in metadata)]))
    if table.num_rows == 0:
        raise CatalogError(f"catalog {config.name!r} ({config.source}) has no entries")
    table = table.sort_by("id")
    ids = table.column("id").to_numpy()
    dup = np.flatnonzero(ids[1:] == ids[:-1])
    if len(dup):
        i = int(dup[0])
        uris = table.column("uri")
        raise CatalogError(f"catalog {config.name!r}: id {ids[i]} appears more than once ({uris[i]} and "
                           f"{uris[i + 1]}); ids must be unique")
    return table


def fingerprint(table: pa.Table) -> str:
    """A hash of the (id, uri, version) rows and the metadata columns (load_catalog's table): the catalog's
    state, which names its embedding snapshot. A catalog without metadata hashes as before metadata existed, so
    its snapshots keep their names."""
    digest = hashlib.sha256()
    for column in CATALOG_SCHEMA.names:
        if column not in table.column_names:
            continue
        for buffer in table.column(column).combine_chunks().buffers():
            if buffer is not None:
                digest.update(buffer)
    metadata = metadata_digest(table)
    if metadata is not None:
        digest.update(metadata.encode())
    return digest.hexdigest()[:16]


def metadata_columns(schema: pa.Schema) -> list[str]:
    """The metadata column names of a catalog table (or of an index's items), in their order: all but the
    catalog's own columns and SOURCE_COLUMNS."""
    return [name for name in schema.names if name not in CATALOG_SCHEMA.names and name not in SOURCE_COLUMNS]


def metadata_fields(schema: pa.Schema) -> dict[str, str]:
    """Metadata column name -> its METADATA_TYPES name ("string", "int", "float", "bool")."""
    names = {str(t): name for name, t in METADATA_TYPES.items()}
    return {name: names.get(str(schema.field(name).type), str(schema.field(name).type))
            for name in metadata_columns(schema)}


def metadata_digest(table: pa.Table) -> str | None:
    """A sha256 of the metadata columns (names, types, nulls and values, row by row), None when there are none.
    Computed from values, never from raw Arrow buffers: a null's slot and a sliced array's buffers may hold
    anything."""
    names = metadata_columns(table.schema)
    if not names:
        return None
    digest = hashlib.sha256()
    digest.update(table.column("id").combine_chunks().to_numpy(zero_copy_only=False).tobytes())
    for name in names:
        column = table.column(name).combine_chunks()
        if pa.types.is_large_string(column.type):
            column = column.cast(pa.string())
        digest.update(f"\0{name}\0{column.type}\0".encode())
        digest.update(pc.is_null(column).to_numpy(zero_copy_only=False).tobytes())
        if pa.types.is_string(column.type):
            filled = pc.fill_null(column, "")
            offsets = np.frombuffer(filled.buffers()[1], np.int32)[filled.offset:filled.offset + len(filled) + 1]
            digest.update(np.diff(offsets).tobytes())
            data = filled.buffers()[2]
            if data is not None and len(filled):
                digest.update(memoryview(data)[offsets[0]:offsets[-1]])
        else:
            filled = pc.fill_null(column, pa.scalar(False if pa.types.is_boolean(column.type) else 0, column.type))
            digest.update(filled.to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


def entry_versions(uris: list[str], change_key: str = "stat") -> list[str]:
    """The version string of each uri (module docstring), in order."""
    check_choice(change_key, "change_key", CHANGE_KEYS)
    one = _stat_version if change_key == "stat" else _sha256_version
    # Local stat calls gain nothing from threads but their overhead; neither do a few entries.
    if len(uris) < 64 or (change_key == "stat" and all(local_path(u) == u for u in uris[:64])):
        return [one(u) for u in uris]
    with ThreadPoolExecutor(VERSION_THREADS) as pool:
        return list(pool.map(one, uris, chunksize=256))


def _stat_version(uri: str) -> str:
    path = local_path(uri)
    try:
        if path is not None:
            st = os.stat(path)  # follows symlinks: a link's version is its target's
            return f"{st.st_size}-{st.st_mtime_ns}"
        import fsspec

        fs, inner = fsspec.core.url_to_fs(uri)
        info = fs.info(inner)
    except Exception:  # missing, dangling, no permission, no fsspec backend: the read will say which
        return UNREADABLE
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag-{str(etag).strip(chr(34))}"
    return f"{info.get('size')}-{info.get('mtime') or info.get('LastModified') or info.get('last_modified')}"


def _sha256_version(uri: str) -> str:
    try:
        with _open_entry(uri) as f:
            return "sha256-" + hashlib.file_digest(f, "sha256").hexdigest()  # streamed: a huge file costs no memory
    except Exception:
        return UNREADABLE


def _open_entry(uri: str) -> BinaryIO:
    """An entry's bytes as a file object to stream, without blocking: a local entry that is not a regular file (a
    FIFO, a device) is refused when opened (non-blocking, so a FIFO without writer does not wait for one)."""
    path = local_path(uri)
    if path is None:
        return _open_fsspec(uri)
    fd, _ = open_regular(path, shown(uri))
    return os.fdopen(fd, "rb")


def folder_entries(folder: Path, paths: list[Path]) -> pa.Table:
    """The (id, uri) rows (no version yet) a folder catalog gives these entries: ids from their paths relative to
    `folder`. Entries are not resolved: a symlink is an entry under its own name."""
    base = os.path.abspath(folder)
    return _entries_table(os.path.realpath(base), [os.path.relpath(os.path.abspath(p), base) for p in paths])


def _entries_table(root: str, keys: list[str]) -> pa.Table:
    """(id, uri) of relative keys under the resolved folder `root` (string work: pathlib costs seconds per 100k)."""
    prefix = root.rstrip(os.sep) + os.sep
    return pa.table([pa.array([stable_id(k) for k in keys], pa.int64()),
                     pa.array([path_uri(prefix + k) for k in keys], pa.string())], names=["id", "uri"])


def path_uri(path: Path | str) -> str:
    """A local absolute path as a uri: the path itself, or a file:// URI when its name is not valid UTF-8."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return Path(text).as_uri()  # percent-encodes the raw bytes (os.fsencode)
    return text


def _list_folder(folder: Path, change_key: str) -> pa.Table:
    if not folder.is_dir():
        raise CatalogError(f"catalog folder {folder} does not exist or is not a directory")
    keys, versions = _scan(folder)
    table = _entries_table(os.path.realpath(os.path.abspath(folder)), keys)
    if change_key == "stat":  # the listing's own stat calls: no second pass over the catalog
        return table.append_column("version", pa.array(versions, pa.string()))
    return table


def _scan(folder: Path) -> tuple[list[str], list[str]]:
    """(relative keys, stat versions) of every non-hidden entry under `folder` but directories and special files
    (module docstring). One stat per entry, following symlinks: it finds FIFOs, sockets and devices behind
    links and gives the entry's version (its target's, for a link)."""
    keys, versions, pending = [], [], [("", str(folder))]
    while pending:
        relative, directory = pending.pop()
        try:
            with os.scandir(directory) as listing:
                children = list(listing)
        except OSError as e:
            raise CatalogError(f"catalog folder {folder}: cannot list {directory!r} ({e.strerror})") from e
        for entry in children:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):  # a symlink to a directory is not followed: an entry
                pending.append((relative + entry.name + os.sep, entry.path))
                continue
            try:
                st = entry.stat()
            except OSError:  # a dangling or looping symlink: an entry, whose read becomes an errors row
                st = None
            if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                # %r: a name that is not valid UTF-8 would break a UTF-8 log stream
                log.warning("catalog folder %s: left out %r: a FIFO, socket or device (reading one can block)",
                            folder, entry.path)
                continue
            keys.append(relative + entry.name)
            versions.append(UNREADABLE if st is None else f"{st.st_size}-{st.st_mtime_ns}")
    return keys, versions


def _read_manifest(path: Path) -> pa.Table:
    if not path.is_file():
        raise CatalogError(f"catalog manifest {path} does not exist")
    try:
        if path.suffix == ".csv":
            table = _read_csv(path)
        elif path.suffix == ".parquet":
            table = pq.read_table(path)
            # pandas' to_parquet stores a DataFrame's index as a column; it is not the shop's metadata
            index_columns = (table.schema.pandas_metadata or {}).get("index_columns", [])
            table = table.drop_columns([c for c in index_columns if isinstance(c, str) and c in table.column_names])
        else:
            raise CatalogError(f"catalog manifest {path}: expected a .parquet or .csv file")
    except (pa.ArrowInvalid, OSError) as e:
        raise CatalogError(f"catalog manifest {path}: cannot read ({e})") from e
    if len(set(table.column_names)) != len(table.column_names):
        repeated = sorted({c for c in table.column_names if table.column_names.count(c) > 1})
        raise CatalogError(f"catalog manifest {path}: column(s) {repeated} appear more than once")
    missing = sorted({"id", "uri"} - set(table.column_names))
    if missing:
        raise CatalogError(f"catalog manifest {path}: missing column(s) {missing}; has {table.column_names}")
    ids, uris = table.column("id"), table.column("uri")
    if not pa.types.is_integer(ids.type):
        raise CatalogError(f"catalog manifest {path}: column id is {ids.type}, expected integers")
    if not (pa.types.is_string(uris.type) or pa.types.is_large_string(uris.type)):
        raise CatalogError(f"catalog manifest {path}: column uri is {uris.type}, expected strings")
    for name, missing in (("id", pc.is_null(ids)), ("uri", pc.or_(pc.is_null(uris), pc.equal(uris, "")))):
        row = pc.index(missing, True).as_py()
        if row >= 0:
            raise CatalogError(f"catalog manifest {path}: row {row} has no {name}")
    if len(ids) and pc.min(ids).as_py() < 0:
        raise CatalogError(f"catalog manifest {path}: ids must be non-negative (FAISS reserves -1)")
    base = path.resolve().parent
    resolved = [u if "://" in u or Path(u).is_absolute() else path_uri(base / u) for u in uris.to_pylist()]
    columns = {"id": ids.cast(pa.int64()), "uri": pa.array(resolved, pa.string())}
    if "version" in table.column_names:  # the shop's own change marker (ETag, hash, updated-at): kept as given
        version = table.column("version")
        row = pc.index(pc.is_null(version), True).as_py()
        if row >= 0:
            raise CatalogError(f"catalog manifest {path}: row {row} has no version (leave the column out to have "
                               "versions computed)")
        columns["version"] = version.cast(pa.string())
    reserved = [name for name in table.column_names if name in RESERVED_NAMES and name not in CATALOG_SCHEMA.names]
    if reserved:
        raise CatalogError(f"catalog manifest {path}: column(s) {reserved} have reserved names (reserved: "
                           f"{list(RESERVED_NAMES)}: the job and the search service use them); rename them")
    for name in metadata_columns(table.schema):
        columns[name] = _metadata_column(path, name, table.column(name))
    return pa.table(columns)


def _read_csv(path: Path) -> pa.Table:
    """A CSV manifest; a metadata column that Arrow would read as dates or times keeps its text instead (CSV has
    no types: the text is what the shop wrote, and search filters support no temporal types)."""
    types = {"id": pa.int64(), "uri": pa.string()}
    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))
    # `version` is read as it always was (an updated-at stamp as a timestamp, then cast to text), so that existing
    # snapshots keep their versions.
    temporal = [f.name for f in table.schema if f.name not in (*types, "version") and pa.types.is_temporal(f.type)]
    if temporal:
        types.update({name: pa.string() for name in temporal})
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))
    return table


def _metadata_column(path: Path, name: str, column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A manifest's metadata column in its METADATA_TYPES type, or CatalogError naming the column."""
    if not name or name.startswith("_"):
        raise CatalogError(f"catalog manifest {path}: column {name!r}: metadata column names must be non-empty and "
                           "must not start with '_'")
    kind = column.type
    if pa.types.is_dictionary(kind):  # e.g. a pandas categorical: its values are what matters
        kind = kind.value_type
    if pa.types.is_null(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind):
        target = METADATA_TYPES["string"]
    elif pa.types.is_boolean(kind):
        target = METADATA_TYPES["bool"]
    elif pa.types.is_integer(kind):
        target = METADATA_TYPES["int"]
    elif pa.types.is_floating(kind):
        target = METADATA_TYPES["float"]
    else:
        raise CatalogError(f"catalog manifest {path}: metadata column {name!r} is {column.type}; metadata columns "
                           f"must be strings, integers, floats or booleans (cast it, e.g. to a string)")
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise CatalogError(f"catalog manifest {path}: metadata column {name!r} ({column.type}) does not fit "
                           f"{target}: {e}") from e


def local_path(uri: str) -> str | None:
    """The local file a uri names (a path, or a file:// uri), None for other schemes (s3://, gs://, ...)."""
    if "://" not in uri:
        return uri
    if uri.startswith("file://"):  # percent-escapes are raw bytes of the name, which need not be UTF-8
        return os.fsdecode(unquote_to_bytes(urlparse(uri).path))
    return None


def read_bytes(uri: str, limits: ImageLimits | None = None) -> bytes:
    """One entry's bytes. Local paths and file:// directly; other schemes through fsspec when installed.

    limits: read through the image gate (models/images.py), which raises ImageError for what is not a regular file
    or holds more than limits.max_bytes, before reading it, and never reads more than that; None: the whole file
    (reads that are not images'). OSErrors (missing, permissions, I/O) propagate as they are."""
    path = local_path(uri)
    if path is not None:
        return Path(path).read_bytes() if limits is None else read_file(path, limits, name=uri)
    with _open_fsspec(uri) as f:
        return f.read() if limits is None else read_stream(f, limits, uri)


def _open_fsspec(uri: str) -> BinaryIO:
    scheme = uri.split("://", 1)[0]
    try:
        import fsspec
    except ImportError as e:
        raise CatalogError(f"uri {uri}: scheme {scheme!r} needs fsspec (and its {scheme} package)") from e
    return fsspec.open(uri, "rb").open()

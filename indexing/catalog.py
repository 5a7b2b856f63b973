"""Catalogs: what to embed, as a table of (id, uri) rows with stable ids, and how to read one entry's bytes.

Two sources: an image folder or a manifest (Parquet or CSV with `id` and `uri` columns: the ids are the shop's
own). Ids are never row numbers.

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
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

CATALOG_SCHEMA = pa.schema([("id", pa.int64()), ("uri", pa.string())])


class CatalogError(ValueError):
    """A catalog source is missing or malformed; the message names the file, row or id."""


@dataclass(frozen=True)
class CatalogConfig:
    name: str = ""  # the catalog's name in embeddings/<name>/ and indexes/<name>/
    folder: str | None = None  # an image folder ...
    manifest: str | None = None  # ... or a Parquet/CSV file with `id` and `uri` columns (exactly one of the two)

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
    """(id int64, uri string) rows sorted by id; ids unique. Raises CatalogError naming what is wrong."""
    config.check()
    table = _list_folder(Path(config.folder)) if config.folder else _read_manifest(Path(config.manifest or ""))
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
    """A hash of the (id, uri) rows: a resumed run must embed the very same catalog."""
    digest = hashlib.sha256()
    for column in ("id", "uri"):
        for buffer in table.column(column).combine_chunks().buffers():
            if buffer is not None:
                digest.update(buffer)
    return digest.hexdigest()[:16]


def folder_entries(folder: Path, paths: list[Path]) -> pa.Table:
    """The (id, uri) rows a folder catalog gives these entries: ids from their paths relative to `folder`.
    Entries are not resolved: a symlink is an entry under its own name."""
    base = Path(os.path.abspath(folder))
    root = base.resolve()
    keys = [Path(os.path.abspath(p)).relative_to(base).as_posix() for p in paths]
    return pa.table([pa.array([stable_id(k) for k in keys], pa.int64()),
                     pa.array([path_uri(root / k) for k in keys], pa.string())], schema=CATALOG_SCHEMA)


def path_uri(path: Path) -> str:
    """A local absolute path as a uri: the path itself, or a file:// URI when its name is not valid UTF-8."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return path.as_uri()  # percent-encodes the raw bytes (os.fsencode)
    return text


def _list_folder(folder: Path) -> pa.Table:
    if not folder.is_dir():
        raise CatalogError(f"catalog folder {folder} does not exist or is not a directory")
    return folder_entries(folder, sorted(_folder_entries(folder)))


def _folder_entries(folder: Path) -> list[Path]:
    """Every non-hidden entry under `folder` but directories and special files (see the module docstring).
    DirEntry types come with the listing, so only symlinks and special files cost a stat call."""
    entries, pending = [], [str(folder)]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as listing:
                children = list(listing)
        except OSError as e:
            raise CatalogError(f"catalog folder {folder}: cannot list {directory!r} ({e.strerror})") from e
        for entry in children:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):  # a symlink to a directory is not followed: an entry
                pending.append(entry.path)
            elif _is_special(entry):
                # %r: a name that is not valid UTF-8 would break a UTF-8 log stream
                log.warning("catalog folder %s: left out %r: a FIFO, socket or device (reading one can block)",
                            folder, entry.path)
            else:
                entries.append(Path(entry.path))
    return entries


def _is_special(entry: os.DirEntry) -> bool:
    """A FIFO, socket or device, or a symlink to one."""
    if entry.is_file(follow_symlinks=False):
        return False
    try:
        mode = os.stat(entry.path).st_mode
    except OSError:  # a dangling or looping symlink: an entry, whose read becomes an errors row
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _read_manifest(path: Path) -> pa.Table:
    if not path.is_file():
        raise CatalogError(f"catalog manifest {path} does not exist")
    try:
        if path.suffix == ".csv":
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                column_types={"id": pa.int64(), "uri": pa.string()}))
        elif path.suffix == ".parquet":
            table = pq.read_table(path)
        else:
            raise CatalogError(f"catalog manifest {path}: expected a .parquet or .csv file")
    except (pa.ArrowInvalid, OSError) as e:
        raise CatalogError(f"catalog manifest {path}: cannot read ({e})") from e
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
    return pa.table([ids.cast(pa.int64()), pa.array(resolved, pa.string())], schema=CATALOG_SCHEMA)


def local_path(uri: str) -> str | None:
    """The local file a uri names (a path, or a file:// uri), None for other schemes (s3://, gs://, ...)."""
    if "://" not in uri:
        return uri
    if uri.startswith("file://"):  # percent-escapes are raw bytes of the name, which need not be UTF-8
        return os.fsdecode(unquote_to_bytes(urlparse(uri).path))
    return None


def read_bytes(uri: str) -> bytes:
    """One entry's bytes. Local paths and file:// directly; other schemes through fsspec when installed."""
    path = local_path(uri)
    if path is not None:
        return Path(path).read_bytes()
    scheme = uri.split("://", 1)[0]
    try:
        import fsspec
    except ImportError as e:
        raise CatalogError(f"uri {uri}: scheme {scheme!r} needs fsspec (and its {scheme} package)") from e
    with fsspec.open(uri, "rb") as f:
        return f.read()

"""Real composed query vectors for tuning and measuring an index: from a CIR split, or a logged queries file.

A split's queries are encoded through the serving path (`BundleRuntime.embed_queries`: the training decoder,
preprocessing and tokenizer, then the ONNX query encoder), so tuning sees exactly the vectors search will see.
A queries file (`embedding` fixed_size_list<float32, D>, `bundle_id`, `reference`) carries production queries
logged by a service, or a split encoded once; it is written under a temp name and renamed.

Each query keeps its reference image (`reference`: a split's resolved file path; for a logged query the catalog
uri of the image it was composed on, or null for an uploaded one). The file names no catalog: `index build`
matches the references to the catalog it indexes (`catalog_ids`), so one queries file tunes the indexes of any
catalog. Tuning keeps all queries of one reference on the same side of its split, and leaves a reference that
is in the catalog out of its results, as search does with `exclude_ids`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cirflow.export.runtime import BundleRuntime
from cirflow.indexing.embedding.catalog import local_path, path_uri
from cirflow.indexing.embedding.shards import write_parquet_atomic
from cirflow.models.data.loaders import load_split

log = logging.getLogger(__name__)


class QueriesError(ValueError):
    """A queries file is missing, malformed, empty or from another bundle; the message names the file."""


@dataclass(frozen=True, eq=False)
class Queries:
    """Composed query vectors and the reference image each was composed on."""

    vectors: np.ndarray  # (Q, D) float32
    references: tuple[str | None, ...]  # (Q,) reference image (module docstring); None: unknown, its own group

    def __post_init__(self) -> None:
        if len(self.references) != len(self.vectors):
            raise QueriesError(f"{len(self.references)} references for {len(self.vectors)} query vectors")

    @classmethod
    def unreferenced(cls, vectors: np.ndarray) -> Queries:
        """Queries whose reference images are unknown: each is a group of its own and nothing is excluded."""
        return cls(vectors, (None,) * len(vectors))

    def take(self, rows: np.ndarray) -> Queries:
        return Queries(self.vectors[rows], tuple(self.references[int(i)] for i in rows))


def queries_schema(dim: int) -> pa.Schema:
    return pa.schema([("embedding", pa.list_(pa.float32(), dim)), ("bundle_id", pa.string()),
                      ("reference", pa.string())])


def encode_query_split(runtime: BundleRuntime, kind: str, root: Path, split: str, batch_size: int = 256) -> Queries:
    """The unit query vectors of a split's queries, in split order, with their reference images' resolved paths."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    data = load_split(kind, root, split)
    if not data.queries:
        raise QueriesError(f"{data.name}: the split has no queries")
    log.info("encoding %d queries of %s with bundle %s", len(data.queries), data.name, runtime.bundle_id)
    parts = []
    for start in range(0, len(data.queries), batch_size):
        batch = data.queries[start:start + batch_size]
        parts.append(runtime.embed_queries([data.images[q.reference] for q in batch], [q.caption for q in batch]))
    # path_uri: a path whose name is not valid UTF-8 cannot be a Parquet string; it becomes a file:// uri that
    # catalog_ids reads back to the same file.
    return Queries(np.concatenate(parts), tuple(path_uri(Path(data.images[q.reference]).resolve())
                                                for q in data.queries))


def write_queries(path: Path, queries: Queries, bundle_id: str) -> Path:
    """Write float32 query vectors made by bundle `bundle_id`, with their references."""
    vectors = np.ascontiguousarray(queries.vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise QueriesError(f"{path}: expected a non-empty (Q, D) array of query vectors, got {vectors.shape}")
    n, dim = vectors.shape
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
    table = pa.table([column, pa.array([bundle_id] * n, pa.string()), pa.array(queries.references, pa.string())],
                     schema=queries_schema(dim))
    write_parquet_atomic(table, Path(path))
    return Path(path)


def read_queries(path: Path, bundle_id: str | None = None) -> Queries:
    """The file's query vectors and references; refuses a file made by another bundle than `bundle_id` (when
    given). A file without the `reference` column (written before it existed) loads with unknown references."""
    path = Path(path)
    try:
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=["embedding", "bundle_id", *(["reference"] if "reference" in names
                                                                            else [])])
    except FileNotFoundError as e:
        raise QueriesError(f"{path}: queries file not found") from e
    except (OSError, pa.ArrowException, KeyError) as e:
        raise QueriesError(f"{path}: not a queries file with columns embedding and bundle_id ({e})") from e
    if table.num_rows == 0:
        raise QueriesError(f"{path}: holds no queries")
    column = table.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(column.type) or not pa.types.is_float32(column.type.value_type):
        raise QueriesError(f"{path}: embedding column is {column.type}, expected fixed_size_list<float>")
    ids = set(table.column("bundle_id").to_pylist())
    if len(ids) != 1:
        raise QueriesError(f"{path}: queries from several bundles {sorted(map(str, ids))}; one file per bundle")
    (found,) = ids
    if bundle_id is not None and found != bundle_id:
        raise QueriesError(f"{path}: queries were encoded by bundle {found}, not {bundle_id}; vectors of "
                           "different bundles live in different spaces")
    dim = column.type.list_size
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
    if "reference" not in table.column_names:
        log.warning("%s has no reference column (written by an older cirflow): tuning will split its queries one "
                    "by one and exclude nothing, which overstates held-out recall where queries share a "
                    "reference; re-encode it with `cirflow index queries`", path)
        return Queries.unreferenced(vectors)
    references = table.column("reference")
    if not (pa.types.is_string(references.type) or pa.types.is_large_string(references.type)):
        raise QueriesError(f"{path}: reference column is {references.type}, expected strings")
    return Queries(vectors, tuple(references.to_pylist()))


def catalog_ids(references: Sequence[str | None], ids: np.ndarray, uris: Iterable[str]) -> np.ndarray:
    """(Q,) int64 catalog id of each reference, -1 where the catalog has no entry for it (or it is None).

    An entry matches when its uri is the reference, or both name the same local file (paths or file:// uris,
    symlinks resolved); where several match, the first listed. Only entries with the reference's file name
    (before or after resolving) are resolved: resolving every uri of a million-row catalog takes half a minute.
    """
    out = np.full(len(references), -1, dtype=np.int64)
    rows_of: dict[str, list[int]] = {}  # a uri or resolved path -> the references it matches
    names: set[str] = set()
    for row, reference in enumerate(references):
        if reference is None:
            continue
        rows_of.setdefault(reference, []).append(row)
        path = local_path(reference)
        if path is not None:
            real = os.path.realpath(path)
            rows_of.setdefault(real, []).append(row)
            names.update((os.path.basename(path), os.path.basename(real)))
    for catalog_id, uri in zip(np.asarray(ids).tolist(), uris):
        rows = rows_of.get(uri)
        if rows is None:
            path = local_path(uri)
            if path is None or os.path.basename(path) not in names:
                continue
            rows = rows_of.get(os.path.realpath(path))
        for row in rows or ():
            if out[row] < 0:
                out[row] = catalog_id
    return out


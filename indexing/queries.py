"""Real composed query vectors for tuning and measuring an index: from a CIR split, or a logged queries file.

A split's queries are encoded through the serving path (`BundleRuntime.embed_queries`: the training decoder,
preprocessing and tokenizer, then the ONNX query encoder), so tuning sees exactly the vectors search will see.
A queries file (`embedding` fixed_size_list<float32, D>, `bundle_id`) carries production queries logged by a
service, or a split encoded once; it is written under a temp name and renamed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cirflow.export.runtime import BundleRuntime
from cirflow.indexing.shards import write_parquet_atomic
from cirflow.models.data.loaders import load_split

log = logging.getLogger(__name__)


class QueriesError(ValueError):
    """A queries file is missing, malformed, empty or from another bundle; the message names the file."""


def queries_schema(dim: int) -> pa.Schema:
    return pa.schema([("embedding", pa.list_(pa.float32(), dim)), ("bundle_id", pa.string())])


def encode_query_split(runtime: BundleRuntime, kind: str, root: Path, split: str,
                       batch_size: int = 256) -> tuple[np.ndarray, list[str], list[str | None]]:
    """(Q, D) unit query vectors of a split's queries, in split order, with their reference and target image
    names (target None where the split hides it)."""
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
    return (np.concatenate(parts), [q.reference for q in data.queries], [q.target for q in data.queries])


def write_queries(path: Path, vectors: np.ndarray, bundle_id: str) -> Path:
    """Write (Q, D) float32 query vectors made by bundle `bundle_id`."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise QueriesError(f"{path}: expected a non-empty (Q, D) array of query vectors, got {vectors.shape}")
    n, dim = vectors.shape
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
    table = pa.table([column, pa.array([bundle_id] * n, pa.string())], schema=queries_schema(dim))
    write_parquet_atomic(table, Path(path))
    return Path(path)


def read_queries(path: Path, bundle_id: str | None = None) -> np.ndarray:
    """(Q, D) float32 query vectors; refuses a file made by another bundle than `bundle_id` (when given)."""
    path = Path(path)
    try:
        table = pq.read_table(path, columns=["embedding", "bundle_id"])
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
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)

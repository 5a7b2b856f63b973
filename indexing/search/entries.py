"""The catalog entries an index serves: each id's uri, metadata and image source, by id, by page, by filter.

`item(id)` and `page(offset, limit)` give each entry's uri and metadata (indexing/embedding/catalog.py),
`matching_ids(filters)` the ids whose metadata match, `source(id)` where its image is and what the embedding job
read there (the format its bytes decoded as and their sha256: a server checks the bytes it serves against it and
names their content type from it, never from the file name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cirflow.indexing.embedding.catalog import METADATA_TYPES, metadata_fields


class SearchError(ValueError):
    """A bad search request (k, query shape, exclusion list, filter, id); the message names the argument."""


class UnknownFieldError(SearchError):
    """A metadata filter names a field the index does not have; the message lists the ones it has."""


class UnknownIdError(SearchError):
    """An id that is not in the index's catalog."""


@dataclass(frozen=True)
class ImageSource:
    """A catalog entry's image: where it is and what the embedding job read there. format and sha256 are None in
    an index built before they were recorded (or from vectors made elsewhere)."""

    uri: str
    format: str | None  # what the bytes decoded as (PIL's name: "PNG", "JPEG", ...)
    sha256: str | None  # hex digest of exactly the bytes that were embedded


class Entries:
    """The entries of one index version, sorted by id; `name` (the index's) goes into error messages."""

    def __init__(self, name: str, ids: np.ndarray, uris: pa.StringArray, metadata: pa.Table | None = None,
                 sources: pa.Table | None = None) -> None:
        self.name = name
        self.ids = ids  # sorted catalog ids, aligned with uris, metadata and sources
        self._uris = uris
        self._sources = sources  # (format, sha256) per id; None: not recorded
        self._metadata = metadata if metadata is not None and metadata.num_columns else None
        self._fields = metadata_fields(self._metadata.schema) if self._metadata is not None else {}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def fields(self) -> dict[str, str]:
        """Metadata column name -> "string", "int", "float" or "bool"; empty for an index without metadata (a
        folder catalog's, or one built before metadata existed)."""
        return dict(self._fields)

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

    def page(self, offset: int, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` items (as item() gives them) in id order from the `offset`-th; empty at the end."""
        for name, value, low in (("offset", offset, 0), ("limit", limit, 1)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
                raise SearchError(f"{name} must be an integer >= {low}, got {value!r}")
        if offset > len(self):
            raise SearchError(f"offset {offset} is past the end of the catalog ({len(self)} items)")
        return self._items(int(offset), min(int(offset) + int(limit), len(self)))

    def matching_ids(self, filters: Mapping[str, Any]) -> np.ndarray:
        """Sorted int64 ids whose metadata match every field of `filters` (AND); a field's value is one scalar or a
        list of scalars (any of them matches; None matches entries without a value). UnknownFieldError for a
        field the index lacks, SearchError for a value that its field's type cannot hold."""
        if not isinstance(filters, Mapping):
            raise SearchError(f"filters must map metadata fields to values, got {type(filters).__name__}")
        match = np.ones(len(self), bool)
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
        return self.ids[match]

    def unknown_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Sorted unique int64 ids among `ids` that the index's catalog does not hold (empty when all are known)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        return ids[~self.held(ids)]

    def held(self, ids: np.ndarray) -> np.ndarray:
        """Which of the sorted int64 `ids` the catalog holds (a bool mask)."""
        return members(self.ids, ids)

    def uris_of(self, ids: np.ndarray) -> list[str]:
        """The uri of each catalog id (ids the index returned)."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = np.searchsorted(self.ids, ids)
        if ids.size and (rows.max() >= len(self.ids) or (self.ids[rows] != ids).any()):
            raise SearchError(f"ids {ids.tolist()} include ids that are not in the catalog")
        return self._uris.take(pa.array(rows)).to_pylist()

    def _row(self, id: int) -> int:
        """The row of a catalog id; SearchError for what is not an integer, UnknownIdError for an id the index
        does not hold."""
        if isinstance(id, (bool, np.bool_)) or not isinstance(id, (int, np.integer)):
            raise SearchError(f"id must be an integer catalog id, got {id!r}")
        row = int(np.searchsorted(self.ids, id)) if 0 <= id < 2**63 else len(self.ids)
        if row >= len(self.ids) or self.ids[row] != id:
            raise UnknownIdError(f"catalog id {id} is not in index {self.name}")
        return row

    def _items(self, start: int, stop: int) -> list[dict[str, Any]]:
        ids = self.ids[start:stop].tolist()
        uris = self._uris.slice(start, stop - start).to_pylist()
        extra = (self._metadata.slice(start, stop - start).to_pylist() if self._metadata is not None
                 else [{}] * len(ids))
        return [{"id": i, "uri": u, **m} for i, u, m in zip(ids, uris, extra)]


def members(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which of `ids` (any shape) are in `sorted_ids` (sorted, unique): a bool mask of ids' shape, by binary search
    (np.isin would sort the large side on every search)."""
    if not len(sorted_ids):
        return np.zeros(ids.shape, bool)
    pos = np.searchsorted(sorted_ids, ids).clip(max=len(sorted_ids) - 1)
    return sorted_ids[pos] == ids


def _fits(kind: str, value: Any) -> bool:
    """Whether a filter value can equal a value of a metadata column of this kind."""
    if isinstance(value, (bool, np.bool_)):
        return kind == "bool"
    if kind == "int":
        return isinstance(value, (int, np.integer))
    if kind == "float":
        return isinstance(value, (int, float, np.integer, np.floating))
    return kind == "string" and isinstance(value, str)

"""The one record type every CIR dataset loader returns.

CIRR, FashionIQ and the built-in shapes benchmark all load into a `CIRSplit`: a list of `Query` records
plus the split's gallery (image name -> file). Training samples, evaluation and export all read this type,
so a new dataset format only needs a loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Query:
    """One composed query: reference image + modification text (-> target image when known)."""

    pair_id: int
    reference: str  # image name, a key of CIRSplit.images
    caption: str  # the evaluation caption (FashionIQ: the validation join of the two captions)
    target: str | None  # None where the split hides targets (CIRR test1, FashionIQ test)
    # Captions training may draw from; CIRR: (caption,), FashionIQ: the four joins of c1/c2.
    train_captions: tuple[str, ...] = ()
    # CIRR img_set.members (reference included); empty where the format has none (FashionIQ).
    subset: tuple[str, ...] = ()


@dataclass(frozen=True)
class CIRSplit:
    """A loaded split: its queries and its gallery, in file order."""

    name: str  # e.g. "cirr/val", "shapes/test", "fashioniq/dress/val"
    queries: list[Query]
    images: dict[str, Path]  # gallery: every image of the split, name -> absolute path
    # CIRR removes each query's reference from its ranking; FashionIQ keeps it.
    remove_reference: bool
    protocol: str  # "cirr" or "fashioniq": which metrics apply

    @property
    def has_targets(self) -> bool:
        return all(q.target is not None for q in self.queries)


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file and the entry."""

"""Load one category of FashionIQ (dress, shirt or toptee).

Files, relative to `root`:
- `captions/cap.{category}.{split}.json`: a list of {target, candidate, captions: [c1, c2]}; the candidate is
  the reference image; test entries have no target.
- `image_splits/split.{category}.{split}.json`: a list of image ids, the split's gallery.
- `images/<id>.jpg` (some copies of the dataset store `.png`).
Every malformed input raises `DatasetError` naming the file, the entry (index and candidate) and the field.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cirflow.core.files import read_json
from cirflow.models.data.types import CIRSplit, DatasetError, Query

logger = logging.getLogger(__name__)

CATEGORIES = ("dress", "shirt", "toptee")
# Tried in this order; the first that exists is the image.
IMAGE_SUFFIXES = (".jpg", ".png")
# CLIP4Cir's protocol (kept by CaLa/SPRC): strip these characters at both ends of each caption.
STRIP_CHARS = ".?, "


def load_fashioniq(root: Path, category: str, split: str) -> CIRSplit:
    """Load `split` (train/val/test) of one FashionIQ category; named "fashioniq/{category}/{split}"."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown FashionIQ category {category!r}; choose one of {', '.join(CATEGORIES)}")
    root = Path(root).absolute()
    captions_path = root / "captions" / f"cap.{category}.{split}.json"
    split_path = root / "image_splits" / f"split.{category}.{split}.json"
    images = _read_image_split(split_path, root / "images")
    entries = read_json(captions_path, DatasetError)
    if not isinstance(entries, list):
        raise DatasetError(f"{captions_path}: top level must be a list of entries, got {type(entries).__name__}")
    queries = [_parse_entry(entry, index, captions_path, images) for index, entry in enumerate(entries)]

    name = f"fashioniq/{category}/{split}"
    logger.info("loaded %s: %d queries, %d images", name, len(queries), len(images))
    return CIRSplit(name=name, queries=queries, images=images, remove_reference=False, protocol="fashioniq")


def join_captions(first: str, second: str) -> str:
    """The validation caption: "<First> and <second>", as in CLIP4Cir.

    str.capitalize also lower-cases the rest of `first`; that is what the published numbers used.
    """
    return f"{first.strip(STRIP_CHARS).capitalize()} and {second.strip(STRIP_CHARS)}"


def training_captions(first: str, second: str) -> tuple[str, str, str, str]:
    """The four captions training draws from: "c1 and c2", "c2 and c1", c1, c2.

    For training, as in CLIP4Cir's generate_randomized_fiq_caption, each caption is stripped of ".?, " at
    both ends and the leading caption of each variant is capitalised (str.capitalize); nothing else changes.
    """
    return (
        join_captions(first, second),
        join_captions(second, first),
        first.strip(STRIP_CHARS).capitalize(),
        second.strip(STRIP_CHARS).capitalize(),
    )



def _read_image_split(path: Path, image_dir: Path) -> dict[str, Path]:
    """Id -> absolute image path (.jpg or .png, whichever exists), in file order."""
    ids = read_json(path, DatasetError)
    if not isinstance(ids, list):
        raise DatasetError(f"{path}: top level must be a list of image ids, got {type(ids).__name__}")
    images: dict[str, Path] = {}
    for index, image_id in enumerate(ids):
        if not isinstance(image_id, str):
            raise DatasetError(f"{path}: entry {index}: image id must be a string, got {type(image_id).__name__}")
        if image_id in images:
            # A repeated id adds nothing to the gallery; keep the first and say so.
            logger.warning("%s: entry %d: image id %r is listed twice; keeping one", path, index, image_id)
            continue
        file = _find_image(image_dir, image_id)
        if file is None:
            tried = ", ".join(image_id + s for s in IMAGE_SUFFIXES)
            raise DatasetError(f"{path}: entry {index}: image {image_id!r}: none of {tried} exists in {image_dir}")
        images[image_id] = file
    return images


def _find_image(image_dir: Path, image_id: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        file = image_dir / f"{image_id}{suffix}"
        if file.is_file():
            return file
    return None


def _parse_entry(entry: Any, index: int, path: Path, images: dict[str, Path]) -> Query:
    where = f"{path}: entry {index}"
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: must be an object, got {type(entry).__name__}")
    candidate = entry.get("candidate")
    if not isinstance(candidate, str):
        raise DatasetError(f"{where}: field 'candidate' must be a string, got {candidate!r}")
    where = f"{where} (candidate {candidate!r})"
    # The test split hides the target: no key at all. A present-but-null value is malformed.
    target = entry.get("target") if "target" in entry else None
    if "target" in entry and not isinstance(target, str):
        raise DatasetError(f"{where}: field 'target' must be a string, got {target!r}")
    captions = entry.get("captions")
    if not isinstance(captions, list) or len(captions) != 2 or not all(isinstance(c, str) for c in captions):
        raise DatasetError(f"{where}: field 'captions' must be a list of 2 strings, got {captions!r}")
    for label, name in (("candidate", candidate), ("target", target)):
        if name is not None and name not in images:
            raise DatasetError(f"{where}: field {label!r}: image {name!r} is not in the split's image list")

    first, second = captions
    return Query(
        pair_id=index,
        reference=candidate,
        caption=join_captions(first, second),
        target=target,
        train_captions=training_captions(first, second),
        subset=(),
    )

"""Load a split in the CIRR format (CIRR itself and the synthetic shapes benchmark).

Files, relative to `root`:
- `captions/cap.rc2.{split}.json`: a list of {pairid, reference, target_hard, target_soft, caption,
  img_set: {id, members: [6 names], reference_rank, target_rank}}; test1 entries have no target fields.
- `image_splits/split.rc2.{split}.json`: {image name: path relative to root}.
Every malformed input raises `DatasetError` naming the file, the entry (index and pairid) and the field.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cirflow.core.files import read_json
from cirflow.models.data.types import CIRSplit, DatasetError, Query

logger = logging.getLogger(__name__)

# CIRR's img_set is the reference, the target and four hard negatives chosen to look alike.
SUBSET_SIZE = 6


def load_cirr(root: Path, split: str, *, dataset: str | None = None) -> CIRSplit:
    """Load `split` of the CIRR-format dataset at `root`; the split is named f"{dataset}/{split}".

    `dataset` defaults to the folder name of `root` (the registry in loaders.py passes "cirr" or "shapes").
    """
    root = Path(root).absolute()
    captions_path = root / "captions" / f"cap.rc2.{split}.json"
    images_path = root / "image_splits" / f"split.rc2.{split}.json"
    images = _read_image_split(images_path, root)
    entries = read_json(captions_path, DatasetError)
    if not isinstance(entries, list):
        raise DatasetError(f"{captions_path}: top level must be a list of entries, got {type(entries).__name__}")

    queries: list[Query] = []
    seen_pairids: dict[int, int] = {}
    for index, entry in enumerate(entries):
        query = _parse_entry(entry, index, captions_path, images)
        if query.pair_id in seen_pairids:
            raise DatasetError(
                f"{captions_path}: entry {index} (pairid {query.pair_id}): field 'pairid' duplicates entry "
                f"{seen_pairids[query.pair_id]}"
            )
        seen_pairids[query.pair_id] = index
        queries.append(query)

    name = f"{dataset or root.name}/{split}"
    logger.info("loaded %s: %d queries, %d images", name, len(queries), len(images))
    return CIRSplit(name=name, queries=queries, images=images, remove_reference=True, protocol="cirr")



def _read_image_split(path: Path, root: Path) -> dict[str, Path]:
    """Name -> absolute path, checking that every file exists (one stat per image)."""
    raw = read_json(path, DatasetError)
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: top level must be an object {{name: relative path}}, got {type(raw).__name__}")
    images: dict[str, Path] = {}
    for name, relative in raw.items():
        if not isinstance(relative, str):
            raise DatasetError(f"{path}: image {name!r}: path must be a string, got {type(relative).__name__}")
        # pathlib drops the "./" that the official split files put in front of every path.
        file = root / relative
        if not file.is_file():
            raise DatasetError(f"{path}: image {name!r}: file {file} does not exist")
        images[name] = file
    return images


def _parse_entry(entry: Any, index: int, path: Path, images: dict[str, Path]) -> Query:
    where = f"{path}: entry {index}"
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: must be an object, got {type(entry).__name__}")
    pairid = entry.get("pairid")
    # bool is an int subclass; a true/false pairid is a malformed file, not pair 1/0.
    if not isinstance(pairid, int) or isinstance(pairid, bool):
        raise DatasetError(f"{where}: field 'pairid' must be an integer, got {pairid!r}")
    where = f"{where} (pairid {pairid})"

    def field(key: str, kind: type, container: dict[str, Any] = entry, label: str | None = None) -> Any:
        value = container.get(key)
        if not isinstance(value, kind):
            shown = "missing" if key not in container else f"got {type(value).__name__}"
            raise DatasetError(f"{where}: field {label or key!r} must be a {kind.__name__}, {shown}")
        return value

    reference = field("reference", str)
    caption = field("caption", str)
    # test1 hides the target: no target_hard at all. A present-but-null value is malformed.
    target = field("target_hard", str) if "target_hard" in entry else None
    if "target_soft" in entry:
        field("target_soft", dict)
    img_set = field("img_set", dict)
    members = field("members", list, img_set, "img_set.members")
    if (
        len(members) != SUBSET_SIZE
        or not all(isinstance(m, str) for m in members)
        or len(set(members)) != SUBSET_SIZE
    ):
        raise DatasetError(f"{where}: field 'img_set.members' must be {SUBSET_SIZE} distinct names, got {members!r}")

    for label, name in [("reference", reference), ("target_hard", target)] + [
        (f"img_set.members[{i}]", m) for i, m in enumerate(members)
    ]:
        if name is not None and name not in images:
            raise DatasetError(f"{where}: field {label!r}: image {name!r} is not in the split's image list")
    if reference not in members:
        raise DatasetError(f"{where}: field 'img_set.members' does not contain the reference {reference!r}")
    if target is not None:
        if target not in members:
            raise DatasetError(f"{where}: field 'img_set.members' does not contain the target {target!r}")
        # The reference is removed from every ranking, so a target equal to it could never be retrieved.
        if target == reference:
            raise DatasetError(f"{where}: field 'target_hard' equals the reference {reference!r}")

    return Query(
        pair_id=pairid,
        reference=reference,
        caption=caption,
        target=target,
        train_captions=(caption,),
        subset=tuple(members),
    )

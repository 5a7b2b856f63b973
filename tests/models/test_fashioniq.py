"""FashionIQ loading: a tiny category in the official layout, caption joins, and malformed-input errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cirflow.models.data.fashioniq import join_captions, load_fashioniq, training_captions
from cirflow.models.data.loaders import load_split
from cirflow.models.data.types import CIRSplit, DatasetError, Query
from cirflow.models.evaluation import build_eval_set
from cirflow.models.preprocess import PreprocessConfig
from tests.models.files import break_file

IDS = ["B001", "B002", "B003", "B004"]


def fiq_entries(with_targets: bool = True) -> list[dict[str, Any]]:
    """Two entries in the official cap.{category}.{split} layout (test drops the target)."""
    entries: list[dict[str, Any]] = [
        {"target": "B002", "candidate": "B001", "captions": ["is Red and shorter.", " has no sleeves?"]},
        {"target": "B004", "candidate": "B003", "captions": ["is longer", "is blue, "]},
    ]
    if not with_targets:
        for entry in entries:
            del entry["target"]
    return entries


def write_fiq(
    root: Path, category: str = "dress", split: str = "val", entries: list[Any] | None = None, ids: Any = None
) -> Path:
    """Write captions, image_splits and tiny images (B003 as .png, the rest .jpg) under `root`."""
    for folder in ("captions", "image_splits", "images"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i, image_id in enumerate(IDS):
        suffix = ".png" if image_id == "B003" else ".jpg"
        Image.new("RGB", (4, 6), (0, 40 * i, 0)).save(root / "images" / f"{image_id}{suffix}")
    if entries is None:
        entries = fiq_entries(with_targets=split != "test")
    (root / "captions" / f"cap.{category}.{split}.json").write_text(json.dumps(entries))
    (root / "image_splits" / f"split.{category}.{split}.json").write_text(json.dumps(IDS if ids is None else ids))
    return root


def test_caption_joins_follow_clip4cir() -> None:
    # c1 loses "." at the end and is capitalised (str.capitalize lower-cases the rest: "Red" -> "red");
    # c2 loses the leading space and the trailing "?".
    assert join_captions("is Red and shorter.", " has no sleeves?") == "Is red and shorter and has no sleeves"
    assert training_captions("is longer", "is blue, ") == (
        "Is longer and is blue",
        "Is blue and is longer",
        "Is longer",
        "Is blue",
    )


def test_load_val(tmp_path: Path) -> None:
    root = write_fiq(tmp_path / "fiq")
    split = load_fashioniq(root, "dress", "val")
    assert split.name == "fashioniq/dress/val"
    assert split.protocol == "fashioniq" and not split.remove_reference and split.has_targets
    assert list(split.images) == IDS
    assert split.images["B003"] == (root / "images" / "B003.png").absolute()
    assert split.images["B001"] == (root / "images" / "B001.jpg").absolute()
    assert split.queries[1] == Query(
        pair_id=1,
        reference="B003",
        caption="Is longer and is blue",
        target="B004",
        train_captions=("Is longer and is blue", "Is blue and is longer", "Is longer", "Is blue"),
        subset=(),
    )
    assert split.queries[0].pair_id == 0 and split.queries[0].reference == "B001"


def test_load_test_has_no_targets(tmp_path: Path) -> None:
    split = load_fashioniq(write_fiq(tmp_path / "fiq", category="toptee", split="test"), "toptee", "test")
    assert [q.target for q in split.queries] == [None, None]
    assert split.name == "fashioniq/toptee/test"


def test_registry(tmp_path: Path) -> None:
    root = write_fiq(tmp_path / "fiq", category="shirt")
    assert load_split("fashioniq/shirt", root, "val").name == "fashioniq/shirt/val"


def test_unknown_category_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dress, shirt, toptee"):
        load_fashioniq(tmp_path, "shoes", "val")


def test_repeated_id_is_kept_once(tmp_path: Path) -> None:
    root = write_fiq(tmp_path / "fiq", ids=IDS + ["B001"])
    assert list(load_fashioniq(root, "dress", "val").images) == IDS


def _set(key: str, value: Any) -> Callable[[list[Any]], None]:
    def mutate(entries: list[Any]) -> None:
        entries[1][key] = value

    return mutate


def _delete(key: str) -> Callable[[list[Any]], None]:
    def mutate(entries: list[Any]) -> None:
        del entries[1][key]

    return mutate


# (mutation of the entries, pieces the message must contain besides the file name and "entry 1")
ENTRY_CASES = {
    "entry-not-object": (lambda e: e.__setitem__(1, "B003"), ["must be an object"]),
    "missing-candidate": (_delete("candidate"), ["'candidate'"]),
    "candidate-int": (_set("candidate", 3), ["'candidate'"]),
    "target-null": (_set("target", None), ["candidate 'B003'", "'target'"]),
    "missing-captions": (_delete("captions"), ["candidate 'B003'", "'captions'"]),
    "one-caption": (_set("captions", ["is longer"]), ["candidate 'B003'", "'captions'", "2 strings"]),
    "caption-not-string": (_set("captions", ["is longer", None]), ["candidate 'B003'", "'captions'"]),
    "candidate-not-in-split": (_set("candidate", "B999"), ["'candidate'", "'B999'", "image list"]),
    "target-not-in-split": (_set("target", "B999"), ["candidate 'B003'", "'target'", "'B999'", "image list"]),
}


@pytest.mark.parametrize("case", list(ENTRY_CASES))
def test_malformed_entry_names_file_and_entry(tmp_path: Path, case: str) -> None:
    mutate, expected = ENTRY_CASES[case]
    entries = fiq_entries()
    mutate(entries)
    root = write_fiq(tmp_path / "fiq", entries=entries)
    with pytest.raises(DatasetError) as info:
        load_fashioniq(root, "dress", "val")
    message = str(info.value)
    for piece in [str(root / "captions" / "cap.dress.val.json"), "entry 1", *expected]:
        assert piece in message, (piece, message)


CAPTIONS = "captions/cap.dress.val.json"
SPLIT = "image_splits/split.dress.val.json"
# (damage to the written dataset, the file the message must name, other pieces it must contain)
FILE_CASES = {
    "captions-missing": (break_file(CAPTIONS, None), CAPTIONS, ["cannot read"]),
    "captions-invalid-json": (break_file(CAPTIONS, "[{"), CAPTIONS, ["invalid JSON"]),
    "captions-not-list": (break_file(CAPTIONS, "{}"), CAPTIONS, ["top level", "list"]),
    "split-missing": (break_file(SPLIT, None), SPLIT, ["cannot read"]),
    "split-invalid-json": (break_file(SPLIT, '["B001",'), SPLIT, ["invalid JSON"]),
    "split-not-list": (break_file(SPLIT, '{"B001": 1}'), SPLIT, ["top level", "list"]),
    "split-id-not-string": (break_file(SPLIT, '["B001", 2]'), SPLIT, ["entry 1", "string"]),
    "image-missing-on-disk": (
        break_file("images/B003.png", None), SPLIT, ["entry 2", "'B003'", "B003.jpg", "B003.png"]
    ),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_malformed_file_names_file(tmp_path: Path, case: str) -> None:
    damage, relative, expected = FILE_CASES[case]
    root = write_fiq(tmp_path / "fiq")
    damage(root)
    with pytest.raises(DatasetError) as info:
        load_fashioniq(root, "dress", "val")
    message = str(info.value)
    for piece in [str(root / relative), *expected]:
        assert piece in message, (piece, message)
    if case == "captions-invalid-json":
        assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_evaluator_refuses_a_reference_outside_the_gallery_as_the_loader_does(tmp_path: Path) -> None:
    # FashionIQ's protocol (CLIP4Cir's validation) takes each reference from the split's gallery, and the loader
    # refuses a candidate outside its image list ("candidate-not-in-split" above); the evaluator agrees.
    split = load_fashioniq(write_fiq(tmp_path / "fiq"), "dress", "val")
    images = {n: p for n, p in split.images.items() if n != "B003"}  # B003 references query 1
    outside = CIRSplit(split.name, split.queries, images, remove_reference=False, protocol="fashioniq")
    with pytest.raises(ValueError, match=r"fashioniq/dress/val: 1 reference image\(s\) are not in the split's "
                                         r"gallery \(e.g. \['B003'\]\)"):
        build_eval_set(outside, PreprocessConfig())
    data = build_eval_set(split, PreprocessConfig())  # every reference in the gallery: rows into it
    assert data.pixels.shape[0] == len(data.names) == 4 and data.ref_rows.tolist() == [0, 2]

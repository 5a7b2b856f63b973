"""CIRR-format loading: a tiny dataset in the official layout, and every malformed-input error."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cirflow.models.data.cirr import load_cirr
from cirflow.models.data.loaders import load_split
from cirflow.models.data.types import DatasetError, Query
from tests.models.files import break_file

NAMES = [f"img{i}" for i in range(8)]


def cirr_entries(with_targets: bool = True) -> list[dict[str, Any]]:
    """Two entries in the official cap.rc2 layout (test1 drops the target fields)."""
    entries = [
        {
            "pairid": 10,
            "reference": "img0",
            "target_hard": "img1",
            "target_soft": {"img1": 1.0},
            "caption": "make it red",
            "img_set": {"id": 1, "members": NAMES[:6], "reference_rank": 0, "target_rank": 1},
        },
        {
            "pairid": 11,
            "reference": "img2",
            "target_hard": "img7",
            "target_soft": {"img7": 1.0, "img3": 0.5},
            "caption": "add a second dog",
            "img_set": {
                "id": 2,
                "members": ["img2", "img7", "img3", "img4", "img5", "img6"],
                "reference_rank": 0,
                "target_rank": 1,
            },
        },
    ]
    if not with_targets:
        for entry in entries:
            del entry["target_hard"], entry["target_soft"]
            del entry["img_set"]["target_rank"]
    return entries


def write_cirr(
    root: Path, split: str = "val", entries: list[Any] | None = None, image_split: Any = None
) -> Path:
    """Write captions, image_splits and 8 tiny PNGs under `root`, as the official release lays them out."""
    (root / "captions").mkdir(parents=True, exist_ok=True)
    (root / "image_splits").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(NAMES):
        Image.new("RGB", (4, 4), (30 * i, 0, 0)).save(root / split / f"{name}.png")
    if entries is None:
        entries = cirr_entries(with_targets=split != "test1")
    if image_split is None:
        image_split = {name: f"./{split}/{name}.png" for name in NAMES}
    (root / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(entries))
    (root / "image_splits" / f"split.rc2.{split}.json").write_text(json.dumps(image_split))
    return root


def test_load_val(tmp_path: Path) -> None:
    root = write_cirr(tmp_path / "cirr")
    split = load_cirr(root, "val")
    assert split.name == "cirr/val"
    assert split.protocol == "cirr" and split.remove_reference and split.has_targets
    assert list(split.images) == NAMES
    assert split.images["img3"] == (root / "val" / "img3.png").absolute()
    assert all(p.is_absolute() and p.is_file() for p in split.images.values())
    assert split.queries == [
        Query(10, "img0", "make it red", "img1", ("make it red",), tuple(NAMES[:6])),
        Query(11, "img2", "add a second dog", "img7", ("add a second dog",),
              ("img2", "img7", "img3", "img4", "img5", "img6")),
    ]


def test_load_test1_has_no_targets(tmp_path: Path) -> None:
    split = load_cirr(write_cirr(tmp_path / "cirr", split="test1"), "test1")
    assert [q.target for q in split.queries] == [None, None]
    assert not split.has_targets
    assert split.queries[1].subset == ("img2", "img7", "img3", "img4", "img5", "img6")


def test_registry_names_the_dataset(tmp_path: Path) -> None:
    root = write_cirr(tmp_path / "whatever", split="novel")
    assert load_split("shapes", root, "novel").name == "shapes/novel"
    assert load_split("cirr", root, "novel").name == "cirr/novel"
    assert load_cirr(root, "novel").name == "whatever/novel"


def test_registry_unknown_kind_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fashioniq/toptee") as info:
        load_split("cirr2", tmp_path, "val")
    assert "shapes" in str(info.value)


def _set(path: str, value: Any) -> Callable[[list[Any]], None]:
    """Set field `path` ("img_set.members") of entry 1."""

    def mutate(entries: list[Any]) -> None:
        *parents, key = path.split(".")
        node = entries[1]
        for p in parents:
            node = node[p]
        node[key] = value

    return mutate


def _delete(key: str) -> Callable[[list[Any]], None]:
    def mutate(entries: list[Any]) -> None:
        del entries[1][key]

    return mutate


# (mutation of the entries, pieces the message must contain besides the file name and "entry 1")
ENTRY_CASES = {
    "entry-not-object": (lambda e: e.__setitem__(1, 5), ["must be an object"]),
    "missing-pairid": (_delete("pairid"), ["'pairid'"]),
    "pairid-string": (_set("pairid", "11"), ["'pairid'"]),
    "pairid-bool": (_set("pairid", True), ["'pairid'"]),
    "missing-reference": (_delete("reference"), ["pairid 11", "'reference'", "missing"]),
    "missing-caption": (_delete("caption"), ["pairid 11", "'caption'", "missing"]),
    "caption-int": (_set("caption", 3), ["pairid 11", "'caption'", "int"]),
    "target-null": (_set("target_hard", None), ["pairid 11", "'target_hard'"]),
    "target-soft-list": (_set("target_soft", []), ["pairid 11", "'target_soft'"]),
    "missing-img-set": (_delete("img_set"), ["pairid 11", "'img_set'"]),
    "members-5": (_set("img_set.members", NAMES[2:7]), ["pairid 11", "'img_set.members'", "6"]),
    "members-repeat": (_set("img_set.members", ["img2", "img7", "img3", "img3", "img5", "img6"]),
                       ["pairid 11", "'img_set.members'", "distinct"]),
    "members-int": (_set("img_set.members", [2, 7, 3, 4, 5, 6]), ["pairid 11", "'img_set.members'"]),
    "members-lack-target": (_set("img_set.members", ["img2", "img0", "img3", "img4", "img5", "img6"]),
                            ["pairid 11", "'img_set.members'", "target 'img7'"]),
    "members-lack-reference": (_set("img_set.members", ["img1", "img7", "img3", "img4", "img5", "img6"]),
                               ["pairid 11", "'img_set.members'", "reference 'img2'"]),
    "reference-not-in-split": (_set("reference", "imgX"), ["pairid 11", "'reference'", "'imgX'", "image list"]),
    "target-not-in-split": (_set("target_hard", "imgX"), ["pairid 11", "'target_hard'", "'imgX'"]),
    "member-not-in-split": (_set("img_set.members", ["img2", "img7", "img3", "img4", "img5", "imgX"]),
                            ["pairid 11", "'img_set.members[5]'", "'imgX'"]),
    "target-is-reference": (_set("target_hard", "img2"), ["pairid 11", "'target_hard'", "equals the reference"]),
    "duplicate-pairid": (_set("pairid", 10), ["pairid 10", "duplicates entry 0"]),
}


@pytest.mark.parametrize("case", list(ENTRY_CASES))
def test_malformed_entry_names_file_and_entry(tmp_path: Path, case: str) -> None:
    mutate, expected = ENTRY_CASES[case]
    entries = cirr_entries()
    mutate(entries)
    root = write_cirr(tmp_path / "cirr", entries=entries)
    with pytest.raises(DatasetError) as info:
        load_cirr(root, "val")
    message = str(info.value)
    for piece in [str(root / "captions" / "cap.rc2.val.json"), "entry 1", *expected]:
        assert piece in message, (piece, message)


CAPTIONS = "captions/cap.rc2.val.json"
SPLIT = "image_splits/split.rc2.val.json"
# (damage to the written dataset, the file the message must name, other pieces it must contain)
FILE_CASES = {
    "captions-missing": (break_file(CAPTIONS, None), CAPTIONS, ["cannot read"]),
    "captions-invalid-json": (break_file(CAPTIONS, '[{"pairid": 1,'), CAPTIONS, ["invalid JSON", "line 1"]),
    "captions-not-list": (break_file(CAPTIONS, '{"pairid": 1}'), CAPTIONS, ["top level", "list"]),
    "split-missing": (break_file(SPLIT, None), SPLIT, ["cannot read"]),
    "split-invalid-json": (break_file(SPLIT, "{"), SPLIT, ["invalid JSON"]),
    "split-not-dict": (break_file(SPLIT, '["img0"]'), SPLIT, ["top level"]),
    "split-path-not-string": (break_file(SPLIT, '{"img0": 3}'), SPLIT, ["'img0'", "string"]),
    "image-missing-on-disk": (break_file("val/img3.png", None), SPLIT, ["'img3'", "img3.png", "does not exist"]),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_malformed_file_names_file(tmp_path: Path, case: str) -> None:
    damage, relative, expected = FILE_CASES[case]
    root = write_cirr(tmp_path / "cirr")
    damage(root)
    with pytest.raises(DatasetError) as info:
        load_cirr(root, "val")
    message = str(info.value)
    for piece in [str(root / relative), *expected]:
        assert piece in message, (piece, message)


def test_errors_chain_the_cause(tmp_path: Path) -> None:
    root = write_cirr(tmp_path / "cirr")
    (root / CAPTIONS).write_text("not json")
    with pytest.raises(DatasetError) as info:
        load_cirr(root, "val")
    assert isinstance(info.value.__cause__, json.JSONDecodeError)

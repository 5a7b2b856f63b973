"""The shapes benchmark generator: determinism, CIRR format, hard negatives, novel phrasing, resumability."""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from cirflow.models.data import shapes
from cirflow.models.data.cirr import load_cirr
from cirflow.models.data.shapes import SPLITS, ShapesConfig, generate_shapes
from cirflow.models.data.shapes_captions import NOVEL_PHRASING, PHRASINGS, TRAIN_PHRASING, describe_edit, vocabulary
from cirflow.models.data.shapes_scene import MODIFICATIONS, apply_edit, sample_image_set

TINY = ShapesConfig(seed=3, train_triplets=60, val_queries=20, test_queries=20)
# Words both phrasing families may use: articles and prepositions carry no colour, shape, place or verb.
FUNCTION_WORDS = {"the", "a", "an", "to", "of", "in", "at", "on", "into", "with", "for", "as", "be", "its"}
ENTRY_FIELDS = {"pairid", "reference", "target_hard", "target_soft", "caption", "img_set"}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, kind: str, split: str) -> object:
    name = {"captions": f"captions/cap.rc2.{split}.json", "images": f"image_splits/split.rc2.{split}.json",
            "scenes": f"scenes/scenes.{split}.json", "manifest": "shapes.json"}[kind]
    return json.loads((root / name).read_text())


def _words(captions: list[str]) -> set[str]:
    return {w for c in captions for w in re.findall(r"[a-z]+", c.lower())}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(TINY, tmp_path_factory.mktemp("shapes") / "tiny")


def test_same_config_is_byte_identical_for_any_worker_count(tiny: Path, tmp_path: Path) -> None:
    again = generate_shapes(replace(TINY, workers=1), tmp_path / "again")
    assert _files(again) == _files(tiny)


def test_another_seed_gives_another_dataset(tiny: Path, tmp_path: Path) -> None:
    other = generate_shapes(replace(TINY, seed=4), tmp_path / "other")
    for split in SPLITS:
        assert _load(other, "captions", split) != _load(tiny, "captions", split)
    first = "images/train/train-000000.png"
    assert (other / first).read_bytes() != (tiny / first).read_bytes()


@pytest.mark.parametrize("split", SPLITS)
def test_cirr_format(tiny: Path, split: str) -> None:
    entries = _load(tiny, "captions", split)
    images = _load(tiny, "images", split)
    assert len(entries) == TINY.query_count(split)
    assert [e["pairid"] for e in entries] == list(range(len(entries)))
    for e in entries:
        assert set(e) == ENTRY_FIELDS
        assert isinstance(e["pairid"], int) and e["caption"]
        assert e["target_soft"] == {e["target_hard"]: 1.0}
        members = e["img_set"]["members"]
        assert len(members) == len(set(members)) == 6
        assert members[e["img_set"]["reference_rank"]] == e["reference"]
        assert members[e["img_set"]["target_rank"]] == e["target_hard"]
        assert e["reference"] != e["target_hard"]
        assert set(members) <= set(images)
    image_dir = "test" if split == "novel" else split
    assert sorted(p.name for p in (tiny / "images" / image_dir).iterdir()) == sorted(f"{n}.png" for n in images)
    for name, relative in images.items():
        assert relative == f"./images/{image_dir}/{name}.png"
        with Image.open(tiny / relative) as image:
            assert image.mode == "RGB" and image.size == (TINY.image_size, TINY.image_size)


@pytest.mark.parametrize("split", SPLITS)
def test_loads_with_the_cirr_loader(tiny: Path, split: str) -> None:
    loaded = load_cirr(tiny, split, dataset="shapes")
    assert loaded.has_targets and len(loaded.queries) == TINY.query_count(split)


@pytest.mark.parametrize("split", SPLITS)
def test_target_is_the_only_matching_scene(tiny: Path, split: str) -> None:
    scenes = {n: tuple(map(tuple, objs)) for n, objs in _load(tiny, "scenes", split)["images"].items()}
    assert len(set(scenes.values())) == len(scenes), "every scene is unique within a split"
    for e in _load(tiny, "captions", split):
        target = scenes[e["target_hard"]]
        assert 1 <= len(target) <= 5
        others = [scenes[m] for m in e["img_set"]["members"] if m != e["target_hard"]]
        assert all(target != o for o in others)


def test_siblings_differ_from_the_target_in_the_edited_object_only() -> None:
    rng = random.Random(0)
    for kind in MODIFICATIONS * 30:
        reference, edits, fillers = sample_image_set(rng, kind)
        members = [reference, *(apply_edit(reference, e) for e in edits), *fillers]
        assert len(set(members)) == 6 and 1 <= len(edits) <= 5
        assert all(e.kind == kind for e in edits)
        # Near misses: every member is the reference with one or two cells changed (a move changes two).
        for m in members[1:]:
            changed = set(reference) ^ set(m)
            assert 1 <= len({o.cell for o in changed}) <= 2


def test_novel_split_rewords_the_test_queries(tiny: Path) -> None:
    test, novel = _load(tiny, "captions", "test"), _load(tiny, "captions", "novel")
    strip = lambda e: {k: v for k, v in e.items() if k != "caption"}  # noqa: E731
    assert [strip(e) for e in novel] == [strip(e) for e in test]
    assert _load(tiny, "images", "novel") == _load(tiny, "images", "test")
    assert all(n["caption"] != t["caption"] for n, t in zip(novel, test))
    trained = _words([e["caption"] for s in ("train", "val", "test") for e in _load(tiny, "captions", s)])
    assert _words([e["caption"] for e in novel]) & trained <= FUNCTION_WORDS
    assert vocabulary(NOVEL_PHRASING) & vocabulary(TRAIN_PHRASING) <= FUNCTION_WORDS


@pytest.mark.parametrize("family", ["train", "novel"])
def test_captions_name_what_the_target_needs(family: str) -> None:
    phrasing, rng = PHRASINGS[family], random.Random(1)
    for kind in MODIFICATIONS * 20:
        reference, edits, _ = sample_image_set(rng, kind)
        for e in edits:
            caption = describe_edit(reference, e, phrasing, rng, name_size=True).lower()
            if e.new is None:
                continue
            if kind in ("add", "colour"):
                assert any(w in caption for w in phrasing.colours[e.new.colour])
            if kind in ("add", "shape"):
                assert any(w in caption for w in phrasing.shapes[e.new.shape])
            if kind in ("add", "move"):
                assert any(p.split(" ", 1)[1] in caption for p in phrasing.places[e.new.cell])
            if kind == "add":
                assert any(w in caption for w in phrasing.sizes[e.new.size])


def test_all_modifications_occur_and_scale_multiplies_counts(tiny: Path, tmp_path: Path) -> None:
    manifest = _load(tiny, "manifest", "")
    assert all(manifest["splits"]["train"]["modifications"][k] > 0 for k in MODIFICATIONS)
    doubled = _load(generate_shapes(replace(TINY, scale=2.0), tmp_path / "x2"), "manifest", "")
    for split in SPLITS:
        assert doubled["splits"][split]["queries"] == 2 * manifest["splits"][split]["queries"]


def test_rerun_is_a_no_op_and_another_config_is_refused(
    tiny: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny.rglob("*")}
    with caplog.at_level(logging.INFO, logger=shapes.__name__):
        assert generate_shapes(replace(TINY, workers=1), tiny) == tiny
    assert "already complete" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in tiny.rglob("*")} == before
    with pytest.raises(ValueError, match=r"'seed': 3.*'seed': 5"):
        generate_shapes(replace(TINY, seed=5), tiny)
    assert not list(tiny.parent.glob(".tiny.tmp-*"))


def test_failure_leaves_no_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(shapes, "_caption_entries", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_shapes(replace(TINY, workers=1), tmp_path / "broken")
    assert list(tmp_path.iterdir()) == []


def test_a_dataset_another_process_finished_first_is_kept(tiny: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    import os
    import shutil

    rename = os.rename

    def another_process_first(src: str, dst: str) -> None:  # the same dataset lands just before our rename
        shutil.copytree(tiny, dst)
        rename(src, dst)

    monkeypatch.setattr(os, "rename", another_process_first)
    out = tmp_path / "raced"
    with caplog.at_level(logging.INFO, logger=shapes.__name__):
        assert generate_shapes(replace(TINY, workers=1), out) == out
    assert "another process completed" in caplog.text
    assert _files(out) == _files(tiny) and list(tmp_path.iterdir()) == [out]  # theirs kept, ours removed


def test_refuses_a_directory_that_is_not_a_shapes_dataset(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a complete shapes dataset"):
        generate_shapes(TINY, tmp_path / "other")


@pytest.mark.parametrize("field, value", [("scale", 0.0), ("seed", -1), ("workers", 0), ("train_triplets", 0)])
def test_bad_config_is_rejected(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field.split("_")[0]):
        replace(TINY, **{field: value})

"""The built-in "shapes" CIR benchmark (CSS-style), generated from a seed and written in CIRR's file format.

Layout of the output directory (read by `models.data.cirr.load_cirr`):
- `captions/cap.rc2.{train,val,test,novel}.json` and `image_splits/split.rc2.{split}.json` (CIRR format);
- `images/{train,val,test}/{split}-NNNNNN.png`; the `novel` split reuses the test queries and test images, with
  captions from a disjoint phrasing family (shapes_captions.py);
- `scenes/scenes.{split}.json`: each image's objects and each query's modification type (for diagnostics);
- `shapes.json`: config and counts, written last: its presence marks the dataset complete.

Queries come in image sets, like CIRR's: a reference and five edited scenes of one modification type, chosen to
be each other's hard negatives, so each edited scene is a query target whose siblings are the other four.
Every scene is unique within a split, so the target is the one gallery image that matches.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cirflow.core.config import check_positive
from cirflow.core.files import publish_dir, temp_dir_beside
from cirflow.models.data.shapes_captions import PHRASINGS, describe_edit
from cirflow.models.data.shapes_scene import (
    CELLS,
    MODIFICATIONS,
    SIZES,
    Edit,
    Scene,
    apply_edit,
    render_scene,
    sample_image_set,
    save_png,
)

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "novel")
MANIFEST = "shapes.json"
FORMAT_VERSION = 1  # bump when the same config would produce different files
# Independent random streams: (seed, purpose, split, index) -> one RNG per image set, image or caption.
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "novel": 3}
_SCENES, _PIXELS, _CAPTIONS = 0, 1, 2
_MAX_REDRAWS = 1000  # an image set is redrawn while it repeats a scene already in the split
_RENDER_CHUNK = 256  # images per pool task: large enough to amortise pickling, small enough to balance


@dataclass(frozen=True)
class ShapesConfig:
    """What to generate; counts are queries (an image set of six images holds up to five of them)."""

    seed: int = 0
    scale: float = 1.0  # multiplies every count below
    image_size: int = 64  # benchmarks.md: small enough to train a model from scratch in minutes on CPU
    train_triplets: int = 20_000
    val_queries: int = 2_000
    test_queries: int = 2_000
    workers: int = 2  # processes used to render/save PNGs; output does not depend on it

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"ShapesConfig.seed must be a non-negative integer, got {self.seed!r}")
        check_positive(self, "scale", "workers", "train_triplets", "val_queries", "test_queries")
        if self.image_size < 16:
            raise ValueError(f"ShapesConfig.image_size must be >= 16 (smaller shapes are unreadable), "
                             f"got {self.image_size!r}")
        for split in ("train", "val", "test"):
            if self.query_count(split) < 1:
                raise ValueError(f"ShapesConfig: {split} must get at least 1 query after scaling, got "
                                 f"{self.query_count(split)} (scale {self.scale!r})")

    def query_count(self, split: str) -> int:
        """Queries in `split` after scaling ("novel" rewords the test queries, so it has as many)."""
        base = {"train": self.train_triplets, "val": self.val_queries, "test": self.test_queries,
                "novel": self.test_queries}[split]
        return round(base * self.scale)


@dataclass(frozen=True)
class _ImageSet:
    set_id: int
    members: tuple[int, ...]  # image indices in img_set order: reference, targets and fillers, shuffled


@dataclass(frozen=True)
class _Query:
    pair_id: int
    set_id: int
    reference: int  # image index
    target: int
    edit: Edit
    size_needed: bool  # an added object whose other-size twin is in the gallery must be named with its size


@dataclass(frozen=True)
class _SplitPlan:
    scenes: list[Scene]  # image index -> scene
    sets: list[_ImageSet]
    queries: list[_Query]


def generate_shapes(config: ShapesConfig, out_dir: Path) -> Path:
    """Write the shapes benchmark for `config` to `out_dir` and return it; a no-op if it is already there.

    Raises ValueError if `out_dir` holds a shapes dataset made with another config, FileExistsError if it
    holds something else. Built in a temp directory beside `out_dir` and renamed into place when complete.
    """
    out_dir = Path(out_dir)
    if _existing_matches(config, out_dir):
        logger.info("shapes dataset for %s already complete in %s; not regenerating", config, out_dir)
        return out_dir
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists but is not a complete shapes dataset (no {MANIFEST}); "
                              "delete it or choose another directory")
    start = time.perf_counter()
    with temp_dir_beside(out_dir) as tmp:
        _build(config, tmp)
        # Unflushed: flushing ~100k regenerable PNGs would cost more than it protects.
        if not publish_dir(tmp, out_dir, twin_ok=lambda found: _existing_matches(config, found), flush=False):
            logger.info("another process completed %s first; discarding this copy", out_dir)
    logger.info("generated shapes dataset in %s in %.1f s", out_dir, time.perf_counter() - start)
    return out_dir


def plan_split(config: ShapesConfig, split: str) -> _SplitPlan:
    """Scenes, image sets and queries of `split` ("train", "val" or "test"); pure and deterministic."""
    wanted = config.query_count(split)
    scenes: list[Scene] = []
    index_of: dict[Scene, int] = {}
    sets: list[_ImageSet] = []
    queries: list[_Query] = []
    per_kind = dict.fromkeys(MODIFICATIONS, 0)
    while len(queries) < wanted:
        set_id = len(sets)
        rng = random.Random(_seed(config.seed, _SCENES, split, set_id))
        # Balance query counts: sets of some kinds hold fewer queries (size edits: one per object).
        fewest = min(per_kind.values())
        kind = rng.choice([k for k in MODIFICATIONS if per_kind[k] == fewest])
        for _ in range(_MAX_REDRAWS):
            reference, edits, fillers = sample_image_set(rng, kind)
            targets = [apply_edit(reference, e) for e in edits]
            new_scenes = [reference, *targets, *fillers]
            if not any(s in index_of for s in new_scenes):
                break
        else:
            raise RuntimeError(f"{split}: image set {set_id} keeps repeating scenes; the split is too large")
        for scene in new_scenes:
            index_of[scene] = len(scenes)
            scenes.append(scene)
        sets.append(_ImageSet(set_id, tuple(rng.sample([index_of[s] for s in new_scenes], len(new_scenes)))))
        for edit, target in zip(edits, targets):
            if len(queries) == wanted:
                break
            queries.append(_Query(len(queries), set_id, index_of[reference], index_of[target], edit, False))
            per_kind[kind] += 1
    # Only now is the gallery complete: an addition must name its size if the other-size twin is anywhere in it.
    queries = [
        replace(q, size_needed=q.edit.kind == "add" and _size_twin(scenes[q.reference], q.edit) in index_of)
        for q in queries
    ]
    return _SplitPlan(scenes, sets, queries)


def _build(config: ShapesConfig, root: Path) -> None:
    plans = {split: plan_split(config, split) for split in ("train", "val", "test")}
    plans["novel"] = plans["test"]
    for split in ("train", "val", "test"):
        logger.info("%s: %d queries, %d images in %d sets", split, len(plans[split].queries),
                    len(plans[split].scenes), len(plans[split].sets))
    for folder in ("captions", "image_splits", "scenes"):
        (root / folder).mkdir(parents=True)
    tasks = []
    for split in ("train", "val", "test"):
        (root / "images" / split).mkdir(parents=True)
        tasks += [
            (str(root / _image_path(split, i)), scene, (config.seed, _PIXELS, _SPLIT_IDS[split], i), config.image_size)
            for i, scene in enumerate(plans[split].scenes)
        ]
    start = time.perf_counter()
    chunks = [tasks[i : i + _RENDER_CHUNK] for i in range(0, len(tasks), _RENDER_CHUNK)]
    if config.workers == 1:
        for chunk in chunks:
            _render_chunk(chunk)
    else:
        with multiprocessing.Pool(config.workers) as pool:
            for _ in pool.imap_unordered(_render_chunk, chunks):
                pass
    logger.info("rendered %d images with %d workers in %.1f s", len(tasks), config.workers,
                time.perf_counter() - start)

    summary: dict[str, Any] = {}
    for split in SPLITS:
        image_split = "test" if split == "novel" else split  # novel: the test queries, reworded
        plan = plans[split]
        names = [_image_name(image_split, i) for i in range(len(plan.scenes))]
        captions = _caption_entries(config, split, plan, names)
        _write_json(root / "captions" / f"cap.rc2.{split}.json", captions)
        _write_json(root / "image_splits" / f"split.rc2.{split}.json",
                    {n: "./" + _image_path(image_split, i) for i, n in enumerate(names)})
        _write_json(root / "scenes" / f"scenes.{split}.json", {
            "fields": ["position", "shape", "colour", "size"],
            "images": {n: [[CELLS[o.cell], o.shape, o.colour, o.size] for o in s] for n, s in zip(names, plan.scenes)},
            "modifications": {str(q.pair_id): q.edit.kind for q in plan.queries},
        })
        summary[split] = {
            "queries": len(plan.queries), "images": len(plan.scenes), "image_sets": len(plan.sets),
            "image_dir": f"images/{image_split}", "phrasing": "novel" if split == "novel" else "train",
            "modifications": {k: sum(q.edit.kind == k for q in plan.queries) for k in MODIFICATIONS},
        }
    # Written last: its presence is what marks the dataset complete.
    _write_json(root / MANIFEST, {"version": FORMAT_VERSION, "config": _recorded_config(config), "splits": summary})


def _caption_entries(config: ShapesConfig, split: str, plan: _SplitPlan, names: list[str]) -> list[dict[str, Any]]:
    phrasing = PHRASINGS["novel" if split == "novel" else "train"]
    entries = []
    for q in plan.queries:
        rng = random.Random(_seed(config.seed, _CAPTIONS, split, q.pair_id))
        name_size = q.size_needed or rng.random() < 0.5
        members = plan.sets[q.set_id].members
        reference, target = names[q.reference], names[q.target]
        entries.append({
            "pairid": q.pair_id,
            "reference": reference,
            "target_hard": target,
            "target_soft": {target: 1.0},
            "caption": describe_edit(plan.scenes[q.reference], q.edit, phrasing, rng, name_size),
            "img_set": {
                "id": q.set_id,
                "members": [names[m] for m in members],
                "reference_rank": members.index(q.reference),
                "target_rank": members.index(q.target),
            },
        })
    return entries


def _render_chunk(chunk: list[tuple[str, Scene, tuple[int, ...], int]]) -> int:
    """Pool task: render and save a batch of images; each image's noise comes from its own seed."""
    for path, scene, entropy, image_size in chunk:
        save_png(render_scene(scene, image_size, np.random.default_rng(list(entropy))), Path(path))
    return len(chunk)


def _seed(seed: int, purpose: int, split: str, index: int) -> int:
    state = np.random.SeedSequence([seed, purpose, _SPLIT_IDS[split], index]).generate_state(4)
    return int.from_bytes(state.tobytes(), "little")


def _size_twin(reference: Scene, edit: Edit) -> Scene:
    """The scene `edit` would give if its new object had the other size."""
    assert edit.new is not None
    other = SIZES[1 - SIZES.index(edit.new.size)]
    return apply_edit(reference, replace(edit, new=replace(edit.new, size=other)))


def _image_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def _image_path(split: str, index: int) -> str:
    return f"images/{split}/{_image_name(split, index)}.png"


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def _recorded_config(config: ShapesConfig) -> dict[str, Any]:
    # `workers` changes how, not what: leaving it out keeps shapes.json identical for any worker count.
    recorded = asdict(config)
    del recorded["workers"]
    return recorded


def _existing_matches(config: ShapesConfig, out_dir: Path) -> bool:
    """True if `out_dir` is complete for `config`; ValueError if it is complete for another config."""
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        return False
    found = json.loads(manifest.read_text(encoding="utf-8"))
    wanted = {"version": FORMAT_VERSION, "config": _recorded_config(config)}
    have = {"version": found.get("version"), "config": found.get("config")}
    if have != wanted:
        raise ValueError(f"{out_dir} holds a shapes dataset generated with {have}, not the requested {wanted}; "
                         "delete it or choose another directory")
    return True



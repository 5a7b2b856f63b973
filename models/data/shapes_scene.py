"""The shapes benchmark's scene model: vocabulary, edits, hard-negative variants and rendering.

A scene is a canonical tuple of objects sorted by grid cell (at most one object per cell), so two scenes
are the same picture exactly when their tuples are equal. Every edit replaces the object in one cell:
add (nothing -> object), remove (object -> nothing), and colour/shape/size/move (object -> changed object;
a move's new object sits in another cell). Jitter and noise belong to the rendering, not to the scene.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw

# The vocabulary is fixed (benchmarks.md) so that independently rendered scenes are compatible.
CELLS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
SHAPES = ("square", "circle", "triangle")
SIZES = ("small", "large")
COLOURS = MappingProxyType(
    {
        "gray": (128, 128, 128),
        "red": (220, 40, 40),
        "blue": (40, 70, 220),
        "green": (40, 170, 60),
        "brown": (140, 90, 40),
        "purple": (140, 60, 180),
        "cyan": (40, 200, 210),
        "yellow": (235, 210, 40),
    }
)
HALF_WIDTH = MappingProxyType({"small": 1 / 12, "large": 1 / 7})  # fraction of the canvas side
BACKGROUND = (235, 235, 235)
MODIFICATIONS = ("add", "remove", "colour", "shape", "size", "move")
MAX_OBJECTS = 5
CELL_JITTER = 0.10  # of the cell size
COLOUR_JITTER = 10  # per channel
PIXEL_NOISE = 3  # per pixel and channel, uniform
SUPERSAMPLE = 4  # draw at 4x and box-filter down, so that 10 px triangles keep clean edges
SET_VARIANTS = 5  # an image set: the reference and five edited scenes (CIRR's six members)
T = TypeVar("T")


@dataclass(frozen=True, order=True)
class SceneObject:
    cell: int  # index into CELLS
    shape: str
    colour: str
    size: str


Scene = tuple[SceneObject, ...]  # sorted by cell, cells distinct


@dataclass(frozen=True)
class Edit:
    """Replace the object in `cell` by `new` (None: remove it); `kind` is one of MODIFICATIONS."""

    kind: str
    cell: int
    new: SceneObject | None


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    kept = [o for o in scene if o.cell != edit.cell]
    if edit.new is not None:
        assert all(o.cell != edit.new.cell for o in kept), "edit lands on an occupied cell"
        kept.append(edit.new)
    return tuple(sorted(kept))


def object_at(scene: Scene, cell: int) -> SceneObject:
    return next(o for o in scene if o.cell == cell)


def empty_cells(scene: Scene) -> list[int]:
    used = {o.cell for o in scene}
    return [c for c in range(len(CELLS)) if c not in used]


def random_object(rng: random.Random, cell: int) -> SceneObject:
    return SceneObject(cell, rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES))


def random_scene(rng: random.Random, min_objects: int, max_objects: int) -> Scene:
    cells = rng.sample(range(len(CELLS)), rng.randint(min_objects, max_objects))
    return tuple(sorted(random_object(rng, c) for c in cells))


def _changes(obj: SceneObject, attribute: str, free_cells: Sequence[int]) -> list[SceneObject]:
    """Every version of `obj` that differs in exactly `attribute` ("cell" moves it to a free cell)."""
    if attribute == "cell":
        return [replace(obj, cell=c) for c in free_cells]
    values = {"colour": list(COLOURS), "shape": SHAPES, "size": SIZES}[attribute]
    return [replace(obj, **{attribute: v}) for v in values if v != getattr(obj, attribute)]


_EDITED_ATTRIBUTE = MappingProxyType({"colour": "colour", "shape": "shape", "size": "size", "move": "cell"})
# Scenes must keep 1..5 objects before and after the edit.
_REFERENCE_OBJECTS = MappingProxyType(
    {"add": (1, MAX_OBJECTS - 1), "remove": (2, MAX_OBJECTS), "colour": (1, MAX_OBJECTS),
     "shape": (1, MAX_OBJECTS), "size": (1, MAX_OBJECTS), "move": (1, MAX_OBJECTS)}
)


def sample_image_set(rng: random.Random, kind: str) -> tuple[Scene, list[Edit], list[Scene]]:
    """A reference, up to five edits of type `kind` (each one a query) and filler scenes to make six.

    The edits are chosen so that they are each other's hard negatives: most of them touch the same focus
    object (right object, wrong value), the rest the same value on other objects (wrong object). Where the
    reference allows fewer than five edits of this type (size: one per object), fillers are further
    perturbations of an edited object (resized *and* recoloured, ...), which still differ from every
    query's target only in the modified part.
    """
    reference = random_scene(rng, *_REFERENCE_OBJECTS[kind])
    free = empty_cells(reference)
    focus = rng.choice(reference)
    if kind == "add":
        base = random_object(rng, rng.choice(free))
        near = [c for a in ("colour", "shape", "size") for c in _changes(base, a, ())]
        far = _changes(base, "cell", [c for c in free if c != base.cell])
        edits = [Edit("add", n.cell, n) for n in [base, *_pick_mix(rng, near, far, SET_VARIANTS - 1)]]
    elif kind == "remove":
        edits = [Edit("remove", o.cell, None) for o in rng.sample(reference, min(len(reference), SET_VARIANTS))]
    else:
        attribute = _EDITED_ATTRIBUTE[kind]
        near = [Edit(kind, focus.cell, n) for n in _changes(focus, attribute, free)]
        far = [Edit(kind, o.cell, n) for o in reference if o != focus for n in _changes(o, attribute, free)]
        edits = _pick_mix(rng, near, far, SET_VARIANTS)
    members = {reference, *(apply_edit(reference, e) for e in edits)}
    assert len(members) == len(edits) + 1, "edits must give distinct scenes"
    fillers: list[Scene] = []
    candidates = _filler_candidates(rng, reference, edits)
    for _ in range(1000):  # far more than needed: every kind has dozens of distinct near-misses
        if len(members) + len(fillers) == SET_VARIANTS + 1:
            break
        scene = next(candidates)
        if scene not in members and scene not in fillers:
            fillers.append(scene)
    if len(members) + len(fillers) != SET_VARIANTS + 1:
        raise RuntimeError(f"could not fill an image set for {kind!r} edits of {reference}")
    return reference, edits, fillers


def _pick_mix(rng: random.Random, near: list[T], far: list[T], count: int) -> list[T]:
    """About half from `near` (same object, other values), the rest from `far`, topped up from either."""
    near, far = rng.sample(near, len(near)), rng.sample(far, len(far))
    take_near = min(len(near), (count + 1) // 2)
    picked = near[:take_near] + far[: count - take_near]
    return picked + near[take_near : take_near + count - len(picked)]


def _filler_candidates(rng: random.Random, reference: Scene, edits: list[Edit]) -> Iterator[Scene]:
    """Endless stream of plausible near-misses of the set's edits (callers skip duplicates)."""
    while True:
        edit = rng.choice(edits)
        if edit.new is None:
            # Remove: the object is still there but altered, or one more object is gone too.
            gone = object_at(reference, edit.cell)
            options = [Edit("remove", edit.cell, n) for a in ("colour", "shape", "size")
                       for n in _changes(gone, a, ())]
            target = apply_edit(reference, edit)
            if len(target) > 1:
                extra = rng.choice(target)
                yield apply_edit(target, Edit("remove", extra.cell, None))
            yield apply_edit(reference, rng.choice(options))
            continue
        # Otherwise: the edited object, additionally changed in one attribute the edit did not touch.
        target = apply_edit(reference, edit)
        untouched = [a for a in ("colour", "shape", "size", "cell") if a != _EDITED_ATTRIBUTE.get(edit.kind)]
        attribute = rng.choice(untouched)
        options = _changes(edit.new, attribute, empty_cells(target))
        if options:
            yield apply_edit(target, Edit(edit.kind, edit.new.cell, rng.choice(options)))


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 picture: flat shapes jittered in their cells, then mild uniform pixel noise."""
    big = image_size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell_side = big / 3
    for obj in scene:
        row, col = divmod(obj.cell, 3)
        dx, dy = rng.uniform(-CELL_JITTER, CELL_JITTER, size=2) * cell_side
        cx, cy = (col + 0.5) * cell_side + dx, (row + 0.5) * cell_side + dy
        h = HALF_WIDTH[obj.size] * big
        rgb = np.clip(np.array(COLOURS[obj.colour]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)
        fill = tuple(int(v) for v in rgb)
        box = (cx - h, cy - h, cx + h, cy + h)
        if obj.shape == "square":
            draw.rectangle(box, fill=fill)
        elif obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        else:  # an upward triangle filling the same box, so the three shapes are read by outline alone
            draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    pixels = np.asarray(image.reduce(SUPERSAMPLE), dtype=np.int16)  # (H, W, 3)
    pixels = pixels + rng.integers(-PIXEL_NOISE, PIXEL_NOISE + 1, pixels.shape, dtype=np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def save_png(pixels: np.ndarray, path: Path) -> None:
    # Pillow writes no tIME chunk unless asked, so the bytes depend on the pixels alone.
    Image.fromarray(pixels, mode="RGB").save(path, format="PNG", compress_level=1)

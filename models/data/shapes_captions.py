"""Caption templates and synonyms for the shapes benchmark, in two disjoint families.

The "train" family phrases the train, val and test splits; the "novel" family phrases the novel-phrasing
test split. The two share no template and no content word (colours, shapes, sizes, positions, nouns, verbs),
only function words such as "the", "a", "to", so the novel split measures generalisation to unseen wording.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from cirflow.models.data.shapes_scene import Edit, Scene, object_at


@dataclass(frozen=True)
class Phrasing:
    """One family of synonyms and templates. Templates use {obj} (a referring expression), {a_new} and
    {where} (add), {colour} / {a_colour}, {a_shape}, {size} and {to} (a destination)."""

    colours: Mapping[str, tuple[str, ...]]
    shapes: Mapping[str, tuple[str, ...]]
    sizes: Mapping[str, tuple[str, ...]]
    nouns: tuple[str, ...]  # for an object whose shape the caption does not name
    places: tuple[tuple[str, ...], ...]  # per cell (CELLS order), e.g. "in the top left"
    templates: Mapping[str, tuple[str, ...]]  # "add", "remove", "colour", "shape", "grow", "shrink", "move"


TRAIN_PHRASING = Phrasing(
    colours=MappingProxyType({
        "gray": ("gray", "grey"), "red": ("red",), "blue": ("blue",), "green": ("green",), "brown": ("brown",),
        "purple": ("purple", "violet"), "cyan": ("cyan", "turquoise"), "yellow": ("yellow",),
    }),
    shapes=MappingProxyType({"square": ("square", "box"), "circle": ("circle", "ball"), "triangle": ("triangle",)}),
    sizes=MappingProxyType({"small": ("small", "little", "tiny"), "large": ("large", "big")}),
    nouns=("object", "shape", "item", "one"),
    places=(
        ("in the top left", "at the upper left", "in the top left corner"),
        ("at the top", "in the top middle", "at the top center"),
        ("in the top right", "at the upper right", "in the top right corner"),
        ("on the left", "at the middle left", "on the left side"),
        ("in the center", "in the middle"),
        ("on the right", "at the middle right", "on the right side"),
        ("in the bottom left", "at the lower left", "in the bottom left corner"),
        ("at the bottom", "in the bottom middle", "at the bottom center"),
        ("in the bottom right", "at the lower right", "in the bottom right corner"),
    ),
    templates=MappingProxyType({
        "add": ("add {a_new} {where}", "put {a_new} {where}", "{where}, add {a_new}",
                "there should be {a_new} {where}", "draw {a_new} {where}"),
        "remove": ("remove {obj}", "delete {obj}", "take away {obj}", "take {obj} out", "{obj} should be removed"),
        "colour": ("make {obj} {colour}", "change {obj} to {colour}", "paint {obj} {colour}", "turn {obj} {colour}",
                   "change the color of {obj} to {colour}", "{obj} should be {colour}"),
        "shape": ("make {obj} {a_shape}", "change {obj} into {a_shape}", "turn {obj} into {a_shape}",
                  "replace {obj} with {a_shape} of the same color", "{obj} should be {a_shape}"),
        "grow": ("make {obj} bigger", "make {obj} larger", "enlarge {obj}", "{obj} should be {size}",
                 "increase the size of {obj}"),
        "shrink": ("make {obj} smaller", "shrink {obj}", "{obj} should be {size}", "decrease the size of {obj}",
                   "make {obj} {size}"),
        "move": ("move {obj} {to}", "shift {obj} {to}", "slide {obj} {to}", "{obj} should move {to}",
                 "move {obj} over {to}"),
    }),
)

NOVEL_PHRASING = Phrasing(
    colours=MappingProxyType({
        "gray": ("silver", "slate"), "red": ("crimson", "scarlet"), "blue": ("cobalt", "sapphire"),
        "green": ("emerald", "jade"), "brown": ("chocolate", "chestnut"), "purple": ("plum", "amethyst"),
        "cyan": ("aqua", "teal"), "yellow": ("golden", "lemon"),
    }),
    shapes=MappingProxyType({"square": ("tile", "block"), "circle": ("disc", "dot"), "triangle": ("wedge", "pyramid")}),
    sizes=MappingProxyType({"small": ("miniature", "petite", "wee"), "large": ("huge", "giant", "oversized")}),
    nouns=("thing", "figure", "piece"),
    places=(
        ("in the northwest", "in the north-west quadrant"),
        ("in the north", "along the northern edge"),
        ("in the northeast", "in the north-east quadrant"),
        ("in the west", "along the western edge"),
        ("at the centre", "in the heart of the picture"),
        ("in the east", "along the eastern edge"),
        ("in the southwest", "in the south-west quadrant"),
        ("in the south", "along the southern edge"),
        ("in the southeast", "in the south-east quadrant"),
    ),
    templates=MappingProxyType({
        "add": ("insert {a_new} {where}", "place {a_new} {where}", "{where}, include {a_new}",
                "introduce {a_new} {where}", "we need {a_new} {where}"),
        "remove": ("erase {obj}", "eliminate {obj}", "get rid of {obj}", "discard {obj}", "{obj} must go"),
        "colour": ("dye {obj} {colour}", "tint {obj} {colour}", "give {obj} {a_colour} hue",
                   "recolour {obj} as {colour}", "{obj} needs {a_colour} tint"),
        "shape": ("reshape {obj} into {a_shape}", "morph {obj} into {a_shape}", "transform {obj} into {a_shape}",
                  "swap {obj} for {a_shape} keeping its hue", "{obj} must become {a_shape}"),
        "grow": ("scale up {obj}", "magnify {obj}", "blow up {obj}", "expand {obj}", "{obj} must become {size}"),
        "shrink": ("scale down {obj}", "reduce {obj}", "compress {obj}", "diminish {obj}",
                   "{obj} must become {size}"),
        "move": ("relocate {obj} {to}", "transfer {obj} {to}", "reposition {obj} {to}", "carry {obj} {to}",
                 "send {obj} {to}"),
    }),
)

PHRASINGS: Mapping[str, Phrasing] = MappingProxyType({"train": TRAIN_PHRASING, "novel": NOVEL_PHRASING})

# Attribute sets a referring expression may use; only those that single the object out are drawn.
_REFERRING = (
    ("shape",), ("colour",), ("size",), ("colour", "shape"), ("size", "shape"), ("size", "colour"),
    ("size", "colour", "shape"), ("cell",), ("shape", "cell"), ("colour", "shape", "cell"),
)


def describe_edit(reference: Scene, edit: Edit, phrasing: Phrasing, rng: random.Random, name_size: bool) -> str:
    """A caption that tells how to turn `reference` into `apply_edit(reference, edit)`.

    Edited objects are named by attributes (or position) that single them out in the reference; an added
    object is named by colour, shape and position, and by size when `name_size` (required when the gallery
    holds the same addition in the other size).
    """
    values: dict[str, str] = {}
    new = edit.new
    if edit.kind == "add":
        assert new is not None
        words = [rng.choice(phrasing.sizes[new.size])] if name_size else []
        words += [rng.choice(phrasing.colours[new.colour]), rng.choice(phrasing.shapes[new.shape])]
        values["a_new"] = _with_article(" ".join(words))
        values["where"] = rng.choice(phrasing.places[new.cell])
        key = "add"
    else:
        values["obj"] = _refer(reference, edit.cell, phrasing, rng)
        key = edit.kind
        if new is not None:
            values["colour"] = rng.choice(phrasing.colours[new.colour])
            values["a_colour"] = _with_article(values["colour"])
            values["a_shape"] = _with_article(rng.choice(phrasing.shapes[new.shape]))
            values["size"] = rng.choice(phrasing.sizes[new.size])
            # "in the top left" -> "to the top left": a destination is a place with another preposition.
            values["to"] = "to " + rng.choice(phrasing.places[new.cell]).split(" ", 1)[1]
            if edit.kind == "size":
                key = "grow" if new.size == "large" else "shrink"
    caption = rng.choice(phrasing.templates[key]).format(**values)
    return caption[0].upper() + caption[1:]


def _refer(scene: Scene, cell: int, phrasing: Phrasing, rng: random.Random) -> str:
    """"the small red circle", "the one on the left": the object in `cell`, unambiguous within `scene`."""
    obj = object_at(scene, cell)
    others = [o for o in scene if o.cell != cell]
    unique = [
        attrs for attrs in _REFERRING
        if not any(all(getattr(o, a) == getattr(obj, a) for a in attrs) for o in others)
    ]
    attrs = rng.choice(unique)  # never empty: ("cell",) always singles the object out
    words = ["the"]
    if "size" in attrs:
        words.append(rng.choice(phrasing.sizes[obj.size]))
    if "colour" in attrs:
        words.append(rng.choice(phrasing.colours[obj.colour]))
    words.append(rng.choice(phrasing.shapes[obj.shape] if "shape" in attrs else phrasing.nouns))
    if "cell" in attrs:
        words.append(rng.choice(phrasing.places[cell]))
    return " ".join(words)


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def vocabulary(phrasing: Phrasing) -> frozenset[str]:
    """Every lower-case word a family can produce (templates, synonyms, places, nouns)."""
    texts = [*phrasing.nouns, *(p for places in phrasing.places for p in places)]
    for table in (phrasing.colours, phrasing.shapes, phrasing.sizes, phrasing.templates):
        texts += [t for options in table.values() for t in options]
    return frozenset(w for t in texts for w in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", t.lower())))


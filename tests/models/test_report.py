"""Report: the metrics table text and the example sheet PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirflow.models.data.types import CIRSplit, Query
from cirflow.models.report import format_table, save_example_sheet


def test_format_table() -> None:
    rows = {
        "composed": {"Avg": 0.5, "R@1": 0.123456, "Rsubset@1": 0.25, "R@5": 1.0},
        "text-only": {"R@1": 0.01, "extra": 0.5},
    }
    text = format_table(rows, "shapes/test")
    lines = text.splitlines()
    assert lines[0] == "shapes/test"
    # Known metrics in reading order, then unknown ones in first-seen order.
    assert lines[2].split() == ["method", "R@1", "R@5", "Rsubset@1", "Avg", "extra"]
    assert lines[4].split() == ["composed", "12.35", "100.00", "25.00", "50.00", "-"]
    assert lines[5].split() == ["text-only", "1.00", "-", "-", "-", "50.00"]
    # Fixed width: every column ends at the same offset on every line.
    assert len({len(line) for line in lines[2:] if not line.startswith("-")} | {len(lines[3])}) == 1


def _sheet_split(tmp_path: Path, n_images: int = 8) -> tuple[CIRSplit, list[str]]:
    names = [f"im{i}" for i in range(n_images)]
    images = {}
    for i, name in enumerate(names):
        path = tmp_path / f"{name}.png"
        # Mixed aspect ratios: thumbnails must fit the square cell either way.
        Image.new("RGB", (20 + 10 * (i % 2), 30), (25 * i, 100, 200 - 20 * i)).save(path)
        images[name] = path
    queries = [
        Query(0, "im0", "make the square a long long long long long long long red circle " * 3, "im2"),
        Query(1, "im1", "add a dot", "im7"),  # target not in the top 5
        Query(2, "im2", "no target here", None),
    ]
    return CIRSplit("sheet/val", queries, images, remove_reference=True, protocol="cirr"), names


def test_example_sheet_size(tmp_path: Path) -> None:
    split, names = _sheet_split(tmp_path)
    topk = np.array([[1, 2, 3, 4, 5, 6], [0, 2, 3, 4, 5, 7], [0, 1, 3, 4, 5, 6]])
    out = save_example_sheet(split, names, topk, [0, 1, 2], tmp_path / "out" / "sheet.png", image_size=32)
    assert out == tmp_path / "out" / "sheet.png"
    assert not list(out.parent.glob("*.tmp"))
    with Image.open(out) as sheet:
        assert sheet.format == "PNG"
        # cell = 32 + 2*4 = 40; width = 8 + 40 + 8 + 2*40 (caption) + 5*(8 + 40) + 8 = 384;
        # row = 40 + 16 (label) + 8 = 64; height = 24 (title) + 3*64 + 8 = 224.
        assert sheet.size == (384, 224)
        # Query 0's target im2 is its #2 result: the thick green frame starts at the second result cell.
        x = 8 + 40 + 8 + 80 + 8 + 48
        assert sheet.getpixel((x + 1, 24 + 20)) == (0, 170, 0)


def test_example_sheet_fewer_results_and_bad_input(tmp_path: Path) -> None:
    split, names = _sheet_split(tmp_path)
    topk = np.array([[1, 2], [0, 2], [0, 1]])
    out = save_example_sheet(split, names, topk, [1], tmp_path / "two.png", image_size=16)
    with Image.open(out) as sheet:
        # cell = 24; width = 8 + 24 + 8 + 48 + 2*(8 + 24) + 8 = 160; height = 24 + (24 + 16 + 8) + 8 = 80.
        assert sheet.size == (160, 80)
    with pytest.raises(ValueError, match="query_indices"):
        save_example_sheet(split, names, topk, [3], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="topk"):
        save_example_sheet(split, names, topk[:2], [0], tmp_path / "bad.png")

"""Human-readable results: a fixed-width metrics table and a PNG sheet of example retrievals."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from cirflow.core.files import write_atomic
from cirflow.models.data.types import CIRSplit

logger = logging.getLogger(__name__)

# Columns in reading order: the gallery recalls, the subset recalls, then the headline average.
METRIC_ORDER = ("R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3", "Avg")

# Sheet layout, in pixels. A cell is an image inside a frame of BORDER on each side, with a label below.
SHEET_RESULTS = 5
MARGIN = 8
BORDER = 4
LABEL_HEIGHT = 16
TITLE_HEIGHT = 24
TARGET_COLOUR = (0, 170, 0)
OTHER_COLOUR = (150, 150, 150)
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)


def format_table(rows: dict[str, dict[str, float]], title: str) -> str:
    """One line per row name, metrics as percentages with 2 decimals; a metric a row lacks shows as "-"."""
    present = {key for metrics in rows.values() for key in metrics}
    extra = [key for metrics in rows.values() for key in metrics if key not in METRIC_ORDER]
    columns = [c for c in METRIC_ORDER if c in present] + list(dict.fromkeys(extra))
    name_width = max([len("method")] + [len(name) for name in rows])
    widths = [max(len(c), len("100.00")) for c in columns]

    def line(first: str, cells: Sequence[str]) -> str:
        return "  ".join([first.ljust(name_width)] + [c.rjust(w) for c, w in zip(cells, widths)]).rstrip()

    header = line("method", columns)
    out = [title, "=" * max(len(title), len(header)), header, "-" * len(header)]
    for name, metrics in rows.items():
        out.append(line(name, [f"{100 * metrics[c]:.2f}" if c in metrics else "-" for c in columns]))
    if not rows:
        out.append("(no rows)")
    return "\n".join(out) + "\n"


def save_example_sheet(
    split: CIRSplit,
    gallery_names: list[str],
    topk: np.ndarray,
    query_indices: list[int],
    out_png: Path,
    image_size: int = 96,
) -> Path:
    """Draw one row per query: reference, caption, top-5 results (target framed green); returns `out_png`.

    `topk` (Q, k) holds gallery indices for every query of the split, in split order; rows are picked by
    `query_indices`.
    """
    topk = np.asarray(topk)
    if topk.ndim != 2 or topk.shape[0] != len(split.queries):
        raise ValueError(f"topk must be (queries, k) = ({len(split.queries)}, k), got {topk.shape}")
    if topk.size and (topk.min() < 0 or topk.max() >= len(gallery_names)):
        raise ValueError(f"topk holds indices outside the gallery of {len(gallery_names)}")
    if not query_indices:
        raise ValueError("query_indices is empty: nothing to draw")
    bad = [q for q in query_indices if not 0 <= q < len(split.queries)]
    if bad:
        raise ValueError(f"query_indices {bad} are outside [0, {len(split.queries)})")

    n_results = min(SHEET_RESULTS, topk.shape[1])
    cell = image_size + 2 * BORDER
    caption_width = 2 * cell
    row_height = cell + LABEL_HEIGHT + MARGIN
    width = MARGIN + cell + MARGIN + caption_width + n_results * (MARGIN + cell) + MARGIN
    height = TITLE_HEIGHT + len(query_indices) * row_height + MARGIN

    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    title = f"{split.name}: reference | caption | top-{n_results} (green frame = target)"
    draw.text((MARGIN, MARGIN // 2), title, fill=TEXT_COLOUR, font=font)

    for row, q in enumerate(query_indices):
        query = split.queries[q]
        y = TITLE_HEIGHT + row * row_height
        x = MARGIN
        _draw_cell(sheet, draw, font, split.images.get(query.reference), (x, y), image_size, OTHER_COLOUR, "reference")
        x += cell + MARGIN

        names = [gallery_names[i] for i in topk[q, :n_results]]
        text = query.caption
        if query.target is not None and query.target not in names:
            text += f" [target not in top-{n_results}]"
        _draw_wrapped(draw, font, text, (x, y), caption_width, cell + LABEL_HEIGHT)
        x += caption_width

        for rank, name in enumerate(names, start=1):
            x += MARGIN
            colour = TARGET_COLOUR if name == query.target else OTHER_COLOUR
            _draw_cell(sheet, draw, font, split.images.get(name), (x, y), image_size, colour, f"#{rank}")
            x += cell

    out_png = write_atomic(Path(out_png), lambda tmp: sheet.save(tmp, format="PNG"))
    logger.info("wrote example sheet %s (%d queries)", out_png, len(query_indices))
    return out_png


def _draw_cell(
    sheet: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    path: Path | None,
    origin: tuple[int, int],
    image_size: int,
    colour: tuple[int, int, int],
    label: str,
) -> None:
    x, y = origin
    cell = image_size + 2 * BORDER
    thick = colour == TARGET_COLOUR
    # The frame always occupies BORDER pixels so that every cell has the same geometry; only its width differs.
    draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=colour, width=BORDER if thick else 1)
    thumb = _load_thumbnail(path, image_size)
    sheet.paste(thumb, (x + BORDER + (image_size - thumb.width) // 2, y + BORDER + (image_size - thumb.height) // 2))
    draw.text((x, y + cell + 2), label, fill=colour if thick else TEXT_COLOUR, font=font)


def _load_thumbnail(path: Path | None, image_size: int) -> Image.Image:
    if path is not None:
        try:
            with Image.open(path) as image:
                return ImageOps.contain(image.convert("RGB"), (image_size, image_size))
        except OSError as e:
            # A sheet is for eyes only: one unreadable image should not lose the rest of it.
            logger.warning("cannot read %s for the example sheet: %s", path, e)
    else:
        logger.warning("an image on the example sheet is not in the split's gallery")
    return Image.new("RGB", (image_size, image_size), (220, 220, 220))


def _draw_wrapped(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    text: str,
    origin: tuple[int, int],
    width: int,
    height: int,
) -> None:
    """Greedy word wrap inside a box; lines that do not fit end in "..."."""
    x, y = origin
    _, top, _, bottom = font.getbbox("Ag")
    line_height = bottom - top + 3
    max_lines = max(1, height // line_height)
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width - 2 * MARGIN:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = f"{lines[-1]} ..."
    for i, line in enumerate(lines):
        draw.text((x + MARGIN, y + i * line_height), line, fill=TEXT_COLOUR, font=font)

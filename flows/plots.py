"""PNG plots of a training run and of an index tuning sweep, saved beside the run for Prefect artifacts to link.

Rendered with matplotlib's Agg canvas on a private Figure, never pyplot: pyplot keeps global figure state and
picks a GUI backend, neither of which belongs in a flow worker. Each plot is written whole (cirflow.core.files).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cirflow.core.files import read_json, write_bytes_atomic

RECALLS = ("R@1", "R@5", "R@10")  # plotted beside the chosen metric when the history has them
DPI = 100


def read_training_log(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(rows of run_dir/train_log.jsonl, metrics.json's "history"); either is empty when its file is missing.

    A last line without its newline that does not parse was cut short by a killed run and is skipped; any other
    bad line raises ValueError naming the file and line."""
    log_path, metrics_path = Path(run_dir) / "train_log.jsonl", Path(run_dir) / "metrics.json"
    text = log_path.read_text(encoding="utf-8") if log_path.exists() else ""
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # only the final piece can lack its newline
                continue
            raise ValueError(f"{log_path}: line {number} is not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{log_path}: line {number} is not a JSON object")
        rows.append(row)
    if not metrics_path.exists():
        return rows, []
    metrics = read_json(metrics_path)  # FileFormatError (a ValueError) naming the file when malformed
    history = metrics.get("history", []) if isinstance(metrics, dict) else None
    if not isinstance(history, list):
        raise ValueError(f"{metrics_path}: 'history' must be a list in a JSON object")
    return rows, history


def plot_training(log_rows: list[dict], history: list[dict], out: Path, metric: str = "R@1") -> Path:
    """Training loss (one line per stage) over validation recall, both against each stage's minutes of
    optimisation (the trainer restarts its clock per stage). Rows without "loss" are skipped."""
    losses: dict[str, list[tuple[float, float]]] = {}
    for i, row in enumerate(log_rows):
        if not isinstance(row, dict):
            raise ValueError(f"log_rows[{i}] must be a dict, got {type(row).__name__}")
        if "loss" in row:
            point = (_number(row.get("elapsed"), f"log_rows[{i}]['elapsed']") / 60,
                     _number(row["loss"], f"log_rows[{i}]['loss']"))
            losses.setdefault(str(row.get("stage", "train")), []).append(point)
    curves: dict[tuple[str, str], list[tuple[float, float]]] = {}
    names = [metric] + [m for m in RECALLS if m != metric and any(m in h for h in history if isinstance(h, dict))]
    for i, h in enumerate(history):
        if not isinstance(h, dict):
            raise ValueError(f"history[{i}] must be a dict, got {type(h).__name__}")
        minutes = _number(h.get("minutes"), f"history[{i}]['minutes']")
        for name in names:
            if name in h:
                curves.setdefault((str(h.get("stage", "train")), name), []).append(
                    (minutes, _number(h[name], f"history[{i}][{name!r}]")))
    if history and not any(name == metric for _, name in curves):
        raise ValueError(f"metric {metric!r} is in no history entry; entries have {sorted(history[0])}")

    fig = Figure(figsize=(8, 6), layout="constrained")
    ax_loss, ax_val = fig.subplots(2, 1, sharex=True)
    for stage, points in losses.items():
        # Sorted: a resumed run re-logs the steps after its last checkpoint.
        ax_loss.plot(*zip(*sorted(points)), label=stage)
    ax_loss.set(ylabel="training loss", title="training")
    _legend_or_note(ax_loss, losses, "no loss logged")
    stages = list(dict.fromkeys(stage for stage, _ in curves))
    for (stage, name), points in curves.items():
        label = name if len(stages) == 1 else f"{stage} {name}"
        ax_val.plot(*zip(*points), marker="o", color=f"C{names.index(name)}",
                    linestyle=("-", "--", ":", "-.")[stages.index(stage) % 4],
                    linewidth=2.5 if name == metric else 1.2, label=label)
    ax_val.set(xlabel="minutes", ylabel="validation recall")
    _legend_or_note(ax_val, curves, "no validation yet")
    return _save(fig, out)


def plot_tuning_sweep(sweep: list[dict], out: Path, target: float, chosen: int | None, param: str | None,
                      k: int) -> Path:
    """recall@k against ms per query for each setting of `param` (nprobe, efSearch; None: exact search, one
    point), with the target recall dashed and the chosen setting ringed."""
    if not sweep:
        raise ValueError("sweep is empty: nothing to plot")
    if param is None and len(sweep) != 1:
        raise ValueError(f"sweep of an exact index (param None) must hold one point, got {len(sweep)}")
    points = []
    for i, s in enumerate(sweep):
        if not isinstance(s, dict):
            raise ValueError(f"sweep[{i}] must be a dict, got {type(s).__name__}")
        value = s.get("value")
        if param is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"sweep[{i}]['value'] must be an int {param}, got {value!r}")
        ms = _number(s.get("ms_per_query"), f"sweep[{i}]['ms_per_query']")
        if not ms >= 0:
            raise ValueError(f"sweep[{i}]['ms_per_query'] must be >= 0, got {ms}")
        points.append((value, ms, _number(s.get("recall"), f"sweep[{i}]['recall']")))
    if chosen is not None and param is not None and chosen not in {v for v, _, _ in points}:
        raise ValueError(f"chosen {param}={chosen} is not in the sweep {[v for v, _, _ in points]}")

    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    points.sort(key=lambda p: (p[1], p[2]))
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    ax.plot(xs, ys, marker="o", color="C0")
    for value, x, y in points:
        ax.annotate("exact" if param is None else str(value), (x, y), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
        if chosen is not None and (param is None or value == chosen):
            label = "chosen" if param is None else f"chosen {param}={value}"
            ax.scatter([x], [y], s=160, facecolors="none", edgecolors="C3", linewidths=2, zorder=3, label=label)
    ax.axhline(target, color="C2", linestyle="--", label=f"target {target:g}")
    if min(xs) > 0 and max(xs) > 10 * min(xs):
        ax.set_xscale("log")
    ax.set(xlabel="ms per query", ylabel=f"recall@{k}",
           title=f"recall@{k} vs latency ({param or 'exact search'})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, out)


def _number(value: Any, what: str) -> float:
    # bool is an int to Python, never a loss or a time; NaN passes (a diverged loss is worth seeing as a gap).
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


def _legend_or_note(ax: Any, lines: dict, note: str) -> None:
    if lines:
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", color="grey")


def _save(fig: Figure, out: Path) -> Path:
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return write_bytes_atomic(Path(out), buf.getvalue())

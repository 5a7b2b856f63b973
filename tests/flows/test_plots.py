"""Training and tuning-sweep plots: valid PNGs written whole, empty inputs noted, bad inputs named."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cirflow.flows.plots import plot_training, plot_tuning_sweep, read_training_log

LOG = [{"stage": "train", "step": 20 * i, "loss": 3.0 / i, "lr": 1e-3, "elapsed": 6.0 * i} for i in range(1, 8)]
HISTORY = [{"stage": "train", "step": 100 * i, "minutes": 0.5 * i, "R@1": 0.5 + 0.1 * i, "R@5": 0.8 + 0.05 * i,
            "R@10": 0.9 + 0.02 * i} for i in range(1, 4)]
SWEEP = [{"value": v, "recall": r, "ms_per_query": ms}
         for v, r, ms in [(1, 0.6, 0.05), (2, 0.75, 0.09), (4, 0.88, 0.2), (8, 0.95, 0.4), (16, 0.99, 0.9)]]


def assert_png(path: Path, min_size: tuple[int, int], max_size: tuple[int, int]) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min_size[0] <= image.width <= max_size[0] and min_size[1] <= image.height <= max_size[1], image.size
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left beside it


def test_plot_training_writes_png(tmp_path: Path) -> None:
    out = tmp_path / "plots" / "training.png"  # the folder is made
    two_stages = LOG + [{**row, "stage": "finetune"} for row in LOG] + [{"stage": "train", "step": 1, "lr": 1.0}]
    assert plot_training(two_stages, HISTORY + [{**HISTORY[0], "stage": "finetune"}], out) == out
    assert_png(out, (700, 500), (900, 700))


@pytest.mark.parametrize("rows, history", [(LOG, []), ([], HISTORY), ([], [])])
def test_plot_training_with_nothing_to_draw_still_writes(tmp_path: Path, rows: list, history: list) -> None:
    out = tmp_path / "training.png"
    plot_training(rows, history, out)
    assert_png(out, (700, 500), (900, 700))


@pytest.mark.parametrize("rows, history, metric, message", [
    ([{"stage": "train", "loss": "nan?", "elapsed": 1.0}], [], "R@1", r"log_rows\[0\]\['loss'\]"),
    ([{"stage": "train", "loss": 1.0}], [], "R@1", r"log_rows\[0\]\['elapsed'\]"),
    (["row"], [], "R@1", r"log_rows\[0\] must be a dict"),
    ([], [{"stage": "train", "R@1": 0.5}], "R@1", r"history\[0\]\['minutes'\]"),
    ([], [{"minutes": 1.0, "R@1": None}], "R@1", r"history\[0\]\['R@1'\]"),
    ([], HISTORY, "Recall@1", "metric 'Recall@1' is in no history entry"),
])
def test_plot_training_names_bad_input(tmp_path: Path, rows: list, history: list, metric: str,
                                       message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plot_training(rows, history, tmp_path / "training.png", metric=metric)
    assert not list(tmp_path.iterdir())


def test_read_training_log_skips_a_truncated_last_line(tmp_path: Path) -> None:
    text = "".join(json.dumps(row) + "\n" for row in LOG)
    (tmp_path / "train_log.jsonl").write_text(text + "\n" + '{"stage": "train", "step": 16')  # killed mid-write
    assert read_training_log(tmp_path) == (LOG, [])  # no metrics.json yet: no history
    (tmp_path / "metrics.json").write_text(json.dumps({"val": {}, "history": HISTORY}))
    assert read_training_log(tmp_path) == (LOG, HISTORY)


@pytest.mark.parametrize("text, line", [
    ('{"loss": 1.0}\n{"loss": 1\n{"loss": 2.0}\n', 2),  # a bad line with lines after it is not a torn write
    ('{"loss": 1.0}\n{"loss": 1\n', 2),  # nor is a bad last line that ends in a newline
    ('{"loss": 1.0}\n[1, 2]\n', 2),
])
def test_read_training_log_names_a_bad_line(tmp_path: Path, text: str, line: int) -> None:
    (tmp_path / "train_log.jsonl").write_text(text)
    with pytest.raises(ValueError, match=rf"train_log.jsonl: line {line} "):
        read_training_log(tmp_path)


def test_plot_tuning_sweep_writes_png(tmp_path: Path) -> None:
    out = tmp_path / "sweep.png"
    assert plot_tuning_sweep(SWEEP, out, target=0.9, chosen=8, param="nprobe", k=10) == out
    assert_png(out, (600, 400), (800, 600))
    exact = tmp_path / "exact" / "sweep.png"
    plot_tuning_sweep([{"value": None, "recall": 1.0, "ms_per_query": 0.3}], exact, 0.95, None, None, 10)
    assert_png(exact, (600, 400), (800, 600))


@pytest.mark.parametrize("sweep, chosen, param, message", [
    ([], None, "nprobe", "sweep is empty"),
    ([{"value": 1, "recall": 0.5}], None, "nprobe", r"sweep\[0\]\['ms_per_query'\]"),
    ([{"value": 1, "recall": "high", "ms_per_query": 1.0}], None, "nprobe", r"sweep\[0\]\['recall'\]"),
    ([{"value": "1", "recall": 0.5, "ms_per_query": 1.0}], None, "efSearch", r"sweep\[0\]\['value'\]"),
    ([{"value": 1, "recall": 0.5, "ms_per_query": -1.0}], None, "nprobe", "must be >= 0"),
    (SWEEP, 3, "nprobe", "chosen nprobe=3 is not in the sweep"),
    (SWEEP, None, None, "exact index"),
])
def test_plot_tuning_sweep_names_bad_input(tmp_path: Path, sweep: list, chosen: int | None, param: str | None,
                                           message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plot_tuning_sweep(sweep, tmp_path / "sweep.png", 0.9, chosen, param, 10)
    assert not list(tmp_path.iterdir())


def test_plots_never_import_pyplot(tmp_path: Path) -> None:
    # pyplot carries global figure state and a GUI backend choice; a fresh interpreter shows what plots pulls in.
    code = "\n".join([
        "import sys",
        "from pathlib import Path",
        "from cirflow.flows.plots import plot_training, plot_tuning_sweep",
        "out = Path(sys.argv[1])",
        "plot_training([{'loss': 1.0, 'elapsed': 1.0}], [{'minutes': 1.0, 'R@1': 0.5}], out / 'a.png')",
        "plot_tuning_sweep([{'value': 1, 'recall': 0.5, 'ms_per_query': 1.0}], out / 'b.png', 0.9, 1, 'nprobe', 10)",
        "print('matplotlib.pyplot' in sys.modules)",
    ])
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]

"""bench/ablation.py: row definitions, the generated reading, and the --quick smoke run end to end."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from cirflow.core.config import load_config
from cirflow.models.tiny import TINY_MODEL
from cirflow.models.train_config import TrainConfig
from tests.bench.scripts import ROOT, load_bench_script

ablation = load_bench_script("ablation")


@pytest.mark.parametrize("quick", [True, False])
@pytest.mark.parametrize("backbone", ["tiny", "effnet-minilm"])
def test_every_row_is_a_valid_training_config(quick: bool, backbone: str, tmp_path: Path) -> None:
    """What main() loads before any run: each row's overrides on top of the common ones (TINY_MODEL for
    --quick) form a training config that `cirflow train` accepts, at the batch size the report states."""
    args = ablation.parse_args(["--workdir", str(tmp_path), "--backbone", backbone, *(["--quick"] if quick else [])])
    common = ablation.common_overrides(args)
    assert (common[:len(TINY_MODEL)] == list(TINY_MODEL)) == quick
    for row in ablation.build_rows(args.steps, args.thetas, args.iacma_fraction):
        config = load_config(TrainConfig, None, [*common, *row.overrides])
        assert config.model.backbone.name == backbone, row.name
        assert config.optim.batch_size == (16 if quick else 256), row.name
        assert config.optim.max_steps + config.method.iacma_steps == args.steps, row.name


def test_rows_share_one_step_budget() -> None:
    rows = ablation.build_rows(200, [0.1, 0.3, 0.5], 0.25)
    assert [r.name for r in rows] == ["base", "cala-tbia", "cala-ctr", "cala", "dra", "atf0.3",
                                      "tmcir-atf0.1", "tmcir-atf0.3", "tmcir-atf0.5"]
    for row in rows:
        assert row.upper_bound == row.name.startswith("tmcir")
        if row.upper_bound:
            assert "UPPER BOUND" in row.label
            kv = dict(o.split("=", 1) for o in row.overrides)
            assert int(kv["method.iacma_steps"]) + int(kv["optim.max_steps"]) == 200
            assert kv["method.generator"] == "oracle"
    with pytest.raises(ValueError, match="no ATF steps"):
        ablation.build_rows(3, [0.1], 1.0)


def test_doc_defaults_keep_quick_runs_out_of_the_real_section(tmp_path: Path) -> None:
    assert ablation.parse_args([]).doc == ablation.DOC
    quick = ablation.parse_args(["--quick", "--workdir", str(tmp_path)])
    assert quick.doc == tmp_path / "ablation-quick.md" and quick.steps == 3 and quick.seeds == [0]
    # --quick runs its cirflow commands in the bench's process; full runs each in its own (speed, memory).
    assert quick.in_process and not ablation.parse_args([]).in_process
    assert not ablation.parse_args(["--quick", "--no-in-process"]).in_process


def _run(r1: float, sub1: float) -> dict:
    metrics = {"R@1": r1, "Rsubset@1": sub1}
    return {"results": {split: {"composed": metrics} for split in ablation.SPLITS.values()}}


def test_reading_compares_to_base_against_seed_noise() -> None:
    rows = ablation.build_rows(10, [0.1], 0.5)[:2] + ablation.build_rows(10, [0.1], 0.5)[-1:]
    runs = {"base": [_run(0.50, 0.70), _run(0.52, 0.72)],  # std 0.014
            "cala-tbia": [_run(0.60, 0.70), _run(0.62, 0.74)],  # R@1 +0.10: beyond noise; Rsubset@1 +0.01: not
            "tmcir-atf0.1": [_run(0.51, 0.71)]}
    text = "\n".join(ablation.reading(rows, runs))
    tbia, tmcir = [line for line in text.splitlines() if line.startswith("- ")]
    assert "R@1 +0.100" in tbia and "exceeds seed noise" in tbia and "within seed noise" in tbia
    assert "UPPER BOUND" in tmcir and math.isfinite(ablation.mean_std([0.5, 0.6])[1])


def test_quick_run_writes_every_row(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ablation.py"), "--quick", "--workdir",
                           str(tmp_path / "work"), "--doc", str(doc)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = doc.read_text()
    assert "<!-- begin ablation -->" in text and "<!-- end ablation -->" in text
    names = [r.name for r in ablation.build_rows(3, [0.1, 0.3, 0.5], 0.25)]
    for table in text.split("### ")[1:3]:  # test, then novel phrasing
        lines = [line for line in table.splitlines() if line.startswith("| ") and "R@1" not in line]
        assert [line.split(" | ")[0].removeprefix("| ").split(" ")[0] for line in lines] == names
        for line in lines:
            assert ("UPPER BOUND" in line) == line.startswith("| tmcir")
    assert "Reading (generated)" in text and text.count("UPPER BOUND") >= 3 * 4

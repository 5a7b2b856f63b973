"""bench/lifecycle.py: its pieces (the day's churn, the training data that grows, windows of the client's log,
disk use with hard links), and the --quick run end to end: flows, service, client, the section written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.bench.scripts import ROOT, load_bench_script

bench = load_bench_script("lifecycle")


def test_a_days_churn_is_one_percent() -> None:
    churn = bench.churn_for(20_000)
    assert (churn.adds, churn.removes, churn.overwrites, churn.metadata, churn.corrupt) == (100, 50, 40, 10, 1)
    small = bench.churn_for(300)
    assert min(small.adds, small.removes, small.overwrites, small.metadata, small.corrupt) == 1


def test_training_data_grows_without_touching_the_source(tiny_shapes: Path, tmp_path: Path) -> None:
    captions = tiny_shapes / bench.TrainingData.CAPTIONS
    original = captions.read_bytes()
    data = bench.TrainingData(tiny_shapes, tmp_path / "grown", weeks=2, grow=10)
    total = len(json.loads(original))
    assert data.size == total - 20 == len(json.loads((data.root / data.CAPTIONS).read_text()))
    data.add_week()
    data.add_week()
    assert len(json.loads((data.root / data.CAPTIONS).read_text())) == total
    assert captions.read_bytes() == original  # the hard-linked source kept its captions
    image = next((data.root / "images" / "train").iterdir())
    assert image.stat().st_nlink >= 2  # the pictures are links, not copies


def test_latency_of_a_window_and_disk_counts_links_once(tmp_path: Path) -> None:
    records = [{"sent": t, "ms": ms, "status": status} for t, ms, status in
               [(0.5, 100.0, 200), (1.0, 10.0, 200), (1.5, 20.0, 500), (2.0, 30.0, 200), (3.0, 1.0, 200)]]
    window = bench.Window(start=1.0, end=3.0, others_cores=0.25)
    got = bench.latency(records, window)
    assert got["requests"] == 3 and got["errors"] == 1 and got["p50"] == 20.0 and got["max"] == 30.0
    assert got["others_cores"] == 0.25
    for name in ("embeddings", "indexes", "bundles"):
        (tmp_path / name).mkdir()
    (tmp_path / "embeddings" / "a").write_bytes(b"x" * 100_000)
    os.link(tmp_path / "embeddings" / "a", tmp_path / "indexes" / "a")  # an overlay's linked base file
    disk = bench.disk_bytes(tmp_path)
    assert disk["embeddings"] >= 100_000 and disk["indexes"] == 0 and disk["bundles"] == 0


def test_quick_run_writes_the_section(tiny_shapes: Path, tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "lifecycle.py"), "--quick", "--data",
                           str(tiny_shapes), "--workdir", str(tmp_path / "work"), "--doc", str(doc)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = doc.read_text()
    assert text.count("<!-- begin lifecycle -->") == 1 and text.count("<!-- end lifecycle -->") == 1
    days = [line for line in text.splitlines() if re.match(r"\| [0-9]+ \|", line)]
    assert len(days) == 2
    assert "rollback to" in days[0] and "the nightly held the rollback" in days[1]
    assert re.search(r"ratio \*\*[0-9.]+\*\* \(aim <= 1\.2: (met|NOT met)\)", text)
    assert "scenario checks: all as expected" in text
    assert re.search(r"service answers other than 200: 0 of [0-9,]+ requests", text)
    results = json.loads((tmp_path / "work" / "lifecycle-results.json").read_text())
    assert results["days"][0]["freshness"] > 0 and "full" in results["days"][0]
    assert not (tmp_path / "work" / "scratch").exists()  # the full rebuild's workdir is gone


def test_quick_defaults_keep_the_real_section_untouched(tmp_path: Path) -> None:
    quick = bench.parse_args(["--quick", "--workdir", str(tmp_path)])
    assert quick.doc == tmp_path / "lifecycle-quick.md" and quick.data == tmp_path / "data" / "shapes-quick"
    assert quick.schedule == bench.QUICK_SCHEDULE
    full = bench.parse_args([])
    assert full.doc == bench.DOC and full.schedule == bench.FULL_SCHEDULE

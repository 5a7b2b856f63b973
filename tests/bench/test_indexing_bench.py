"""bench/indexing.py: the noisy catalog copies, and the --quick run end to end on a tiny exported bundle."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.bench.scripts import ROOT, load_bench_script

TYPES = ["flat", "hnsw", "hnsw_sq", "ivf_flat", "ivf_pq", "ivf_pq_rerank"]
bench = load_bench_script("indexing")


def tables(text: str) -> dict[str, list[dict[str, str]]]:
    """The markdown tables of `text` by the `###` heading above them: heading -> rows as {column: cell}."""
    found: dict[str, list[dict[str, str]]] = {}
    heading, header = "", None
    for line in text.splitlines():
        if line.startswith("### "):
            heading = line.removeprefix("### ")
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells
            found[heading] = []
        elif not set(line) <= set("|-"):
            found[heading].append(dict(zip(header, cells)))
    return found


def pair(cell: str) -> tuple[float, float]:
    a, b = (float(x) for x in cell.split(" / "))
    return a, b


def test_noisy_copies_keep_the_real_vectors_and_get_their_own_ids() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(50, dtype=np.int64) * 7 + 1
    uris = [f"img-{i}.png" for i in ids]
    parts = list(bench.noisy_copies(ids, vectors, uris, 120, 0.05, seed=0))
    assert [len(p[0]) for p in parts] == [50, 50, 20]
    np.testing.assert_array_equal(parts[0][1], vectors)  # copy 0: the real vectors, unchanged
    all_ids = np.concatenate([p[0] for p in parts])
    assert len(np.unique(all_ids)) == 120 and (all_ids >= 0).all()
    for _, copy, _ in parts[1:]:
        np.testing.assert_allclose(np.linalg.norm(copy, axis=1), 1.0, atol=1e-5)
        assert 0 < np.abs(copy - vectors[:len(copy)]).max() < 0.5
    # A copy does not depend on the catalog size asking for it: larger catalogs contain smaller ones.
    np.testing.assert_array_equal(list(bench.noisy_copies(ids, vectors, uris, 100, 0.05, seed=0))[1][1], parts[1][1])


def test_noise_scale_is_the_median_nearest_neighbour_distance() -> None:
    def at(angle: float, plane: int) -> list[float]:
        v = [0.0] * 6
        v[2 * plane], v[2 * plane + 1] = np.cos(angle), np.sin(angle)
        return v

    # Two pairs of unit vectors, 0.1 and 0.3 rad apart: nearest-neighbour chords 2 sin(0.05), 2 sin(0.15).
    vectors = np.array([at(0.0, 0), at(0.1, 0), at(0.0, 1), at(0.3, 1)], dtype=np.float32)
    expected = np.sin(0.05) + np.sin(0.15)  # the median of two of each
    assert bench.median_nn_distance(vectors, 100, seed=0) == pytest.approx(expected, rel=1e-3)


def test_quick_defaults_keep_the_real_section_untouched(tmp_path: Path) -> None:
    quick = bench.parse_args(["--quick", "--bundle", str(tmp_path), "--workdir", str(tmp_path)])
    assert quick.doc == tmp_path / "indexing-quick.md" and quick.sizes == [2000, 10000]
    assert bench.parse_args(["--bundle", str(tmp_path)]).doc == bench.DOC


def test_quick_run_reports_every_type_and_size(tiny_bundle: Path, tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "indexing.py"), "--quick", "--bundle",
                           str(tiny_bundle), "--workdir", str(tmp_path / "work"), "--doc", str(doc)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = doc.read_text()
    assert text.count("<!-- begin indexing -->") == 1 and text.count("<!-- end indexing -->") == 1
    found = tables(text)
    cores = len(os.sched_getaffinity(0))

    plain, ray, resume = found["Embedding"]
    assert plain["pipeline"].startswith("plain ORT loop") and ray["pipeline"].startswith("Ray job (")
    assert resume["pipeline"].startswith("Ray job, resume")
    for row in (plain, ray, resume):
        assert float(row["images/s"]) > 0 and float(row["peak memory MB (PSS, processes)"].split()[0]) > 0
    assert int(plain["images"]) == int(ray["images"]) > int(resume["images"]) > 0
    ratio = re.search(r"Scaling ratio Ray job / plain loop: \*\*([0-9.]+)x\*\*", text)
    assert ratio and float(ratio.group(1)) > 0
    assert "the resumed run lists the same ids" in text
    driver = re.search(r"\*\*(\d+) MB\*\* for ([\d,]+) images, \*\*(\d+) MB\*\* for ([\d,]+)", text)
    assert driver and int(driver.group(2).replace(",", "")) < int(driver.group(4).replace(",", ""))
    assert 0 < int(driver.group(1)) and 0 < int(driver.group(3))  # the driver process was sampled

    for size in ("2,000", "10,000"):
        rows = found[f"{size} vectors"]
        assert [r["index"] for r in rows] == TYPES
        for r in rows:
            assert 0.0 <= float(r["recall@10 held out"]) <= 1.0
            assert float(r["bytes/vector"]) > 0 and float(r["batch QPS"]) > 0
            for column in ("search p50 / p99 ms (1 thread)", f"search p50 / p99 ms ({cores} threads)",
                           "encode+search p50 / p99 ms"):
                p50, p99 = pair(r[column])
                assert 0 <= p50 <= p99
        assert rows[0]["tuned setting"] == "exact" and float(rows[0]["recall@10 held out"]) == 1.0
    # How recall was measured: split by reference image, each reference left out where the catalog holds it.
    assert "split by build_index into tuning and held-out halves by reference image" in text
    assert "each query's reference left out of both the exact and the index's top-10" in text
    splits = re.findall(r"Recall split by reference image \(seed 0\): (\d+) queries of (\d+) references tuned, "
                        r"(\d+) queries of (\d+) references held out; 0 queries had their reference", text)
    assert len(splits) == 2  # one line per size
    for tuned, tuned_refs, held, held_refs in splits:
        assert int(tuned) + int(held) == 40 and int(tuned_refs) <= int(tuned) and int(held_refs) <= int(held)
    aim = [line for line in text.splitlines() if line.startswith("- ") and "-> " in line]
    assert [line.split(":")[0].removeprefix("- ") for line in aim] == TYPES

    # Part 3 on the same workdir (part 1 reused): the planner's index in the model's dimension and a lift to
    # 48, within a budget that leaves it only the re-ranked IVF-PQ: 3000 vectors need 408 kB as Flat at 32 dims,
    # 272 kB re-ranked (16 B codes, 8 B ids, 64 B float16, centroids) and 396 kB at 48 dims, under 0.38 MiB
    # (398 kB).
    dim, lifted = int(json.loads((tiny_bundle / "manifest.json").read_text())["embed_dim"]), 48
    assert dim == 32
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "indexing.py"), "--quick", "--scale", "--bundle",
                           str(tiny_bundle), "--workdir", str(tmp_path / "work"), "--doc", str(doc), "--sizes",
                           "3000", "--dims", str(dim), str(lifted), "--budget-mb", "0.38"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = doc.read_text()
    assert text.count("<!-- begin indexing -->") == text.count("<!-- begin indexing-scale -->") == 1
    found = tables(text.split("<!-- begin indexing-scale -->")[1])
    rows = found[""]
    assert [(r["vectors"], r["dims"], r["planner's choice"]) for r in rows] == [
        ("3,000", str(dim), "ivf_pq_rerank"), ("3,000", str(lifted), "ivf_pq_rerank")]
    for r in rows:
        assert "k_factor" in r["tuned setting"] and float(r["peak RSS MB"]) > 0
        assert 0 < pair(r["search p50 / p99 ms (1 thread)"])[0] and 0 <= float(r["recall@10 held out"]) <= 1
    assert [r["dims"] for r in found["100,000,000 vectors, on paper"]] == [str(dim), str(lifted)]
    assert len(found["The planner's choice by size (budget 0.38 MB, on paper)"]) == 6

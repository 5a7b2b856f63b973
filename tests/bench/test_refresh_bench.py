"""bench/refresh.py: the seeded catalog change, and the --quick run end to end on a tiny exported bundle."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cirflow.indexing.embedding.catalog import CatalogConfig, load_catalog, stable_id
from tests.bench.scripts import ROOT, load_bench_script

bench = load_bench_script("refresh")


def test_change_is_one_percent_seeded_and_disjoint() -> None:
    assert bench.change_counts(100_000) == {"added": 500, "removed": 250, "changed": 250}
    assert bench.change_counts(50) == {"added": 1, "removed": 1, "changed": 1}  # at least one of each
    names = [f"img-{i:03d}.png" for i in range(400)]
    pool = [Path(f"/pool/extra-{i}.png") for i in range(30)]
    counts = {"added": 6, "removed": 3, "changed": 4}
    change = bench.plan_change(names, pool, counts, seed=0)
    assert change == bench.plan_change(names, pool, counts, seed=0)
    assert change != bench.plan_change(names, pool, counts, seed=1)
    assert change.counts() == counts
    touched = set(change.removed) | {name for name, _ in change.changed}
    assert len(touched) == 7 and touched <= set(names)  # removed and overwritten entries are distinct entries
    assert len(change.used()) == 10 and change.used() <= set(pool)  # additions and overwrite sources too
    with pytest.raises(SystemExit, match="pool images"):
        bench.plan_change(names, pool[:9], counts, seed=0)


def test_applied_change_is_what_the_catalog_sees(tmp_path: Path) -> None:
    images = []
    for i in range(12):
        images.append(tmp_path / "images" / f"train-{i:02d}.png")
        images[-1].parent.mkdir(exist_ok=True)
        images[-1].write_bytes(bytes([i]) * (100 + i))  # distinct sizes: distinct versions
    folder = tmp_path / "catalog"
    bench.make_catalog(folder, images[:8])
    config = CatalogConfig(name="c", folder=str(folder))
    before = load_catalog(config).to_pydict()
    change = bench.plan_change(sorted(p.name for p in images[:8]), images[8:], {"added": 2, "removed": 1,
                                                                                 "changed": 1}, seed=0)
    bench.apply_change(folder, change)
    after = load_catalog(config).to_pydict()
    versions = dict(zip(before["id"], before["version"]))
    assert set(after["id"]) == set(before["id"]) - change.ids("removed") | change.ids("added")
    for i, version in zip(after["id"], after["version"]):
        assert (version != versions.get(i)) == (i in change.ids("added") | change.ids("changed"))
    (name, source), = change.changed
    assert not (folder / name).is_symlink() and (folder / name).read_bytes() == source.read_bytes()
    assert stable_id(name) in change.ids("changed")


def test_quick_run_writes_the_section(tiny_bundle: Path, tiny_shapes: Path, prefect_api_url: str,
                                     tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    # The flow part runs on the session's Prefect server: a temporary one of the bench's own takes 10-20 s to start.
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "refresh.py"), "--quick", "--bundle",
                           str(tiny_bundle), "--data", str(tiny_shapes), "--workdir", str(tmp_path / "work"),
                           "--doc", str(doc)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PREFECT_API_URL": prefect_api_url})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = doc.read_text()
    assert text.count("<!-- begin refresh -->") == 1 and text.count("<!-- end refresh -->") == 1
    ratio = re.search(r"Refresh / full \(stage calls\): \*\*([0-9.]+)\*\* \(aim <= 0\.05: (met|NOT met)\)", text)
    assert ratio and float(ratio.group(1)) > 0
    steps = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    for step in ("run_embed", "open_snapshot", "build_or_refresh", "validate_index", "publish", "**total**"):
        assert any(cell.split(" (")[0] == step for cell in steps), step
    build = next(cell for cell in steps if cell.startswith("build_or_refresh"))
    assert "full: flat, built from all vectors" in build and "refresh: flat, an overlay on" in build
    assert re.search(r"checks \(the bench stops on a failure\): 2 images encoded by the refresh = added \+ "
                     r"overwritten \(in-process\).*its delta and dead ids are exactly the change's", text)
    assert re.search(r"Through the Prefect catalog flow .*: \*\*[0-9.]+ s\*\*", text)
    assert (tmp_path / "work" / "refresh-results.json").is_file()


def test_quick_defaults_keep_the_real_section_untouched(tmp_path: Path) -> None:
    quick = bench.parse_args(["--quick", "--bundle", str(tmp_path), "--workdir", str(tmp_path)])
    assert quick.doc == tmp_path / "refresh-quick.md" and quick.data == tmp_path / "data" / "shapes-tiny"
    assert bench.parse_args(["--bundle", str(tmp_path)]).doc == bench.DOC

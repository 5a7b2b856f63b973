"""bench/gpu_check.py: `make gpu-check` without a GPU, the whole check with the CPU standing in for the GPU on a
Python where cirflow is not installed (as on the GPU machine), and the part runner's rules."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.bench.scripts import ROOT, load_bench_script

bench = load_bench_script("gpu_check")
GPU_PARTS = ("ort_cuda", "ort_tensorrt", "faiss_gpu", "tensorrt_engines")


def _make(out: Path, python: str, args: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-s", "gpu-check", f"OUT={out}", f"GPU_PY={python}", f"GPU_CHECK_ARGS={args}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def _report(out: Path) -> tuple[dict, dict[str, dict], str]:
    report = json.loads((out / "gpu_check.json").read_text())
    return report, {p["name"]: p for p in report["parts"]}, (out / "gpu_check.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_make_gpu_check_says_no_gpu_and_exits_0(tmp_path: Path) -> None:
    proc = _make(tmp_path / "out", sys.executable)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU: torch" in proc.stdout
    report, parts, md = _report(tmp_path / "out")
    assert report["no_gpu"] and report["device"] is None and "CUDA" in report["device_note"]
    assert list(parts) == list(bench.PARTS)
    assert parts["environment"]["status"] == "ok"  # what is importable is worth knowing even here
    assert all(p["status"] == "skipped" and p["reason"].startswith("no GPU: ") for p in report["parts"][1:])
    assert "## GPU check: no GPU" in md and "**no GPU**" in md


def _bare_python(tmp_path: Path) -> str:
    """A venv that sees this environment's packages through a .pth line, but not its editable cirflow install
    (a .pth line adds a folder without running the .pth files in it): torch without cirflow, as on the GPU
    machine."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "pinned.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return str(python)


def test_simulated_check_runs_every_part_from_the_source_tree(tmp_path: Path) -> None:
    python = _bare_python(tmp_path)
    alone = subprocess.run([python, "-c", "import cirflow.core"], capture_output=True, text=True)
    assert "No module named 'cirflow'" in alone.stderr  # only the Makefile's PYTHONPATH makes it importable
    out = tmp_path / "out"
    started = time.monotonic()
    proc = _make(out, python, "--device cpu --model tiny --steps 3 --images 64 --deadline-minutes 5")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert time.monotonic() - started < 120
    report, parts, md = _report(out)
    assert report["simulated"] and not report["no_gpu"]
    assert list(parts) == list(bench.PARTS)
    for p in parts.values():
        assert p["status"] in ("ok", "skipped"), p
        assert p["status"] == "ok" or p["reason"], p  # every skip says why
        assert f"| {p['name']} | {p['status']} |" in md
    env = parts["environment"]["result"]
    assert all(m["ok"] for m in env["ours"].values()), env["ours"]

    for name in ("train_gpu", "train_cpu"):
        run = parts[name]["result"]
        assert run["device"] == "cpu" and run["steps"] == 3 and run["samples_per_s"] > 0 and "note" not in run
    assert report["training_speedup"]["samples_per_s"] > 0

    embedded = parts["embedding"]["result"]
    assert embedded["images"] == 64 and embedded["decode"]["images_per_s"] > 0
    # The simulated GPU side is the same CPU, so the comparison must come out exact.
    assert embedded["gpu_fp32"]["max_abs_diff"] == 0 and embedded["gpu_fp32"]["query_max_abs_diff"] == 0
    assert embedded["gpu_fp32"]["top1_neighbour_agreement"] == 1.0
    assert "CUDA" in embedded["gpu_bf16"]["skipped"]

    assert parts["export"]["status"] == "ok"  # onnxscript is installed here
    ort_cpu = parts["ort_cpu"]["result"]
    assert ort_cpu["providers"] == ["CPUExecutionProvider"]
    assert ort_cpu["image_max_abs_diff"] < 1e-5 and ort_cpu["query_max_abs_diff"] < 1e-5
    # No GPU provider runs in a simulation; each says why (here: a CPU onnxruntime, faiss-cpu, no tensorrt).
    assert all(parts[name]["status"] == "skipped" for name in GPU_PARTS)
    assert "CUDAExecutionProvider" in parts["ort_cuda"]["reason"]
    assert "faiss" in parts["faiss_gpu"]["reason"] and "tensorrt" in parts["tensorrt_engines"]["reason"]
    assert "**simulated**" in md and "| train_gpu | cpu" in md


def test_a_part_that_would_not_fit_is_skipped_for_the_deadline() -> None:
    calls = []
    record, value = bench.run_part("train_cpu", bench.Deadline(time.monotonic() + 5),
                                   lambda: calls.append(1) or ({}, None))
    assert record["status"] == "skipped" and record["reason"].startswith("deadline: ") and value is None
    assert calls == []


def test_part_outcomes_are_recorded_with_their_reasons() -> None:
    deadline = bench.Deadline(time.monotonic() + 600)

    def fails() -> tuple[dict, None]:
        raise ValueError("bad input")

    def skips() -> tuple[dict, None]:
        raise bench.Skipped("not importable: x")

    failed, value = bench.run_part("export", deadline, fails)
    assert (failed["status"], failed["reason"], value) == ("failed", "ValueError: bad input", None)
    skipped, _ = bench.run_part("export", deadline, skips)
    assert (skipped["status"], skipped["reason"]) == ("skipped", "not importable: x")
    mismatch, _ = bench.run_part("ort_cpu", deadline, lambda: ({"within_tolerance": False}, None))
    assert mismatch["status"] == "mismatch" and "tolerance" in mismatch["reason"]
    ok, value = bench.run_part("ort_cpu", deadline, lambda: ({"x": 1}, "next"))
    assert (ok["status"], ok["result"], value) == ("ok", {"x": 1}, "next")
    with pytest.raises(bench.Skipped, match="needs the export part"):
        bench.require(None, "export")


def test_neighbour_agreement_tolerates_ties() -> None:
    # Rows 1 and 2 are equally near row 0 under the reference; rows 2 and 3 are each other's nearest.
    reference = np.array([[1, 0, 0], [0.8, 0.6, 0], [0.8, -0.6, 0], [0.6, -0.8, 0]], dtype=np.float32)
    tilted = reference.copy()
    tilted[2] = [0.81, -np.sqrt(1 - 0.81**2), 0]  # row 0 now picks row 2, the other of its tied neighbours
    assert bench.neighbour_agreement(reference, reference) == 1.0
    assert bench.neighbour_agreement(reference, tilted) == 1.0
    assert bench.neighbour_agreement(reference, tilted, chunk=3) == 1.0  # chunks give the same answer
    swapped = reference[[0, 3, 2, 1]]  # rows 1 and 3 exchanged: rows 1, 2 and 3 pick wrong neighbours
    assert bench.neighbour_agreement(reference, swapped) == 0.25


def test_config_errors_name_the_choices() -> None:
    with pytest.raises(ValueError, match=r"model='big' is not one of \['default', 'tiny'\]"):
        bench.CheckConfig(out=Path("x"), model="big")
    with pytest.raises(ValueError, match="steps must be positive"):
        bench.CheckConfig(out=Path("x"), steps=0)
    assert bench.find_device("cpu")[0] == "cpu"

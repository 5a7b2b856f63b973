"""The stages install under one namespace: cirflow.models, cirflow.export, cirflow.indexing, cirflow.flows; checked
on the installed wheel (tests/conftest.py `wheel_venv`), as a downstream service gets it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def python(wheel_venv: Path) -> Path:
    return wheel_venv / "bin" / "python"


def _python(python: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # -I: isolated mode, as a downstream service would run (no user site, no PYTHONPATH, no cwd on sys.path).
    return subprocess.run([str(python), "-I", "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_package_imports_from_outside_the_checkout(python: Path, tmp_path: Path) -> None:
    proc = _python(python, "import cirflow.models.cir_model, cirflow.core.files; "
                   "from cirflow.indexing.search import Searcher; print(Searcher.__module__)", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cirflow.indexing.search.searcher"


def test_no_top_level_stage_packages_are_installed(python: Path, tmp_path: Path) -> None:
    for name in ("models", "export", "indexing", "flows", "core"):
        proc = _python(python, f"import {name}", tmp_path)
        assert "ModuleNotFoundError" in proc.stderr, (name, proc.stderr)


def test_a_downstream_models_module_does_not_collide(python: Path, tmp_path: Path) -> None:
    (tmp_path / "models.py").write_text("OURS = True\n")
    code = "import sys; sys.path.insert(0, '.'); import models, cirflow.models.cir_model; print(models.OURS)"
    proc = _python(python, code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_no_sys_path_edits_in_the_tree() -> None:
    offenders = [str(p.relative_to(ROOT)) for folder in ("core", "models", "export", "indexing", "flows", "bench")
                 for p in (ROOT / folder).rglob("*.py") if "sys.path" in p.read_text()]
    assert offenders == []

"""The stages install under one namespace: cirflow.models, cirflow.export, cirflow.indexing, cirflow.flows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # -I: isolated mode, as a downstream service would run (no user site, no PYTHONPATH, no cwd on sys.path).
    return subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_package_imports_from_outside_the_checkout(tmp_path: Path) -> None:
    proc = _python("import cirflow.indexing.search, cirflow.models.cir_model, cirflow.core.files; "
                   "print(cirflow.indexing.search.__name__)", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cirflow.indexing.search"


def test_no_top_level_stage_packages_are_installed(tmp_path: Path) -> None:
    for name in ("models", "export", "indexing", "flows", "core"):
        proc = _python(f"import {name}", tmp_path)
        assert "ModuleNotFoundError" in proc.stderr, (name, proc.stderr)


def test_a_downstream_models_module_does_not_collide(tmp_path: Path) -> None:
    (tmp_path / "models.py").write_text("OURS = True\n")
    code = "import sys; sys.path.insert(0, '.'); import models, cirflow.models.cir_model; print(models.OURS)"
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_no_sys_path_edits_in_the_tree() -> None:
    offenders = [str(p.relative_to(ROOT)) for folder in ("core", "models", "export", "indexing", "flows", "bench")
                 for p in (ROOT / folder).rglob("*.py") if "sys.path" in p.read_text()]
    assert offenders == []

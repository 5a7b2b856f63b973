"""Import a bench/ script as a module (bench/ is a folder of scripts, not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_bench_script(name: str) -> ModuleType:
    """bench/<name>.py as the module `bench_<name>`. The scripts import their shared `report` module the way
    `python bench/X.py` finds it (beside the script), so that one is loaded first under its own name; the other
    modules a script imports from beside it (lifecycle_sim, service, ...) are found the same way: bench/ is first
    on sys.path while the script executes."""
    if "report" not in sys.modules:
        _load("report", ROOT / "bench" / "report.py")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return _load(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    finally:
        sys.path.remove(str(ROOT / "bench"))


def _load(module_name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module

"""Every pinned dependency is used: imported somewhere under the stage folders, bench/ or tests/, or named here
with the reason it is needed without an import of ours."""

from __future__ import annotations

import ast
import re
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).parents[2]
NO_IMPORT_OF_OURS = {
    "python-multipart": "FastAPI parses multipart/form-data uploads with it (POST /search with an image file)",
    "onnxscript": "torch.onnx.export's dynamo exporter imports it (export/onnx_export.py)",
    "ruff": "a command, not a library: make test runs `ruff check .`",
    "pytest-xdist": "a pytest plugin: make test runs the suite on two workers (`-n 2`)",
}


# Calls that load or read a module named by a string: importlib's, and pytest's for optional test dependencies.
DYNAMIC = {"files", "import_module", "importorskip", "find_spec"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [*project["dependencies"], *project["optional-dependencies"]["pretrained"],
            *(d for d in project["optional-dependencies"]["dev"] if not d.startswith("cirflow"))]
    return {_norm(re.split(r"[=<>\[ ]", pin)[0]): pin for pin in pins}


def _imported_top_names() -> set[str]:
    names = set()
    for folder in ("core", "models", "export", "indexing", "flows", "bench", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
                elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                      in DYNAMIC and node.args and isinstance(node.args[0], ast.Constant)):
                    names.add(str(node.args[0].value).split(".")[0])  # a module loaded by its name
    return names


def test_every_pinned_dependency_is_imported_or_has_a_reason() -> None:
    owners: dict[str, set[str]] = {}
    for top, dists in packages_distributions().items():
        for dist in dists:
            owners.setdefault(_norm(dist), set()).add(top)
    imported = _imported_top_names()
    unused = sorted(pin for name, pin in _pins().items()
                    if name not in NO_IMPORT_OF_OURS and not owners.get(name, set()) & imported)
    assert unused == [], "pinned but never imported: drop them, or say why they are needed in NO_IMPORT_OF_OURS"


def test_ray_is_pinned_with_the_extras_in_use_only() -> None:
    """ray.data is never imported: the embedding job drives its own actors (indexing/embedding/job.py)."""
    ray = _pins()["ray"]
    assert "data" not in re.search(r"\[([^\]]*)\]", ray).group(1).split(","), ray
    assert not any(name in ("ray.data",) or name.startswith("ray.data.") for name in _imported_modules())


def _imported_modules() -> set[str]:
    names = set()
    for folder in ("core", "models", "export", "indexing", "flows"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.update({node.module, *(f"{node.module}.{a.name}" for a in node.names)})
    return names

"""The import map, read from the source (every import statement, at module level, under TYPE_CHECKING or inside a
function): a stage imports only the stages below it, indexing's rooms only the rooms below them, and no module
imports one that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]
STAGES = ("core", "models", "export", "indexing", "flows")  # each may import those before it
ROOMS = ("embedding", "search", "index", "service")  # indexing's sub-packages, in the same sense


def _modules() -> dict[str, Path]:
    """cirflow module name -> its file, for every .py under the stage folders (a package's is its __init__)."""
    found = {}
    for stage in STAGES:
        for path in (ROOT / stage).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(("cirflow", *(parts[:-1] if parts[-1] == "__init__" else parts)))] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The cirflow modules a module imports (`from package import module` counts as the module)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            out.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _rank(module: str, order: tuple[str, ...], depth: int) -> int | None:
    part = module.split(".")[depth] if len(module.split(".")) > depth else None
    return order.index(part) if part in order else None


def test_a_stage_imports_only_the_stages_below_it() -> None:
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
              if _rank(t, STAGES, 1) > _rank(m, STAGES, 1)]
    assert upward == []


def test_an_indexing_room_imports_only_the_rooms_below_it() -> None:
    assert {p.name for p in (ROOT / "indexing").iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(ROOMS)
    assert [p.name for p in (ROOT / "indexing").glob("*.py")] == ["__init__.py"], "every module lives in a room"
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() if m.startswith("cirflow.indexing.") for t in targets
              if t.startswith("cirflow.indexing.") and _rank(t, ROOMS, 2) > _rank(m, ROOMS, 2)]
    assert upward == []
    # The service serves what the index room published through the search library; it never builds or tunes.
    assert [t for m, targets in GRAPH.items() if m.startswith("cirflow.indexing.service") for t in targets
            if t.startswith("cirflow.indexing.index")] == []


def test_no_module_imports_one_that_imports_it_back() -> None:
    """Strongly connected components of the import graph (Tarjan): every one must be a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in sorted(GRAPH):
        if name not in index:
            visit(name)
    assert circles == []


def test_the_map_sees_imports_in_functions_and_type_checking_blocks() -> None:
    """The reader itself: the lazy and type-only imports count (a circle hides in them first)."""
    assert "cirflow.indexing.search.index_store" in GRAPH["cirflow.indexing.search.vector_index"]
    assert "cirflow.indexing.search.topk" in GRAPH["cirflow.indexing.index.tuning"]
    assert "cirflow.flows.cli" in MODULES and GRAPH["cirflow.flows.cli"]

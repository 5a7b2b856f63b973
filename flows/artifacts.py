"""What a person sees of a flow run in Prefect: markdown tables of the metrics and of the index tuning, and
links to the PNG plots written beside the run. Artifacts are created only inside a flow run; the CLI prints the
same tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact


def markdown_table(rows: dict[str, dict[str, Any]], first: str = "") -> str:
    """rows: row name -> column -> value (floats in [0, 1] as percentages with 2 decimals)."""
    columns = list(dict.fromkeys(c for cells in rows.values() for c in cells))
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(cells.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return f"{100 * value:.2f}"
    return str(value)


def publish_markdown(key: str, title: str, sections: list[tuple[str, str]]) -> None:
    """One markdown artifact: a title and (heading, body) sections."""
    text = f"# {title}\n\n" + "\n\n".join(f"## {heading}\n\n{body}" for heading, body in sections)
    create_markdown_artifact(key=key, markdown=text, description=title)


def publish_links(key_prefix: str, files: dict[str, Path]) -> None:
    """A link artifact per existing file (file:// URIs: the files live beside the run, on the flow's host)."""
    for name, path in files.items():
        path = Path(path)
        if path.is_file():
            create_link_artifact(key=f"{key_prefix}-{name}", link=path.resolve().as_uri(), link_text=path.name,
                                 description=f"{name}: {path}")

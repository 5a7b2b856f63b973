"""Catalog sources: folder listing with stable ids, manifests in Parquet/CSV, and their errors."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cirflow.indexing.catalog import CatalogConfig, CatalogError, fingerprint, load_catalog, read_bytes, stable_id


def test_folder_ids_are_stable_hashes_of_relative_paths(tmp_path: Path) -> None:
    for name in ("b.png", "a.png", "sub/c.png", ".hidden.png", ".cache/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    table = load_catalog(CatalogConfig(name="c", folder=str(tmp_path)))
    by_uri = {Path(u).relative_to(tmp_path).as_posix(): i
              for i, u in zip(table.column("id").to_pylist(), table.column("uri").to_pylist())}
    assert by_uri == {k: stable_id(k) for k in ("a.png", "b.png", "sub/c.png")}  # hidden files left out
    assert table.column("id").to_pylist() == sorted(by_uri.values())
    assert all(0 <= i < 2**63 for i in by_uri.values())
    # Growing the catalog keeps every old id; the fingerprint tells the two catalogs apart.
    (tmp_path / "e.png").write_bytes(b"x")
    grown = load_catalog(CatalogConfig(name="c", folder=str(tmp_path)))
    assert set(by_uri.values()) < set(grown.column("id").to_pylist())
    assert fingerprint(grown) != fingerprint(table)


def test_manifest_csv_and_parquet(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"abc")
    (tmp_path / "m.csv").write_text("id,uri\n7,img/a.png\n3,file:///abs/b.png\n")
    table = load_catalog(CatalogConfig(name="c", manifest=str(tmp_path / "m.csv")))
    assert table.to_pylist() == [{"id": 3, "uri": "file:///abs/b.png"},
                                 {"id": 7, "uri": str(tmp_path / "img" / "a.png")}]
    assert read_bytes(table.column("uri")[1].as_py()) == b"abc"
    assert read_bytes((tmp_path / "img" / "a.png").as_uri()) == b"abc"
    pq.write_table(pa.table({"id": [5], "uri": ["img/a.png"], "extra": [1]}), tmp_path / "m.parquet")
    assert load_catalog(CatalogConfig(name="c", manifest=str(tmp_path / "m.parquet"))).column("id").to_pylist() == [5]


@pytest.mark.parametrize("content, message", [
    ("id,uri\n1,a.png\n1,b.png\n", "id 1 appears more than once"),
    ("id,path\n1,a.png\n", r"missing column\(s\) \['uri'\]"),
    ("id,uri\n1,a.png\n2,\n", "row 1 has no uri"),
    ("id,uri\n-4,a.png\n", "non-negative"),
    ("id,uri\n", "has no entries"),
])
def test_bad_manifests_are_named(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(CatalogError, match=message):
        load_catalog(CatalogConfig(name="c", manifest=str(tmp_path / "m.csv")))


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        load_catalog(CatalogConfig(name="c"))
    with pytest.raises(ValueError, match="directory name"):
        load_catalog(CatalogConfig(name="a/b", folder=str(tmp_path)))
    with pytest.raises(CatalogError, match="does not exist"):
        load_catalog(CatalogConfig(name="c", folder=str(tmp_path / "missing")))

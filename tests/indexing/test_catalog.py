"""Catalog sources: folder listing with stable ids, manifests in Parquet/CSV, and their errors."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cirflow.indexing.embedding.catalog import (
    CatalogConfig,
    CatalogError,
    fingerprint,
    load_catalog,
    read_bytes,
    stable_id,
)


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
    assert table.select(["id", "uri"]).to_pylist() == [{"id": 3, "uri": "file:///abs/b.png"},
                                                       {"id": 7, "uri": str(tmp_path / "img" / "a.png")}]
    st = (tmp_path / "img" / "a.png").stat()
    assert table.column("version").to_pylist() == ["unreadable", f"3-{st.st_mtime_ns}"]
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


def test_a_name_that_is_not_utf8_gets_a_stable_id_and_a_uri_that_reads_back(tmp_path: Path) -> None:
    raw = b"bad-\xff name.png"
    Path(os.fsdecode(os.fsencode(tmp_path) + b"/" + raw)).write_bytes(b"pixels")
    (tmp_path / "good.png").write_bytes(b"other")
    table = load_catalog(CatalogConfig(name="c", folder=str(tmp_path)))
    uris = dict(zip(table.column("id").to_pylist(), table.column("uri").to_pylist()))
    raw_id = int.from_bytes(hashlib.sha256(raw).digest()[:8], "big") >> 1  # the hash of the name's raw bytes
    assert uris[raw_id] == f"file://{tmp_path}/bad-%FF%20name.png"
    assert read_bytes(uris[raw_id]) == b"pixels"
    assert uris[stable_id("good.png")] == str(tmp_path / "good.png")  # valid names keep their plain path
    pq.write_table(table, tmp_path / ".catalog.parquet")  # Parquet strings must be valid UTF-8: they are
    assert load_catalog(CatalogConfig(name="c", folder=str(tmp_path))).equals(table)  # stable across listings


def test_symlinks_are_entries_and_special_files_are_left_out_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "good.png").write_bytes(b"good")
    (tmp_path / "image.png").mkdir()  # a directory named like an image: its files are entries, it is not
    (tmp_path / "image.png" / "inner.png").write_bytes(b"inner")
    links = {"loop.png": "loop.png", "dangling.png": "missing.png", "alias.png": "sub/good.png",
             "linked-dir": "sub", "outside.png": str(tmp_path.parent)}
    for name, target in links.items():
        os.symlink(target, tmp_path / name)
    os.mkfifo(tmp_path / "pipe.png")
    with caplog.at_level(logging.WARNING, logger="cirflow.indexing.embedding.catalog"):
        table = load_catalog(CatalogConfig(name="c", folder=str(tmp_path)))
    names = {Path(u).relative_to(tmp_path).as_posix() for u in table.column("uri").to_pylist()}
    assert names == {"sub/good.png", "image.png/inner.png", *links}  # each link under its own name, not followed
    assert sorted(table.column("id").to_pylist()) == sorted(stable_id(n) for n in names)
    assert read_bytes(str(tmp_path / "alias.png")) == b"good"
    assert "pipe.png" in caplog.text and "FIFO" in caplog.text


def test_a_folder_that_cannot_be_listed_stops_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "locked").mkdir()
    scandir = os.scandir

    def refuse(path: str) -> object:  # chmod 000 cannot stop root, who runs the tests here
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.raises(CatalogError, match=r"cannot list '.*locked' \(Permission denied\)"):
        load_catalog(CatalogConfig(name="c", folder=str(tmp_path)))


def test_versions_follow_content_changes(tmp_path: Path) -> None:
    """An entry's version changes when its file is rewritten (stat: size or mtime; sha256: bytes), and a
    manifest's own version column is kept as given."""
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"one")
    os.utime(tmp_path / "b.png", ns=(1, 1_000_000_000))
    config = CatalogConfig(name="c", folder=str(tmp_path))
    before = load_catalog(config)
    (tmp_path / "a.png").write_bytes(b"two!")  # another size
    (tmp_path / "b.png").write_bytes(b"two")  # same size, new mtime
    after = load_catalog(config)
    assert before.column("id").equals(after.column("id"))
    changed = [x != y for x, y in zip(before.column("version").to_pylist(), after.column("version").to_pylist())]
    assert changed == [True, True] and fingerprint(before) != fingerprint(after)
    # sha256 sees the bytes only: a touch that keeps them is no change, a same-size rewrite is one.
    hashed = CatalogConfig(name="c", folder=str(tmp_path), change_key="sha256")
    first = load_catalog(hashed)
    os.utime(tmp_path / "a.png", ns=(5, 5))
    assert load_catalog(hashed).equals(first)
    (tmp_path / "a.png").write_bytes(b"tw0!")
    assert load_catalog(hashed).column("version") != first.column("version")
    with pytest.raises(ValueError, match="change_key='mtime' is not one of"):
        CatalogConfig(name="c", folder=str(tmp_path), change_key="mtime")
    pq.write_table(pa.table({"id": [1, 2], "uri": ["a.png", "b.png"], "version": ["e1", "e2"]}),
                   tmp_path / "m.parquet")
    given = load_catalog(CatalogConfig(name="c", manifest=str(tmp_path / "m.parquet")))
    assert given.column("version").to_pylist() == ["e1", "e2"]
    pq.write_table(pa.table({"id": [1], "uri": ["a.png"], "version": pa.array([None], pa.string())}),
                   tmp_path / "m.parquet")
    with pytest.raises(CatalogError, match="row 0 has no version"):
        load_catalog(CatalogConfig(name="c", manifest=str(tmp_path / "m.parquet")))

"""Catalogs that change: a refresh embeds only new and changed entries, reuses the rest byte for byte, drops
removed ids, and survives a kill -9. Small deltas run in-process (no Ray), as they do by default."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from cirflow.indexing.embedding import shards
from cirflow.indexing.embedding.catalog import CatalogConfig, folder_entries, load_catalog
from cirflow.indexing.embedding.job import EmbedConfig, run_embed
from tests.export.conftest import random_images
from tests.indexing.held_store import held_entry
from tests.indexing.test_embed import REPO, png_bytes, write_images


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Path:
    return tiny_bundle


def job(bundle: Path, workdir: Path, **catalog: str) -> EmbedConfig:
    return EmbedConfig(catalog=CatalogConfig(name="shop", **catalog), bundle=str(bundle), workdir=str(workdir),
                       rows_per_shard=8, batch_size=4)


def rows(snapshot_dir: Path) -> dict[int, bytes]:
    ids, vectors, _ = shards.open_snapshot(snapshot_dir).read_all()
    return {i: v.tobytes() for i, v in zip(ids.tolist(), vectors)}


def test_refresh_embeds_the_delta_and_reuses_the_rest(bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "catalog"
    paths = write_images(folder, 40, seed=1)
    config = job(bundle, tmp_path / "work", folder=str(folder))
    first = run_embed(config)
    before = rows(first)
    assert shards.read_manifest(first)["last_run"]["embedded_by"] == "in-process"

    # 3 new images, 2 removed, 1 overwritten with another picture; and one file rewritten behind the catalog's
    # back (same size, mtime restored): its version says unchanged, so it must not even be read again.
    added = [folder / f"new-{i}.png" for i in range(3)]
    for path, pixels in zip(added, random_images(3, 64, seed=7)):
        path.write_bytes(png_bytes(pixels))
    for path in paths[:2]:
        path.unlink()
    paths[2].write_bytes(png_bytes(random_images(1, 64, seed=8)[0]))
    hidden = paths[3]
    stat = hidden.stat()
    hidden.write_bytes(b"\0" * stat.st_size)
    os.utime(hidden, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    second = run_embed(config)
    assert second != first and second.parent == first.parent
    manifest = shards.read_manifest(second)
    assert manifest["delta"] == {"previous": first.name, "added": 3, "changed": 1, "removed": 2,
                                 "unchanged": 37, "reused_vectors": 37, "reused_errors": 0,
                                 "retried": 0}
    assert manifest["last_run"]["entries"] == 4 and manifest["errors"] == 0  # the delta, and only it
    after = rows(second)
    catalog_ids = set(load_catalog(config.catalog).column("id").to_pylist())
    assert set(after) == catalog_ids  # none stale, none missing
    ids_of = {Path(u).name: i for i, u in zip(*map(lambda c: folder_entries(folder, paths + added).column(c)
                                                   .to_pylist(), ("id", "uri")))}
    changed = ids_of[paths[2].name]
    unchanged = catalog_ids - {changed} - {ids_of[p.name] for p in added}
    assert all(after[i] == before[i] for i in unchanged)  # byte-identical, hidden rewrite included
    assert after[changed] != before[changed]
    assert shards.open_snapshot(first.parent).snapshot_dir == second  # CURRENT
    assert shards.open_snapshot(first).rows == 40  # the previous snapshot is kept, untouched

    # Nothing changed since: the finished snapshot is found and nothing is written.
    stamp = (second / shards.MANIFEST).read_bytes()
    assert run_embed(config) == second and (second / shards.MANIFEST).read_bytes() == stamp

    # keep_snapshots=2: a third state removes the first snapshot, never CURRENT or the one before it.
    (folder / "new-0.png").unlink()
    third = run_embed(config)
    assert not first.exists() and second.exists() and shards.open_snapshot(third.parent).snapshot_dir == third


def test_a_killed_refresh_resumes_to_a_consistent_snapshot(bundle: Path, tmp_path: Path) -> None:
    """kill -9 in the middle of a refresh (the driver blocked reading from a store that holds the read, in the
    last shard) leaves CURRENT on the old snapshot; the rerun finishes the new one with exactly the catalog's
    ids."""
    folder = tmp_path / "images"
    paths = write_images(folder, 24, seed=2)
    table = folder_entries(folder, paths).sort_by("id")
    versions = pa.array(["v1"] * table.num_rows)
    manifest = tmp_path / "catalog.csv"
    pacsv.write_csv(table.append_column("version", versions), manifest)
    config = job(bundle, tmp_path / "work", manifest=str(manifest))
    first = run_embed(config)
    before = rows(first)

    # The refresh: two new entries, one of them read from a store that holds the read until the kill. It must be
    # a new entry: an unchanged one is reused without being read, and the refresh then races the poll below to
    # completion.
    extra = write_images(folder / "extra", 2, seed=3)
    added = folder_entries(folder, extra).sort_by("id")
    store, added = held_entry(added, added.num_rows - 1)
    grown = pa.concat_tables([table, added]).sort_by("id")
    pacsv.write_csv(grown.append_column("version", pa.array(["v1"] * grown.num_rows)), manifest)
    command = [sys.executable, "-m", "cirflow.flows.cli", "--log-level", "WARNING", "embed",
               "catalog.name=shop", f"catalog.manifest={manifest}", f"bundle={bundle}",
               f"workdir={config.workdir}", "rows_per_shard=8", "batch_size=4"]
    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    new_dir = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = [p.parent for p in first.parent.glob("*/manifest.json") if p.parent != first]
        if found and shards.read_manifest(found[0])["shards"]:
            new_dir = found[0]
            break
        time.sleep(0.1)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"the refresh ended before the kill:\n{output[-3000:]}"
    assert new_dir is not None, f"the refresh never finished a shard:\n{output[-3000:]}"
    assert not shards.read_manifest(new_dir)["complete"]
    assert shards.open_snapshot(first.parent).snapshot_dir == first  # CURRENT still names the old, complete snapshot

    store.release()  # the same uri and version: the same catalog state, so the same snapshot resumes
    assert run_embed(config) == new_dir
    after = rows(new_dir)
    assert set(after) == set(grown.column("id").to_pylist())
    assert all(after[i] == before[i] for i in before)
    assert shards.open_snapshot(first.parent).snapshot_dir == new_dir
    store.close()

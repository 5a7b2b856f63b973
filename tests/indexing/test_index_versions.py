"""Published index versions: history, rollback, pruning, and readers that never see a mix of two versions."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.synchronize
import threading
from pathlib import Path

import numpy as np
import pytest

from cirflow.core.files import CURRENT
from cirflow.flows.cli import main
from cirflow.indexing.index.build import build_index
from cirflow.indexing.index.plan import IndexConfig
from cirflow.indexing.index.queries import Queries
from cirflow.indexing.index.versions import HISTORY, VersionError, prune, publish, rollback, versions
from cirflow.indexing.search import VectorIndex, index_store
from tests.indexing.conftest import clustered, query_like, write_snapshot


def build_version(tmp_path: Path, v: int) -> Path:
    """Version v of one catalog's flat index: ids 10*row + v, so contents differ between versions."""
    n = 200 + 10 * v
    run = write_snapshot(tmp_path / f"run-{v}", clustered(n, 16, seed=v), rows_per_shard=100,
                    ids=np.arange(n, dtype=np.int64) * 10 + v)
    return build_index(run, Queries.unreferenced(query_like(0, 40, 16)), tmp_path / "indexes",
                       IndexConfig(index_type="flat"))


def test_publish_keeps_history_rollback_restores_and_prune_removes(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    v0, v1, v2 = (publish(build_version(tmp_path, v), keep=3).parent / f"{v}" for v in range(3))
    catalog = v0.parent
    v0, v1, v2 = (catalog / v["index_id"] for v in reversed(versions(catalog)))
    failed = build_version(tmp_path, 9)  # built but never published (say, it failed validation)
    v3 = build_version(tmp_path, 3)
    publish(v3, keep=3)
    assert failed.exists()  # never published: left for inspection
    assert not v0.exists() and v1.exists() and v2.exists() and v3.exists()
    assert [(v["index_id"], v["current"], v["exists"]) for v in versions(catalog)] == [
        (v3.name, True, True), (v2.name, False, True), (v1.name, False, True), (v0.name, False, False)]

    # Rollback: the newest published version before CURRENT, restored exactly (same files, same results).
    probe = query_like(0, 5, 16)
    expected = VectorIndex.load(v2).search(probe, 5)
    v3_bundle = index_store.read_manifest(v3)["bundle_id"]
    assert rollback(catalog) == v2
    assert (catalog / CURRENT).read_text() == v2.name + "\n"
    restored = VectorIndex.load(catalog)
    assert restored.index_dir == v2
    np.testing.assert_array_equal(restored.search(probe, 5)[0], expected[0])
    assert versions(catalog)[0] | {"at": None} == {
        "index_id": v2.name, "at": None, "action": "rollback", "current": True, "exists": True, "held": True,
        "from": v3.name, "holds": {"snapshot": "run-3", "bundle_id": v3_bundle}}
    # A rollback of the rollback goes forward again to the version it replaced.
    assert rollback(catalog) == v3

    with pytest.raises(VersionError, match="no index version 'nope'; published versions still on disk"):
        rollback(catalog, "nope")
    with pytest.raises(VersionError, match="no index version"):
        rollback(catalog, v0.name)  # pruned
    # The command line: versions, then rollback --to.
    assert main(["index", "versions", "--catalog", str(catalog)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(v3.name) and lines[0].endswith("CURRENT HELD") and "(deleted)" in lines[-1]
    assert lines[1].startswith(f"  HELD: rolled back from {v2.name}; scheduled runs publish nothing built from "
                                "snapshot run-2")
    assert main(["index", "rollback", "--catalog", str(catalog), "--to", v1.name]) == 0
    assert capsys.readouterr().out.strip() == str(v1)
    assert VectorIndex.load(catalog).index_dir == v1
    assert main(["index", "rollback", "--catalog", str(catalog), "--to", "nope"]) == 2


def test_prune_never_removes_current_or_the_version_before(tmp_path: Path) -> None:
    v0 = build_version(tmp_path, 0)
    publish(v0, keep=1)
    v1 = build_version(tmp_path, 1)
    publish(v1, keep=1)  # keep=1 still keeps the previous version: a searcher may be loading it
    assert v0.exists() and v1.exists()
    assert prune(v0.parent, keep=1) == []
    with pytest.raises(VersionError, match="keep at least 1"):
        publish(v1, keep=0)


def test_no_earlier_version_and_a_crash_between_rename_and_record(tmp_path: Path) -> None:
    v0 = build_version(tmp_path, 0)
    catalog = v0.parent
    publish(v0)
    with pytest.raises(VersionError, match="no earlier published version"):
        rollback(catalog)
    (catalog / HISTORY).unlink()  # CURRENT moved, the record lost: CURRENT still counts as published
    assert [v["index_id"] for v in versions(catalog)] == [v0.name]


def test_readers_see_one_version_whole_while_versions_are_published(tmp_path: Path) -> None:
    """A searcher reloading through CURRENT while two versions are published back and forth always gets one
    version's files together: the uris, the vectors and the manifest of the same index_id."""
    v0 = build_version(tmp_path, 0)
    publish(v0)
    v1 = build_version(tmp_path, 1)
    publish(v1)
    catalog = v0.parent
    expected = {v.name: VectorIndex.load(v).search(query_like(0, 3, 16), 3)[0] for v in (v0, v1)}
    stop, seen, problems = threading.Event(), set(), []

    def reload() -> None:
        while not stop.is_set():
            try:
                index = VectorIndex.load(catalog, verify="size")
                name = index.index_dir.name
                assert index.manifest["index_id"] == name
                ids = index.search(query_like(0, 3, 16), 3)[0]
                assert (ids % 10 == int(ids.flat[0]) % 10).all()  # every id from one version's catalog
                np.testing.assert_array_equal(ids, expected[name])
                seen.add(name)
            except Exception as e:  # surfaced below, in the test's thread
                problems.append(repr(e))

    reader = threading.Thread(target=reload)
    reader.start()
    for i in range(40):
        publish((v0, v1)[i % 2])
    stop.set()
    reader.join()
    assert problems == [] and seen <= {v0.name, v1.name} and seen


def _publish_alternately(mine: tuple[str, str], who: int, times: int,
                         start: multiprocessing.synchronize.Barrier) -> None:
    """A publisher process: its two versions in turn, each publication tagged with who and which."""
    start.wait()  # all three begin together
    for n in range(times):
        publish(Path(mine[n % 2]), keep=10, who=who, n=n)


def test_concurrent_publishers_keep_every_history_entry(tmp_path: Path) -> None:
    """Three processes publishing at once: each read-modify-write of published.json (and the CURRENT move that
    goes with it) holds the catalog's lock, so no entry is lost, and a reader always parses the file."""
    built = [build_version(tmp_path, v) for v in range(6)]
    catalog = built[0].parent
    history = catalog / HISTORY
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as separate `cirflow` commands
    start = ctx.Barrier(3)
    # Two versions per process, published in turn: CURRENT never already names the one it publishes, so each
    # publication is recorded; keep=10 > 6 versions: pruning deletes none that another process will publish.
    workers = [ctx.Process(target=_publish_alternately, args=((str(built[2 * p]), str(built[2 * p + 1])), p, 30,
                                                              start)) for p in range(3)]
    for w in workers:
        w.start()
    unparsed, reads = [], 0
    while any(w.is_alive() for w in workers):
        if history.is_file():
            text = history.read_text()
            reads += 1
            try:
                assert isinstance(json.loads(text)["versions"], list)
            except (ValueError, KeyError, AssertionError) as e:
                unparsed.append(f"{e!r}: {text[:80]!r}")
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert unparsed == [] and reads > 0
    entries = json.loads(history.read_text())["versions"]
    assert len(entries) == 90
    for p in range(3):  # each process's publications, all of them, in its own order
        assert [e["n"] for e in entries if e["who"] == p] == list(range(30))
    # The last entry and CURRENT agree: the pointer moved under the same lock as the record.
    assert (catalog / CURRENT).read_text().strip() == entries[-1]["index_id"]

"""The Prefect flows end to end under Prefect's test harness (real engine, real stages, tiny sizes): results,
reruns served from cache (read from the task runs' states), the quality gate, catalog refreshes, and injected
failures that leave the published index untouched."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from cirflow.core.files import CURRENT, follow_current
from cirflow.flows.catalog_flow import catalog
from cirflow.flows.cli import main
from cirflow.flows.pipeline_flow import pipeline
from cirflow.flows.training_flow import training
from cirflow.indexing.embedding import shards
from cirflow.indexing.embedding.catalog import CatalogConfig, load_catalog
from cirflow.indexing.index.versions import rollback, versions
from cirflow.indexing.search import index_store
from cirflow.models.tiny import TINY_MODEL
from tests.indexing.held_store import held_entry


def task_states(state: Any) -> dict[str, list[str]]:
    """Task name -> the state names of its runs in the flow run of `state`."""
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    out: dict[str, list[str]] = {}
    for run in sorted(runs, key=lambda r: r.expected_start_time):
        out.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return out


def artifacts(state: Any) -> dict[str, Any]:
    """Artifact key -> artifact, of the flow run of `state` (its tasks' included)."""
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key: a for a in found}


def training_overrides(data: Path, workdir: Path, steps: int) -> list[str]:
    return [f"workdir={workdir}", f"train.data.root={data}", *[f"train.{o}" for o in TINY_MODEL],
            f"train.optim.max_steps={steps}"]


def catalog_overrides(data: Path, workdir: Path, folder: Path, bundle: Path | None = None) -> list[str]:
    return [f"embed.workdir={workdir}", "embed.catalog.name=shop", f"embed.catalog.folder={folder}",
            f"queries.root={data}", "min_recall=0.9", *([f"embed.bundle={bundle}"] if bundle else [])]


def link_catalog(images: list[Path], folder: Path) -> list[Path]:
    """A shop catalog of symlinks to dataset images (entries under their own names, versions of their targets)."""
    folder.mkdir(parents=True, exist_ok=True)
    links = []
    for image in images:
        link = folder / image.name
        link.symlink_to(image)
        links.append(link)
    return links


def index_ids(catalog_dir: Path) -> set[int]:
    return set(index_store.read_uris(follow_current(catalog_dir))[0].tolist())


def test_training_flow_registers_caches_and_gates(prefect_harness: None, tiny_shapes: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "wd"
    state = training(overrides=training_overrides(tiny_shapes, workdir, 40), return_state=True)
    assert state.is_completed(), state.message
    first = state.result()
    assert first["registered"] and follow_current(workdir / "bundles") == Path(first["bundle"])
    assert len(first["gate"]["rows"]) == 1  # nothing registered before: nothing to compare with
    assert (Path(first["checkpoint"]).parent.parent / "plots" / "training.png").is_file()
    made = artifacts(state)
    assert "| R@1 | R@5 | R@10 |" in made["training-metrics"].data and "Quality gate on val" in made[
        "training-metrics"].data
    assert Path(made["training-loss-and-recall"].data.split("(", 1)[1].split(")", 1)[0].removeprefix(
        "file://")).is_file()
    assert {"training-examples-shapes-test", "training-examples-shapes-novel"} <= set(made)

    # The same inputs again: nothing is trained, evaluated or exported; the gate compares the bundle with itself.
    again = training(overrides=training_overrides(tiny_shapes, workdir, 40), return_state=True)
    assert again.is_completed(), again.message
    states = task_states(again)
    for name in ("train_model", "evaluate_checkpoint", "export_model", "evaluate_for_gate"):
        assert set(states[name]) == {"Cached"}, (name, states)
    assert again.result()["bundle_id"] == first["bundle_id"]

    # A barely trained model is worse than the registered one: refused, with both rows; CURRENT stays.
    worse = training(overrides=training_overrides(tiny_shapes, workdir, 1), return_state=True)
    assert worse.is_failed()
    assert "not registered: worse than the current bundle" in worse.message
    assert f"current {first['bundle_id']}" in worse.message and "new " in worse.message
    assert follow_current(workdir / "bundles") == Path(first["bundle"])

    # The pipeline: training (from cache) then the catalog with the registered bundle.
    shop = tmp_path / "shop"
    link_catalog(sorted((tiny_shapes / "images" / "test").iterdir()), shop)
    state = pipeline(overrides=[*[f"training.{o}" for o in training_overrides(tiny_shapes, workdir, 40)],
                                *[f"catalog.{o}" for o in catalog_overrides(tiny_shapes, workdir, shop)]],
                     return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["catalog"]["bundle_id"] == first["bundle_id"] and result["catalog"]["encoded"] == 54
    assert index_ids(workdir / "indexes" / "shop") == set(load_catalog(CatalogConfig("shop", str(shop)))
                                                          .column("id").to_pylist())


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Path:
    return tiny_bundle


def test_catalog_flow_refreshes_only_what_changed(prefect_harness: None, tiny_shapes: Path, bundle: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workdir, shop = tmp_path / "wd", tmp_path / "shop"
    links = link_catalog(sorted((tiny_shapes / "images" / "test").iterdir()), shop)
    overrides = catalog_overrides(tiny_shapes, workdir, shop, bundle)
    first = catalog(overrides=overrides, return_state=True)
    assert first.is_completed(), first.message
    before = first.result()
    catalog_dir = workdir / "indexes" / "shop"
    assert before["encoded"] == 54 and follow_current(catalog_dir) == Path(before["index_dir"])
    made = artifacts(first)
    assert "Tuning sweep" in made["catalog-refresh"].data and "recall@10" in made["catalog-refresh"].data
    assert "catalog-tuning-sweep" in made

    # Unchanged inputs: served from cache, the same version stays published (not published again).
    again = catalog(overrides=overrides, return_state=True)
    assert again.is_completed(), again.message
    states = task_states(again)
    for name in ("embed_snapshot", "encode_queries", "build"):
        assert states[name] == ["Cached"], (name, states)
    assert len(versions(catalog_dir)) == 1 and again.result()["encoded"] == 0

    # The shop changes: 3 new images, 2 removed, 1 overwritten with another picture.
    val = sorted((tiny_shapes / "images" / "val").iterdir())
    link_catalog(val[:3], shop)
    for link in links[:2]:
        link.unlink()
    links[2].unlink()
    shutil.copyfile(val[10], links[2])
    changed = catalog(overrides=overrides, return_state=True)
    assert changed.is_completed(), changed.message
    after = changed.result()
    assert after["delta"] | {"previous": None} == {"previous": None, "added": 3, "changed": 1, "removed": 2,
                                                   "unchanged": 51, "reused_vectors": 51, "reused_errors": 0,
                                                   "retried": 0}
    assert after["encoded"] == 4  # the delta, nothing else
    expected = set(load_catalog(CatalogConfig("shop", str(shop))).column("id").to_pylist())
    assert index_ids(catalog_dir) == expected  # none stale, none missing
    old_ids, old_vectors, _ = shards.open_snapshot(Path(before["snapshot_dir"])).read_all()
    new_ids, new_vectors, _ = shards.open_snapshot(Path(after["snapshot_dir"])).read_all()
    changed_id = load_catalog(CatalogConfig("shop", str(shop))).filter(
        np.array([Path(u).name == links[2].name for u in load_catalog(CatalogConfig("shop", str(shop)))
                  .column("uri").to_pylist()])).column("id")[0].as_py()
    old = {i: v.tobytes() for i, v in zip(old_ids.tolist(), old_vectors)}
    new = {i: v.tobytes() for i, v in zip(new_ids.tolist(), new_vectors)}
    assert all(new[i] == old[i] for i in new if i in old and i != changed_id)  # byte-identical
    assert new[changed_id] != old[changed_id]

    # Rollback restores the previous version exactly, and the next scheduled runs respect it: the unchanged
    # catalog's index is neither taken from the cache nor built again and published.
    assert rollback(catalog_dir) == Path(before["index_dir"])
    assert index_ids(catalog_dir) == set(old_ids.tolist())
    pointer = (catalog_dir / CURRENT).read_bytes()
    for _ in range(2):
        nightly = catalog(overrides=overrides, return_state=True)
        assert nightly.is_completed(), nightly.message
        assert nightly.result()["published"] is False and nightly.result()["held"]["from"] == Path(
            after["index_dir"]).name
        assert (catalog_dir / CURRENT).read_bytes() == pointer
    row = versions(catalog_dir)[0]
    assert row["current"] and row["held"] and row["holds"]["snapshot"] == after["snapshot"]
    assert main(["index", "versions", "--catalog", str(catalog_dir)]) == 0
    assert "HELD: rolled back from " + Path(after["index_dir"]).name in capsys.readouterr().out

    # Another workdir over the same shop shares Prefect's result store, not its index: its run builds and
    # publishes in its own tree and leaves this one's CURRENT alone.
    other = catalog(overrides=catalog_overrides(tiny_shapes, tmp_path / "wd2", shop, bundle), return_state=True)
    assert other.is_completed(), other.message
    assert Path(other.result()["index_dir"]).parent == tmp_path / "wd2" / "indexes" / "shop"
    assert (catalog_dir / CURRENT).read_bytes() == pointer

    # A newer snapshot lifts the hold.
    link_catalog(val[3:4], shop)
    newer = catalog(overrides=overrides, return_state=True)
    assert newer.is_completed(), newer.message
    assert newer.result()["published"] and follow_current(catalog_dir) == Path(newer.result()["index_dir"])
    assert not versions(catalog_dir)[0]["held"]


def test_injected_failures_leave_the_published_index_untouched(prefect_harness: None, tiny_shapes: Path,
                                                                bundle: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    workdir, shop = tmp_path / "wd", tmp_path / "shop"
    link_catalog(sorted((tiny_shapes / "images" / "test").iterdir()), shop)
    overrides = catalog_overrides(tiny_shapes, workdir, shop, bundle)
    assert catalog(overrides=overrides, return_state=True).is_completed()
    pointer = workdir / "indexes" / "shop" / CURRENT
    published = pointer.read_bytes()

    # An unreadable catalog.
    missing = catalog(overrides=catalog_overrides(tiny_shapes, workdir, tmp_path / "gone", bundle),
                      return_state=True)
    assert missing.is_failed() and "does not exist or is not a directory" in missing.message
    assert pointer.read_bytes() == published

    # A failing shard write (the disk fills up mid-refresh); the rerun after the fix finishes the snapshot.
    link_catalog(sorted((tiny_shapes / "images" / "val").iterdir())[:1], shop)
    real_write = shards.write_parquet_atomic

    def full_disk(table: Any, path: Path, **options: Any) -> dict[str, Any]:
        if path.name.startswith("part-"):
            raise OSError(28, "No space left on device", str(path))
        return real_write(table, path, **options)

    monkeypatch.setattr(shards, "write_parquet_atomic", full_disk)
    failed = catalog(overrides=overrides, return_state=True)
    assert failed.is_failed() and "No space left on device" in failed.message
    assert pointer.read_bytes() == published
    monkeypatch.undo()
    fixed = catalog(overrides=overrides, return_state=True)
    assert fixed.is_completed(), fixed.message
    assert fixed.result()["encoded"] == 1 and pointer.read_bytes() != published
    published = pointer.read_bytes()

    # Recall under the floor (as measured by validation): refused, published index unchanged; then it passes.
    monkeypatch.setattr("cirflow.indexing.index.validate.recall_at_k", lambda *args, **kwargs: 0.25)
    refused = catalog(overrides=overrides, return_state=True)
    assert refused.is_failed() and "recall@10 0.2500" in refused.message and "under the floor 0.9" in refused.message
    assert pointer.read_bytes() == published
    monkeypatch.undo()
    assert catalog(overrides=overrides, return_state=True).is_completed()
    assert pointer.read_bytes() == published


def test_shipped_flow_configs_load_strictly() -> None:
    from cirflow.core.config import ConfigError, load_config
    from cirflow.flows.catalog_flow import CatalogFlowConfig
    from cirflow.flows.pipeline_flow import PipelineFlowConfig
    from cirflow.flows.training_flow import TrainingFlowConfig

    configs = Path(__file__).resolve().parents[2] / "configs"
    shop = load_config(CatalogFlowConfig, configs / "catalog_flow.yaml")
    assert shop.embed.catalog.name == "shapes-shop" and shop.queries.split == "val"
    assert load_config(TrainingFlowConfig, configs / "training_flow.yaml").gate.split == "val"
    both = load_config(PipelineFlowConfig, configs / "pipeline_flow.yaml")
    assert both.catalog.embed.catalog.name == shop.embed.catalog.name
    with pytest.raises((ConfigError, ValueError), match="min_recall"):
        load_config(CatalogFlowConfig, configs / "catalog_flow.yaml", ["min_recall=1.5"])


def test_kill_during_a_refresh_then_rerun_ends_consistent(prefect_harness: None, tiny_shapes: Path, bundle: Path,
                                                          tmp_path: Path) -> None:
    """kill -9 of a catalog flow run in the middle of its embedding (blocked on a read that a store holds) leaves
    the published index as it was, whole; the rerun resumes the snapshot and publishes an index of exactly the new
    catalog."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import pyarrow as pa
    import pyarrow.csv as pacsv

    from cirflow.indexing.embedding.catalog import folder_entries
    from cirflow.indexing.search.index_store import verify_index

    gallery = sorted((tiny_shapes / "images" / "test").iterdir())
    table = folder_entries(tiny_shapes / "images", gallery).sort_by("id")
    manifest, workdir = tmp_path / "shop.csv", tmp_path / "wd"
    pacsv.write_csv(table.append_column("version", pa.array(["v1"] * table.num_rows)), manifest)
    overrides = [f"embed.workdir={workdir}", "embed.catalog.name=shop", f"embed.catalog.manifest={manifest}",
                 f"embed.bundle={bundle}", "embed.rows_per_shard=8", f"queries.root={tiny_shapes}", "min_recall=0.9"]
    assert catalog(overrides=overrides, return_state=True).is_completed()
    catalog_dir = workdir / "indexes" / "shop"
    published = follow_current(catalog_dir)

    # Ten new entries; the last by id is read from a store that holds the read: the refresh blocks there, after
    # writing the shards before it. Its version is the manifest's, so serving it later leaves the catalog state as is.
    extra = folder_entries(tiny_shapes / "images", sorted((tiny_shapes / "images" / "val").iterdir())[:10])
    grown = pa.concat_tables([table, extra]).sort_by("id")
    store, grown = held_entry(grown, grown.num_rows - 1)
    pacsv.write_csv(grown.append_column("version", pa.array(["v1"] * grown.num_rows)), manifest)
    script = f"from cirflow.flows.catalog_flow import catalog\ncatalog(overrides={overrides!r})"
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect")}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = next((workdir / "embeddings" / "shop").iterdir())
    first = follow_current(base)
    deadline, snapshot = time.monotonic() + 180, None
    # Until a shard is written and the read of the held entry is in flight.
    while time.monotonic() < deadline and proc.poll() is None and (snapshot is None or not store.waiting):
        fresh = [p for p in base.iterdir() if p.is_dir() and p != first and (p / "manifest.json").is_file()]
        if fresh and shards.read_manifest(fresh[0])["shards"]:
            snapshot = fresh[0]
        time.sleep(0.2)
    in_flight = store.waiting
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0].decode(errors="replace")
    store.release()  # the same uri and version: the same catalog state, so the same snapshot resumes
    assert snapshot is not None and in_flight and proc.returncode == -signal.SIGKILL, output[-3000:]
    assert follow_current(catalog_dir) == published  # untouched, and whole
    verify_index(published)
    assert index_ids(catalog_dir) == set(table.column("id").to_pylist())

    rerun = catalog(overrides=overrides, return_state=True)
    store.close()
    assert rerun.is_completed(), rerun.message
    assert Path(rerun.result()["snapshot_dir"]) == snapshot
    assert index_ids(catalog_dir) == set(grown.column("id").to_pylist())
    verify_index(follow_current(catalog_dir))

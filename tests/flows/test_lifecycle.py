"""Simulated weeks of production, day by day, with the real flows (Prefect's test harness, Ray, FAISS, ONNX
Runtime) and the real search service (uvicorn on 127.0.0.1, hot reload) answering a client all the while.

Every day the shop's catalog churns (adds, removes, overwrites, a metadata-only change, one corrupt upload) and
the nightly catalog flow runs. Every five days (a compressed week: the suite's budget) the training data grows
and the training flow retrains: a new run and a new bundle, except the one whose model is worse, which the gate
refuses. An operator rolls back an index and
the following nightly leaves it alone; a refresh is killed with SIGKILL mid-embedding and rerun; a transient
storage error on one night is healed the next. Each answer the client got must be the search library's answer for
the (index_id, bundle_id) it names. At the end everything is pruned to its keep settings, with no temp file, Ray
process or server left.

The bench with the same scenario at a size that means something is bench/lifecycle.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from cirflow.core.files import follow_current
from cirflow.flows.catalog_flow import catalog
from cirflow.flows.gate import GateRefused
from cirflow.flows.training_flow import training
from cirflow.indexing.embedding import embed_stages, shards
from cirflow.indexing.index.versions import rollback, versions
from cirflow.indexing.search import index_store
from cirflow.indexing.service.app import create_app
from cirflow.indexing.service.state import ServiceConfig
from cirflow.models import train_loop
from cirflow.models.images import ImageLimits
from cirflow.models.tiny import TINY_MODEL
from tests.bench.scripts import load_bench_script
from tests.indexing.held_store import HeldStore
from tests.indexing.service_setup import LiveServer

DAYS = 20
# The "weekly" retrains (every five days: each event of a month, at two thirds of its cost) after the first day's: one model is worse (the gate refuses it), one run is killed in its
# first stage and run again.
RETRAIN = {6: "better", 11: "worse", 16: "killed, then better"}
GROW = 8  # training triplets that arrive each week
KILL_DAY, ROLLBACK_DAY, FAULT_DAY = 3, 8, 13
QUIET_DAYS = (ROLLBACK_DAY + 1, FAULT_DAY + 1)  # days the catalog does not change
K = 5
KEEP = {"snapshots": 2, "versions": 3, "bundles": 2}
RAY_MARK = "CIRFLOW_TEST_RAY_MARK"  # set for the test's duration: marks the Ray processes its flows start


def test_a_simulated_month_of_production(prefect_harness: None, tiny_shapes: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    sim = load_bench_script("lifecycle_sim")
    monkeypatch.setenv(RAY_MARK, uuid.uuid4().hex)
    ray_before = _ray_processes()
    data = _growing_dataset(tiny_shapes, tmp_path / "data", weeks=len(RETRAIN))
    pool = sorted((tiny_shapes / "images" / "test").iterdir()) + sorted((tiny_shapes / "images" / "val").iterdir())
    shop = sim.Shop.create(tmp_path / "shop", pool, size=40, seed=0)
    workdir = tmp_path / "wd"
    catalog_dir, bundles = workdir / "indexes" / "shop", workdir / "bundles"
    # CLIP4Cir's two stages (a killed run must resume in either), a checkpoint after every step.
    train_overrides = [f"workdir={workdir}", f"train.data.root={data}", *[f"train.{o}" for o in TINY_MODEL],
                       "train.optim.max_steps=30", "train.recipe=two_stage", "train.model.composer.name=combiner",
                       "train.stage2.max_steps=15", "train.stage2.max_minutes=0", "train.stage2.batch_size=16",
                       "train.checkpoint_every_minutes=0", "gate.tolerance=0.1"]
    # A delta under local_below images is embedded in-process, a new bundle's whole catalog on a local Ray.
    nightly = [f"embed.workdir={workdir}", "embed.catalog.name=shop", f"embed.catalog.manifest={shop.manifest}",
               "embed.rows_per_shard=16", "embed.local_below=30", "embed.ray.num_cpus=2",
               f"embed.keep_snapshots={KEEP['snapshots']}", "embed.read_retries=2",
               "embed.retry_backoff_seconds=0.01", f"queries.root={data}", "min_recall=0.9",
               f"keep_versions={KEEP['versions']}", f"keep_bundles={KEEP['bundles']}", "index_delta_max=0.5"]
    queries = [sim.Query(pool[0].read_bytes(), "make the red circle blue"),
               sim.Query(pool[-1].read_bytes(), "add a small green square on the left")]

    # Day 1: the pipeline's two flows, then the service comes up over the published index.
    first = training(overrides=train_overrides)
    assert first["registered"]
    night = catalog(overrides=nightly)
    assert night["published"] and night["bundle_id"] == first["bundle_id"]
    app = create_app(ServiceConfig(index=catalog_dir, reload_seconds=0.1, workers=2))
    checked, facts = 0, {}  # facts: what one day leaves for a later day to check
    with LiveServer(app) as live, sim.QueryClient(live.url, queries, k=K, pause=0.02) as client:
        served = first["bundle_id"]
        for day in range(2, DAYS + 1):
            if day in RETRAIN:
                _grow(data, week=list(RETRAIN).index(day) + 1)
                runs_before = set((workdir / "runs").iterdir())
                if RETRAIN[day] == "worse":  # an operator's experiment with a far shorter schedule
                    with pytest.raises(GateRefused, match="worse than the current bundle"):
                        training(overrides=[*train_overrides, "train.optim.max_steps=1", "train.stage2.max_steps=1"])
                    assert _registered(bundles) == served  # the served bundle is unchanged
                else:
                    if RETRAIN[day].startswith("killed"):
                        _killed_in_stage_one(train_overrides, monkeypatch)
                    trained = training(overrides=train_overrides)
                    assert trained["registered"] and trained["bundle_id"] != served  # a new model
                    assert set((workdir / "runs").iterdir()) - runs_before == {Path(trained["checkpoint"]).parents[1]}
                    served = trained["bundle_id"]
            if day not in QUIET_DAYS:
                change = shop.churn(sim.Churn())
            missing: set[int] = set()  # catalog images that tonight's index may lack
            if day == KILL_DAY:
                night = _killed_then_rerun(shop, nightly, catalog_dir, pool)
            elif day == FAULT_DAY:
                facts["victim"] = change["added"][0]
                night = _transient_fault_night(facts["victim"], shop, nightly, monkeypatch)
                missing = {facts["victim"]}
            else:
                night = catalog(overrides=nightly)
            if day == FAULT_DAY + 1:  # the fault is gone: the next run, on the same catalog, reads the image again
                assert facts["victim"] in _indexed(catalog_dir) and night["delta"]["retried"] == 1
            if day == ROLLBACK_DAY + 1:  # the day after the rollback, nothing changed: the rollback holds
                assert night["published"] is False and night["held"]["from"] == facts["rolled back from"]
                assert follow_current(catalog_dir) == facts["rolled back to"] and versions(catalog_dir)[0]["held"]
            else:
                assert night["published"], night
                assert _indexed(catalog_dir) == shop.image_ids() - missing, day  # none stale, none missing
                assert night["bundle_id"] == served
            if day == ROLLBACK_DAY:
                facts["rolled back from"] = follow_current(catalog_dir).name
                facts["rolled back to"] = rollback(catalog_dir)
            _wait_served(app, catalog_dir)
            answers, client.answers = client.answers, []
            checked += sim.check_answers(answers, queries, catalog_dir, bundles, K)
        assert app.state.published.version.bundle_id == served
    # The month's end: the service is gone, and so is every Ray process the flows started.
    assert not live.thread.is_alive()
    assert checked >= 20, checked  # versions that answered and were compared with the library
    _assert_pruned(workdir, served)
    leftovers = [p for root in (workdir, shop.root) for p in root.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
    deadline = time.monotonic() + 30
    while _ray_processes() - ray_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes() - ray_before


def _killed_in_stage_one(train_overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The training flow dies in stage 1 of its two (the node lost after a few steps); the rerun that follows
    resumes from the last checkpoint, stage 1's optimiser state with it."""
    real, calls = train_loop.batch_loss, {"n": 0}

    def dying(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated node loss")
        return real(*args)

    monkeypatch.setattr(train_loop, "batch_loss", dying)
    try:
        with pytest.raises(RuntimeError, match="simulated node loss"):
            training(overrides=train_overrides)
    finally:
        monkeypatch.setattr(train_loop, "batch_loss", real)


def _transient_fault_night(victim: int, shop: Any, nightly: list[str], monkeypatch: pytest.MonkeyPatch) -> dict:
    """The night object storage times out on one new image, every retry: recorded as transient, not indexed."""
    uri = shop.entries[victim]["uri"]
    real = embed_stages.read_bytes

    def flaky(u: str, limits: ImageLimits | None = None) -> bytes:
        if u == uri:
            raise TimeoutError(f"simulated storage timeout reading {u}")
        return real(u, limits)

    monkeypatch.setattr(embed_stages, "read_bytes", flaky)
    try:
        night = catalog(overrides=nightly)
    finally:
        monkeypatch.setattr(embed_stages, "read_bytes", real)
    errors = shards.read_table(Path(night["snapshot_dir"]) / shards.ERRORS)
    assert victim in errors.column("id").to_pylist()
    assert shards.read_manifest(Path(night["snapshot_dir"]))["transient_errors"] == 1
    return night


def _killed_then_rerun(shop: Any, nightly: list[str], catalog_dir: Path, pool: list[Path]) -> dict[str, Any]:
    """kill -9 of a nightly run blocked mid-embedding on a read that a store holds (the newest entry, in the last
    shard), then the rerun: the published index stays whole meanwhile, and the rerun resumes the same snapshot."""
    from prefect.settings import PREFECT_API_URL

    # The newest entry's picture is served from the store: its version (the size the store reports) and uri stay
    # the same until the rerun, so the rerun sees the same catalog state.
    picture = pool[1].read_bytes()
    stalled = shop.add_entry(picture)
    local = shop.entries[stalled]["uri"]
    store = HeldStore({"stall.png": picture})
    store.hold("stall.png")
    shop.entries[stalled]["uri"] = store.uri("stall.png")
    shop.write()
    published = follow_current(catalog_dir)
    base = catalog_dir.parents[1] / "embeddings" / "shop" / index_store.read_manifest(published)[
        "bundle_id"]
    before = set(base.iterdir())
    script = f"from cirflow.flows.catalog_flow import catalog\ncatalog(overrides={nightly!r})"
    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline, snapshot = time.monotonic() + 120, None
    # Until a shard is written and the read of the held entry is in flight.
    while time.monotonic() < deadline and proc.poll() is None and (snapshot is None or not store.waiting):
        fresh = [p for p in base.iterdir() if p.is_dir() and p not in before and (p / shards.MANIFEST).is_file()]
        if fresh and shards.read_manifest(fresh[0])["shards"]:
            snapshot = fresh[0]
        time.sleep(0.1)
    in_flight = store.waiting
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0].decode(errors="replace")
    store.release()  # the rerun reads the picture this time
    assert snapshot is not None and in_flight and proc.returncode == -signal.SIGKILL, output[-3000:]
    assert follow_current(catalog_dir) == published
    index_store.verify_index(published)

    night = catalog(overrides=nightly)
    assert Path(night["snapshot_dir"]) == snapshot and stalled in _indexed(catalog_dir)
    # Tomorrow the entry is an ordinary file again (the shop's churn writes and removes files at its entries' uris).
    store.close()
    shop.entries[stalled]["uri"] = local
    shop.write()
    return night


def _wait_served(app: Any, catalog_dir: Path, timeout: float = 30) -> None:
    """Until the service serves what CURRENT names (hot reload polls every 0.1 s)."""
    target = follow_current(catalog_dir).name
    deadline = time.monotonic() + timeout
    while app.state.published.version.index_id != target:
        assert time.monotonic() < deadline, f"the service still serves {app.state.published.version.index_id}"
        time.sleep(0.05)


def _indexed(catalog_dir: Path) -> set[int]:
    return set(index_store.read_uris(follow_current(catalog_dir))[0].tolist())


def _registered(bundles: Path) -> str:
    return json.loads((follow_current(bundles) / "manifest.json").read_text())["bundle_id"]


def _growing_dataset(source: Path, out: Path, weeks: int) -> Path:
    """A copy of the dataset whose training captions hold all but the triplets of the coming weeks."""
    shutil.copytree(source, out)
    captions = out / "captions" / "cap.rc2.train.json"
    shutil.copyfile(captions, out / "all-train-captions.json")
    triplets = json.loads(captions.read_text())
    captions.write_text(json.dumps(triplets[:len(triplets) - weeks * GROW]))
    return out


def _grow(data: Path, week: int) -> None:
    triplets = json.loads((data / "all-train-captions.json").read_text())
    missing = (len(RETRAIN) - week) * GROW
    (data / "captions" / "cap.rc2.train.json").write_text(json.dumps(triplets[:len(triplets) - missing]))


def _assert_pruned(workdir: Path, served: str) -> None:
    for bundle_dir in (workdir / "embeddings" / "shop").iterdir():
        complete = [p for p in bundle_dir.iterdir() if p.is_dir() and (shards.read_manifest(p) or {}).get("complete")]
        assert len(complete) <= KEEP["snapshots"], (bundle_dir, complete)
    kept = [p for p in (workdir / "indexes" / "shop").iterdir() if (p / index_store.MANIFEST).is_file()]
    assert len(kept) <= KEEP["versions"], kept
    bundles = {p.name for p in (workdir / "bundles").iterdir() if p.is_dir()}
    assert len(bundles) <= KEEP["bundles"], bundles
    assert {p.name for p in (workdir / "embeddings" / "shop").iterdir()} <= {
        json.loads((workdir / "bundles" / b / "manifest.json").read_text())["bundle_id"] for b in bundles}
    assert served in {json.loads((workdir / "bundles" / b / "manifest.json").read_text())["bundle_id"]
                      for b in bundles}


def _ray_processes() -> set[int]:
    """PIDs of Ray's own processes (GCS, raylet, workers) that this test's flows started: those whose environment
    carries the test's RAY_MARK (Ray's processes inherit the environment of the process that starts them). Ray
    instances of other tests, run in parallel by pytest-xdist, are not this test's to count."""
    found = set()
    mark = f"{RAY_MARK}={os.environ.get(RAY_MARK, '')}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            ours = mark in (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ours and (b"gcs_server" in cmdline or b"raylet" in cmdline or cmdline.startswith(b"ray::")):
            found.add(int(proc.name))
    return found

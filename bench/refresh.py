"""Catalog refresh: re-embedding and re-indexing a catalog after 1% of it changed, against embedding and indexing
all of it again, in the same run.

    .venv/bin/python bench/refresh.py [--bundle DIR] [--data workdir/bench/shapes-x4] [--workdir workdir/bench/refresh]
        [--doc docs/benchmarks.md] [--size 100000] [--queries 2000] [--no-flow]
    .venv/bin/python bench/refresh.py --quick [--bundle DIR] [--data DIR] [--workdir DIR] [--doc PATH]   # < 1 min

--bundle defaults to the registered bundle (workdir/bundles/CURRENT); --data to the shapes dataset at scale 4
(104,412 training images of 64x64), generated when the folder has none. About 4 minutes on 2 quiet cores.

The catalog is a folder of symlinks, one per image, in a fresh WORKDIR/catalog: the first --size training images by
sorted name (the dataset itself is never modified). A folder catalog lists a symlink as an entry under its own name
and takes its version (size + mtime) from the target, so the symlinks behave as the images would. The training
images left out are the pool that additions and overwrites draw from: new to the catalog, and none of them is a
reference image of the queries (those are test images).

Protocol, one step after the other in one process, each timed by wall clock. Other jobs on the machine skew every
timing: the CPU time of the processes outside the bench's own process tree is sampled each second from /proc during
each run and reported in cores (OtherJobs), so a reader sees which runs had company.
1. Full: a fresh embeddings and indexes workdir, then the calls a user makes, timed one by one: run_embed (no
   previous snapshot: every image is embedded; at >= local_below images it starts its own local Ray instance with
   default settings, one actor per CPU, ray.init included), shards.open_snapshot (verifies every shard's sha256),
   refresh.build_or_refresh (nothing published yet: build_index, IndexConfig defaults: HNSW at 100k x 128
   dims, tuned to recall@10 0.95), validate_index (recall re-measured on the held-out queries, ids checked against
   the catalog minus its errors rows; floor: the catalog flow's min_recall) and versions.publish. That is
   what a user without refresh would do every time: embed everything again and rebuild.
2. Change 1% of the catalog (seeded): add 0.5% (symlinks to images of the pool), remove 0.25%, overwrite 0.25%
   (a copy of another pool image's bytes replaces the symlink, written atomically: new content, size and mtime,
   as a shop's overwrite). Untimed.
3. Refresh: the same five calls on the same workdir, as the catalog flow makes them. run_embed finds the CURRENT
   snapshot and embeds only the new and changed images (a delta under local_below: in this process, no Ray);
   build_or_refresh gets the published version (indexes/<catalog>/CURRENT, found as the flow finds it) and the
   flow's index_delta_max: while the delta and the dead ids stay under that share of the base, it makes an overlay
   (indexing/index/refresh.py: the base's files hard-linked, an exact index of the new and changed vectors, the dead
   ids, re-tuned) instead of a build. The refresh must pass its checks or the bench stops: images encoded ==
   added + changed; delta counts == the change; the ids the new index answers with (an overlay: the base's minus
   the dead plus the delta's) == the new catalog's ids minus its errors rows, and an overlay's delta and dead ids
   are exactly the change's; every unchanged vector byte-identical to the full run's. (It also counts the
   overwritten images whose vector changed.)
4. Where run_embed's time goes, in the same calls: its own log records mark the end of its preparation (bundle
   check, listing + stat of every entry, previous snapshot opened and verified, reuse plan, catalog file), its
   manifest's last_run.seconds is embedding + writing every shard (reused vectors copied, sha256 of each file),
   the rest is the errors table, manifest and CURRENT. After the refresh, parts are measured apart on the same
   files: a listing + stat of the catalog alone (load_catalog) and the same system calls alone (os.scandir, os.stat
   per entry: the floor of any listing), each the median of 3; encoding the delta's images alone (read, decode,
   ONNX Runtime session load and encoder, the job's own in-process code, nothing written); and build_index on the
   refreshed snapshot (a full rebuild, what the refresh would cost without the overlay; built, not published).
5. Optional (skip with --no-flow): the Prefect catalog flow (flows/catalog_flow.py) on the same workdir, with its
   default query split (val). A first flow run is a warm-up, untimed in the ratio: it starts Prefect's ephemeral
   server, encodes and caches the val queries and builds the index they tune, as a deployment's earlier nights
   would have. Then a second seeded 1% change and a timed flow run: snapshot task, embedding, index (an overlay
   on the warm-up's version, tuned with the flow's own queries: all of the split's), validation, artifacts and
   publication, Prefect's overhead included.
   Per task: the time since the previous task finished (from Prefect's "Finished in state" log records; driver
   code between tasks is counted with the next task).

The ratio is refresh total / full total of the stage calls (step 1 vs step 3), with every step beside it. The
query vectors (--queries test-split composed queries, seeded sample, as bench/indexing.py) are encoded once before
step 1 and used by both runs: a nightly refresh has them cached. The images were likely in the page cache for both
runs (the dataset is read by other benches; 820 MB), and the refresh lists a folder whose metadata was just
touched: a cold nightly run would list and read slower. Nothing is tuned for the ratio: library defaults
throughout, and faiss with its default threads (one per core).

--quick: the training images of a tiny dataset (the test suites' tiny_shapes, generated in WORKDIR/data unless
--data is given) minus a few kept as the pool, at least one entry added, removed and overwritten, the queries of
its test split, and the flow; writes to WORKDIR/refresh-quick.md unless --doc is given. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import statistics
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np
import pyarrow.parquet as pq
from report import DOC, default_bundle, machine, progress, today, warn_if_busy, write_section

from cirflow.core.files import follow_current, read_json, write_bytes_atomic, write_json_atomic
from cirflow.export.runtime import BundleRuntime
from cirflow.indexing.embedding import shards
from cirflow.indexing.embedding.catalog import CatalogConfig, load_catalog, stable_id
from cirflow.indexing.embedding.embed_stages import ImageEmbedder, decode_batch
from cirflow.indexing.embedding.job import EmbedConfig, run_embed
from cirflow.indexing.index.build import build_index
from cirflow.indexing.index.plan import IndexConfig
from cirflow.indexing.index.queries import Queries, encode_query_split
from cirflow.indexing.index.refresh import build_or_refresh
from cirflow.indexing.index.validate import validate_index
from cirflow.indexing.index.versions import publish
from cirflow.indexing.search import index_store
from cirflow.models.data.shapes import MANIFEST as SHAPES_MANIFEST
from cirflow.models.data.shapes import ShapesConfig, generate_shapes

SEED = 0
AIM_RATIO = 0.05
# Shares of the catalog: 1% in all (the "1% changed").
ADDED, REMOVED, CHANGED = 0.005, 0.0025, 0.0025
FULL_DATA = ShapesConfig(scale=4)  # 104,412 training images: a 100k catalog and a pool of ~4.4k
QUICK_DATA = ShapesConfig(seed=0, train_triplets=160, val_queries=40, test_queries=40, workers=1)  # tiny_shapes
QUICK_POOL = 8  # tiny catalog: training images kept out for additions and overwrites
BUSY_CORES = 0.2  # other processes' CPU (cores, averaged over a run) above which the report flags the run
SAMPLE_S = 1.0  # OtherJobs' sampling period: ~10 ms of CPU per sample
APART_REPEATS = 3  # listings measured apart: the median
STEPS = ("run_embed", "open_snapshot", "build_or_refresh", "validate_index", "publish")
PREFECT_ENV = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


# --- the catalog and its change ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    added: tuple[Path, ...]  # pool images linked into the catalog under their own names
    removed: tuple[str, ...]  # catalog entry names
    changed: tuple[tuple[str, Path], ...]  # (catalog entry name, pool image whose bytes replace it)

    def ids(self, kind: str) -> set[int]:
        names = {"added": [p.name for p in self.added], "removed": list(self.removed),
                 "changed": [name for name, _ in self.changed]}[kind]
        return {stable_id(name) for name in names}  # a folder catalog's id: the path relative to the folder

    def counts(self) -> dict[str, int]:
        return {"added": len(self.added), "changed": len(self.changed), "removed": len(self.removed)}

    def used(self) -> set[Path]:
        return set(self.added) | {source for _, source in self.changed}


def change_counts(size: int) -> dict[str, int]:
    """Entries added, removed and overwritten in a catalog of `size`: the shares, at least one of each."""
    return {"added": max(1, round(ADDED * size)), "removed": max(1, round(REMOVED * size)),
            "changed": max(1, round(CHANGED * size))}


def plan_change(names: list[str], pool: list[Path], counts: dict[str, int], seed: int) -> Change:
    """A seeded change of the catalog whose entries are `names`: additions and overwrite sources from `pool`."""
    need = counts["added"] + counts["changed"]
    if len(pool) < need or len(names) <= counts["removed"] + counts["changed"]:
        raise SystemExit(f"a change of {counts} needs {need} pool images and more than "
                         f"{counts['removed'] + counts['changed']} entries; have {len(pool)} and {len(names)}")
    rng = np.random.default_rng(seed)
    picked = [pool[i] for i in rng.choice(len(pool), size=need, replace=False)]
    touched = [names[i] for i in rng.choice(len(names), size=counts["removed"] + counts["changed"], replace=False)]
    return Change(tuple(picked[:counts["added"]]), tuple(touched[:counts["removed"]]),
                  tuple(zip(touched[counts["removed"]:], picked[counts["added"]:])))


def make_catalog(folder: Path, images: list[Path]) -> None:
    """A fresh folder of symlinks, one per image, under the image's own name."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for image in images:
        os.symlink(image, folder / image.name)


def apply_change(folder: Path, change: Change) -> None:
    for image in change.added:
        os.symlink(image, folder / image.name)
    for name in change.removed:
        (folder / name).unlink()
    for name, source in change.changed:
        write_bytes_atomic(folder / name, source.read_bytes())  # a file with new bytes replaces the symlink


# --- the stage calls -----------------------------------------------------------------------------------------

class EmbedMarks(logging.Handler):
    """Wall-clock times of run_embed's log record that ends its preparation (the plan of what to embed)."""

    PLAN = "snapshot %s of catalog"

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.planned: list[float] = []
        self.logger = logging.getLogger(run_embed.__module__)

    def __enter__(self) -> EmbedMarks:
        self.level_before = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *_: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith(self.PLAN):
            self.planned.append(record.created)


class OtherJobs:
    """CPU time of the processes outside this bench's process tree while the `with` block runs, sampled every
    SAMPLE_S from /proc (Linux). A process counts from its first sample to its last, so the last second of one
    that ends and all of one shorter than a sample are missed; a descendant of this process stays ours after it
    is reparented (Ray's workers outlive their raylet for a moment at shutdown)."""

    def __init__(self) -> None:
        self.mine: set[int] = set()
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.seconds = 0.0  # wall time of the block
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> OtherJobs:
        self._started = time.perf_counter()
        self._sample(initial=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(initial=False)
        self.seconds = time.perf_counter() - self._started

    @property
    def cores(self) -> float:
        """Their CPU seconds per second of the block."""
        ticks = sum(self.last[pid] - self.first[pid] for pid in self.last)
        return ticks / os.sysconf("SC_CLK_TCK") / self.seconds if self.seconds else 0.0

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample(initial=False)

    def _sample(self, initial: bool) -> None:
        parents, ticks = {}, {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()  # after "(comm)"
            except OSError:  # ended while we looked
                continue
            pid = int(entry.name)
            parents[pid], ticks[pid] = int(fields[1]), int(fields[11]) + int(fields[12])  # ppid; utime + stime
        children = defaultdict(list)
        for pid, parent in parents.items():
            children[parent].append(pid)
        stack = [os.getpid()]
        while stack:
            pid = stack.pop()
            self.mine.add(pid)
            stack.extend(children.get(pid, ()))
        for pid, used in ticks.items():
            if pid not in self.mine:
                self.first.setdefault(pid, used if initial else 0)  # one first seen later started in the block
                self.last[pid] = used


def timed(call: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = call(*args)
    return result, time.perf_counter() - started


def run_stages(config: EmbedConfig, queries: Queries, indexes: Path, min_recall: float,
               max_fraction: float) -> dict[str, Any]:
    """The five calls of a full build or a refresh, each timed, with the other processes' CPU during each;
    run_embed split by its own records."""
    seconds, others, begun = {}, {}, {}

    def step(name: str, call: Callable[..., Any], *args: Any) -> Any:
        with OtherJobs() as jobs:  # its samples at entry and exit lie outside the timed call
            begun[name] = time.time()  # wall clock, as log records have it
            result, seconds[name] = timed(call, *args)
        others[name] = jobs.cores
        return result

    with EmbedMarks() as marks:
        snapshot_dir = step("run_embed", run_embed, config)
    if len(marks.planned) != 1:
        raise RuntimeError(f"run_embed logged its plan {len(marks.planned)} times; expected once (a new snapshot)")
    last_run = shards.read_manifest(snapshot_dir)["last_run"]
    prepare = marks.planned[0] - begun["run_embed"]
    embed = last_run["seconds"]
    phases = {"prepare": prepare, "embed": embed, "finish": seconds["run_embed"] - prepare - embed}
    run = step("open_snapshot", shards.open_snapshot, snapshot_dir)
    published = follow_current(indexes / config.catalog.name, index_store.IndexFormatError)  # as the flow finds it
    index_dir = step("build_or_refresh", build_or_refresh, run, queries, indexes, IndexConfig(), published,
                     max_fraction)
    validation = step("validate_index", validate_index, index_dir, run, queries, min_recall)
    if not validation.passed:
        raise RuntimeError(f"validation refused {index_dir}: {'; '.join(validation.problems)}")
    step("publish", publish, index_dir)
    index = index_store.read_manifest(index_dir)
    total = sum(seconds.values())
    return {"snapshot_dir": str(snapshot_dir), "index_dir": str(index_dir), "bundle_id": run.bundle_id,
            "seconds": seconds, "total": total, "phases": phases, "last_run": last_run,
            "others": others, "others_cores": sum(others[k] * seconds[k] for k in seconds) / total,
            "delta": shards.read_manifest(snapshot_dir)["delta"], "rows": run.rows, "shards": len(run.shard_files),
            "index": {"type": index["type"], "params": index["params"], "search": index["search"],
                      "build_seconds": index["build_seconds"], "recall": index["recall"]["held_out"],
                      "overlay": index.get("overlay")},
            "validation": validation.as_dict()}


# --- checks and parts measured apart -------------------------------------------------------------------------

def vectors_by_id(snapshot_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids sorted, their vectors as raw uint32 bits: compared byte for byte)."""
    ids, vectors, _ = shards.open_snapshot(snapshot_dir).read_all()
    order = np.argsort(ids)
    return ids[order], vectors[order].view(np.uint32)


def check_refresh(full: dict[str, Any], refresh: dict[str, Any], change: Change,
                  catalog: CatalogConfig) -> dict[str, Any]:
    """The refresh's checks (module docstring); raises RuntimeError naming the first that fails."""
    def require(ok: bool, what: str) -> None:
        if not ok:
            raise RuntimeError(f"refresh check failed: {what}")

    counts, delta, last_run = change.counts(), refresh["delta"], refresh["last_run"]
    require({k: delta[k] for k in counts} == counts, f"delta {delta} != the change {counts}")
    require(last_run["entries"] == counts["added"] + counts["changed"],
            f"{last_run['entries']} images encoded, expected added + changed = {counts['added'] + counts['changed']}")
    snapshot_dir = Path(refresh["snapshot_dir"])
    catalog_ids = load_catalog(catalog).column("id").to_numpy()
    errors = pq.read_table(snapshot_dir / shards.ERRORS, columns=["id"]).column("id").to_numpy()
    expected = np.setdiff1d(catalog_ids, errors)
    index_ids = served_ids(Path(refresh["index_dir"]))
    require(np.array_equal(index_ids, expected), f"the index answers with {len(index_ids)} ids, the catalog minus "
            f"its errors rows has {len(expected)} ({len(np.setdiff1d(expected, index_ids))} missing, "
            f"{len(np.setdiff1d(index_ids, expected))} stale)")
    overlay = refresh["index"]["overlay"]
    if overlay:  # on the full run's index, built from the snapshot the change was made against
        index_dir = Path(refresh["index_dir"])
        manifest = index_store.read_manifest(index_dir)
        delta = delta_ids(index_dir, manifest)
        dead = index_store.read_dead(index_dir, manifest)
        want_delta = np.array(sorted(change.ids("added") | change.ids("changed")), np.int64)
        want_dead = np.array(sorted(change.ids("changed") | change.ids("removed")), np.int64)
        require(np.array_equal(delta, want_delta) and np.array_equal(dead, want_dead),
                f"the overlay's {len(delta)} delta and {len(dead)} dead ids are not the change's {len(want_delta)} "
                f"added + overwritten and {len(want_dead)} overwritten + removed")
    old_ids, old = vectors_by_id(Path(full["snapshot_dir"]))
    new_ids, new = vectors_by_id(snapshot_dir)
    unchanged = np.setdiff1d(new_ids, np.array(sorted(change.ids("added") | change.ids("changed")), np.int64))
    require(np.isin(unchanged, old_ids).all(), "an unchanged id is missing from the full run")
    same = (old[np.searchsorted(old_ids, unchanged)] == new[np.searchsorted(new_ids, unchanged)]).all(axis=1)
    require(bool(same.all()), f"{int((~same).sum())} of {len(unchanged)} unchanged vectors differ from the full run's")
    changed = np.array(sorted(change.ids("changed")), np.int64)
    moved = (old[np.searchsorted(old_ids, changed)] != new[np.searchsorted(new_ids, changed)]).any(axis=1)
    return {"encoded": last_run["entries"], "embedded_by": last_run["embedded_by"], "catalog": len(catalog_ids),
            "errors": len(errors), "index_ids": len(index_ids), "unchanged_identical": int(same.sum()),
            "changed_moved": int(moved.sum()), "changed": len(changed)}


def served_ids(index_dir: Path) -> np.ndarray:
    """Sorted ids an index answers with: its base's (uris.parquet of a full build), for an overlay the base's minus
    the dead ones plus the delta's (what search merges)."""
    manifest = index_store.read_manifest(index_dir)
    base = index_store.read_base_ids(index_dir, manifest)
    if not manifest.get("overlay"):
        return np.sort(base)
    return np.union1d(np.setdiff1d(base, index_store.read_dead(index_dir, manifest)), delta_ids(index_dir, manifest))


def delta_ids(index_dir: Path, manifest: dict[str, Any]) -> np.ndarray:
    """Sorted ids of an overlay's delta index."""
    delta = index_store.open_delta(index_dir, manifest)  # held: id_map points into it
    return np.sort(faiss.vector_to_array(delta.id_map))


def measure_apart(catalog: CatalogConfig, bundle: Path, batch_size: int, change: Change, folder: Path,
                  refresh: dict[str, Any], queries: Queries, indexes: Path) -> dict[str, Any]:
    """After the refresh, on the same files: a listing + stat of the catalog alone (load_catalog), the same
    system calls alone (os.scandir, os.stat per entry: what the listing cannot go below), each the median of
    APART_REPEATS; encoding the delta's images alone with the job's in-process code (ImageEmbedder with one
    thread per CPU, as indexing/embedding/job.py runs it); and a full rebuild of the refreshed snapshot (build_index, unpublished),
    what the refresh's index step costs without an overlay."""
    listings = [timed(load_catalog, catalog) for _ in range(APART_REPEATS)]
    table, listing = listings[0][0], statistics.median(s for _, s in listings)
    syscalls = statistics.median(timed(stat_entries, folder)[1] for _ in range(APART_REPEATS))
    names = [p.name for p in change.added] + [name for name, _ in change.changed]
    uris = np.array([str(folder.resolve() / name) for name in names], dtype=object)
    ids = np.array([stable_id(name) for name in names], np.int64)
    started = time.perf_counter()
    embedder = ImageEmbedder(str(bundle), "cpu", False, os.cpu_count() or 1)
    for lo in range(0, len(uris), batch_size):
        batch = {"id": ids[lo:lo + batch_size], "uri": uris[lo:lo + batch_size]}
        embedder(decode_batch(batch, embedder.preprocess))
    encode = time.perf_counter() - started
    with OtherJobs() as others:
        rebuilt, rebuild = timed(build_index, shards.open_snapshot(Path(refresh["snapshot_dir"])), queries, indexes,
                                 IndexConfig())
    return {"entries": table.num_rows, "listing": listing, "syscalls": syscalls, "images": len(uris),
            "encode": encode, "rebuild": rebuild, "rebuild_others": others.cores,
            "rebuild_seconds": index_store.read_manifest(rebuilt)["build_seconds"]}


def stat_entries(folder: Path) -> int:
    """os.stat (following symlinks, as a version does) of every entry of a flat folder; returns the count."""
    count = 0
    with os.scandir(folder) as listing:
        for entry in listing:
            os.stat(entry.path)
            count += 1
    return count


# --- the catalog flow ----------------------------------------------------------------------------------------

class TaskMarks(logging.Handler):
    """(task name, wall-clock time) of each "Finished in state" record of Prefect's task-run logger."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.finished: list[tuple[str, float]] = []
        self.logger = logging.getLogger("prefect.task_runs")

    def __enter__(self) -> TaskMarks:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *_: object) -> None:
        self.logger.removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Finished in state "):
            state = message.removeprefix("Finished in state ").split("(")[0]
            name = getattr(record, "task_name", "?")
            self.finished.append((name if state == "Completed" else f"{name} ({state.lower()})", record.created))


def run_flow(overrides: list[str]) -> dict[str, Any]:
    """One run of the catalog flow, timed, with the time each task took since the previous one finished."""
    from cirflow.flows.catalog_flow import catalog

    load = os.getloadavg()[0]
    with OtherJobs() as others, TaskMarks() as marks:
        started = time.time()
        result = catalog(overrides=overrides)
        ended = time.time()
    tasks, previous = [], started
    for name, at in marks.finished:
        tasks.append([name, at - previous])
        previous = at
    return {"load": load, "others_cores": others.cores, "seconds": ended - started, "tasks": tasks,
            "after_tasks": ended - previous, "delta": result["delta"], "encoded": result["encoded"],
            "validation": result["validation"],
            "overlay": index_store.read_manifest(Path(result["index_dir"])).get("overlay")}


# --- report --------------------------------------------------------------------------------------------------

def setting(run: dict[str, Any]) -> str:
    search = run["index"]["search"]
    return "exact" if search["param"] is None else f"{search['param']} {search['value']}"


def how_built(index: dict[str, Any]) -> str:
    overlay = index["overlay"]
    if not overlay:
        return f"{index['type']}, built from all vectors"
    return (f"{index['type']}, an overlay on {overlay['base']}: {overlay['delta']:,} delta vectors (exact), "
            f"{overlay['dead']:,} dead ids")


def parts(seconds: dict[str, float]) -> str:
    return " / ".join(f"{k} {v:.2f}" for k, v in seconds.items() if k != "total")


def render(args: argparse.Namespace, command: str, setup: dict[str, Any], full: dict[str, Any],
           refresh: dict[str, Any], checks: dict[str, Any], apart: dict[str, Any], flow: dict[str, Any] | None,
           cores: int) -> str:
    fs, rs = full["seconds"], refresh["seconds"]
    ratio = refresh["total"] / full["total"]
    counts = setup["change"]
    share = sum(counts.values()) / setup["size"]
    others = [("full", full["others_cores"]), ("refresh", refresh["others_cores"])]
    others += [("rebuild measured apart", apart["rebuild_others"])]
    others += [("flow", flow["others_cores"])] if flow else []
    busy = [name for name, c in others if c > BUSY_CORES]
    lines = [f"## Catalog refresh: {share:.2%} of a {setup['size']:,}-image catalog changed (CPU)", "",
             f"- date: {today()}; machine: {machine()}; faiss {faiss.__version__} ({faiss.omp_get_max_threads()} "
             "OpenMP threads)",
             f"- command: `{command}`",
             f"- bundle: {args.bundle} (bundle_id {setup['bundle_id']}, {setup['dim']} dims); data: {args.data}: "
             f"catalog = the first {setup['size']:,} of its {setup['train_images']:,} training images (sorted names), "
             f"symlinked into a fresh folder; queries = {setup['queries']:,} test-split composed queries (seeded "
             "sample) for both runs' tuning and validation, encoded before the runs",
             "- other processes' CPU while this bench measured (sampled each second from /proc, the bench's own "
             "processes left out; per step in the table): " + ", ".join(f"{name} {c:.2f}" for name, c in others)
             + f" cores of {cores} on average"
             + (f" (other jobs ran during: {', '.join(busy)}; those timings are skewed)" if busy else ""),
             "- method, choices and their reasons: the docstring of bench/refresh.py", "",
             f"Change (seed {SEED}): {counts['added']:,} added (symlinks to training images outside the catalog), "
             f"{counts['removed']:,} removed, {counts['changed']:,} overwritten (another image's bytes replace the "
             f"entry): {share:.2%} of the catalog, {checks['catalog']:,} entries after. Both runs make the same calls "
             "(run_embed, open_snapshot, build_or_refresh with the published version and the catalog flow's "
             f"index_delta_max {setup['max_fraction']}, validate_index, publish).",
             "", "| step | full s | refresh s | refresh / full | other processes' CPU, cores (full / refresh) |",
             "|---|---|---|---|---|"]

    def others_of(run: dict[str, Any], step: str) -> str:  # under a second: a few 10 ms ticks, mostly noise
        return f"{run['others'][step]:.2f}" if run["seconds"][step] >= 1.0 else "-"

    def row(label: str, a: float, b: float, step: str | None = None) -> str:
        cpu = f"{others_of(full, step)} / {others_of(refresh, step)}" if step else "-"
        return f"| {label} | {a:.2f} | {b:.2f} | {f'{b / a:.3f}' if a > 0 else '-'} | {cpu} |"

    fp, rp = full["phases"], refresh["phases"]
    fl, rl = full["last_run"], refresh["last_run"]
    ray_start = ", cluster start included" if fl["embedded_by"] == "ray" else ""
    lines += [row("run_embed", fs["run_embed"], rs["run_embed"], "run_embed"),
              row("&nbsp;&nbsp;prepare: bundle check, listing + stat, previous snapshot, reuse plan, catalog file",
                  fp["prepare"], rp["prepare"]),
              row(f"&nbsp;&nbsp;embed + write {full['shards']} shard(s) (full: {fl['entries']:,} images, "
                  f"{fl['embedded_by']}, {fl['actors']} actor(s){ray_start}; refresh: {rl['entries']:,} images, "
                  f"{rl['embedded_by']}, the other vectors copied)", fp["embed"], rp["embed"]),
              row("&nbsp;&nbsp;finish: errors table, manifest, CURRENT", fp["finish"], rp["finish"]),
              row("open_snapshot (sha256 of every shard)", fs["open_snapshot"], rs["open_snapshot"], "open_snapshot"),
              row(f"build_or_refresh (full: {how_built(full['index'])}; refresh: {how_built(refresh['index'])})",
                  fs["build_or_refresh"], rs["build_or_refresh"], "build_or_refresh"),
              f"| &nbsp;&nbsp;its parts (index manifest) | {parts(full['index']['build_seconds'])} | "
              f"{parts(refresh['index']['build_seconds'])} | - | - |",
              row("validate_index (exact truth over every vector, held-out queries)", fs["validate_index"],
                  rs["validate_index"], "validate_index"),
              row("publish", fs["publish"], rs["publish"], "publish"),
              f"| **total** | {full['total']:.2f} | {refresh['total']:.2f} | {ratio:.3f} | "
              f"{full['others_cores']:.2f} / {refresh['others_cores']:.2f} |", ""]
    met = ratio <= AIM_RATIO
    lines.append(f"Refresh / full (stage calls): **{ratio:.3f}** (aim <= {AIM_RATIO}: {'met' if met else 'NOT met'}).")
    ranked = sorted(STEPS, key=lambda s: -rs[s])
    rebuilt = (refresh["total"] - rs["build_or_refresh"] + apart["rebuild"]) / full["total"]
    lines += ["", "- refresh steps by time: " + ", ".join(f"{s} {rs[s]:.2f} s ({rs[s] / refresh['total']:.0%})"
                                                          for s in ranked[:3]),
              f"- the refresh's index step without an overlay: build_index on the refreshed snapshot, measured apart "
              f"after the refresh (unpublished), took {apart['rebuild']:.2f} s ({parts(apart['rebuild_seconds'])}); "
              f"with it the refresh would be {rebuilt:.3f} of the full run (arithmetic on measured parts)",
              f"- the refresh's run_embed, split: prepare {rp['prepare']:.2f} s, of which the catalog listing + stat "
              f"of {apart['entries']:,} entries ~{apart['listing']:.2f} s (load_catalog alone, median of "
              f"{APART_REPEATS}, measured apart after the refresh; the same os.scandir + os.stat system calls alone "
              f"take {apart['syscalls']:.2f} s: the rest is per-entry Python work); embed + write {rp['embed']:.2f} s, "
              f"of which encoding the {apart['images']:,} new and overwritten images ~{apart['encode']:.2f} s "
              "(measured apart: read, decode, ONNX Runtime session load, encoder), the rest reading and copying "
              f"the {checks['unchanged_identical']:,} reused vectors and writing {refresh['shards']} shard(s) with "
              "their sha256",
              f"- checks (the bench stops on a failure): {checks['encoded']:,} images encoded by the refresh = added + "
              f"overwritten ({checks['embedded_by']}); the new index answers with exactly the new catalog's "
              f"{checks['catalog']:,} ids minus its {checks['errors']} errors rows"
              + ("; its delta and dead ids are exactly the change's" if refresh["index"]["overlay"] else "")
              + f"; {checks['unchanged_identical']:,} unchanged vectors byte-identical to the full run's; "
              f"{checks['changed_moved']} of {checks['changed']} overwritten images got a new vector",
              f"- index: full {setting(full)}, recall@10 {full['validation']['recall@10']:.3f} re-measured by "
              f"validate_index; refresh {setting(refresh)}, recall@10 {refresh['validation']['recall@10']:.3f} "
              f"(floor {setup['min_recall']}, the catalog flow's)"]
    if not met:
        fixed = apart["listing"] + max(0.0, rp["embed"] - apart["encode"]) + rs["validate_index"]
        tune = refresh["index"]["build_seconds"].get("tune", 0.0)
        lines.append(f"- why not lower: parts of the refresh scale with the catalog, not with the change: the listing "
                     f"+ stat of every entry (~{apart['listing']:.2f} s), copying the reused vectors into the new "
                     f"snapshot's shards (~{max(0.0, rp['embed'] - apart['encode']):.2f} s), re-tuning ({tune:.2f} s) "
                     f"and validation ({rs['validate_index']:.2f} s), each of which computes its queries' exact top-k "
                     f"over every vector: {fixed + tune:.2f} s together, "
                     f"{(fixed + tune) / full['total']:.3f} of the full run on their own")
    if flow:
        f = flow
        tasks = "; ".join(f"{name} {s:.2f} s" for name, s in f["tasks"])
        overlay = f["overlay"]
        index = (f"an overlay ({overlay['delta']:,} delta vectors, {overlay['dead']:,} dead ids)" if overlay
                 else "built from all vectors")
        lines += ["", f"Through the Prefect catalog flow (a second seeded change: {f['delta']['added']} added, "
                  f"{f['delta']['removed']} removed, {f['delta']['changed']} overwritten; after an untimed warm-up "
                  f"run): **{f['seconds']:.2f} s** = {f['seconds'] / full['total']:.3f} of the full stage calls; "
                  f"{f['encoded']} images encoded; index {index}; recall@10 {f['validation']['recall@10']:.3f} "
                  f"re-measured. Its index is tuned and validated with the flow's own queries, all "
                  f"{setup['flow_queries']:,} of the val split ({setup['flow_queries'] / setup['queries']:.0f}x the "
                  f"stage calls' {setup['queries']:,}: the exact top-k and the efSearch sweep cost in proportion). "
                  "Per task, time since the previous one finished (the flow's own code between tasks counts with the "
                  f"next task: the artifacts and the tuning plot with publish_version): {tasks}; after the last task "
                  f"{f['after_tasks']:.2f} s. The warm-up run (Prefect's server start, the val queries encoded, an "
                  f"index built and tuned with them) took {setup['flow_warmup_s']:.1f} s."]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="model bundle (default: the registered one, workdir/bundles)")
    parser.add_argument("--data", type=Path, help="shapes dataset, generated when missing (default "
                        "workdir/bench/shapes-x4; --quick: WORKDIR/data/shapes-tiny)")
    parser.add_argument("--workdir", type=Path, help="default workdir/bench/refresh (--quick: "
                        "workdir/bench/refresh-quick); its catalog/, work/ and prefect/ are recreated")
    parser.add_argument("--doc", type=Path, help="default docs/benchmarks.md (--quick: WORKDIR/refresh-quick.md)")
    parser.add_argument("--size", type=int, help="catalog entries before the change (default 100000; --quick: "
                        f"the training images but {QUICK_POOL})")
    parser.add_argument("--queries", type=int, default=2000, help="test queries sampled for tuning and validation")
    parser.add_argument("--no-flow", action="store_true", help="skip the Prefect catalog flow part")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, numbers meaningless")
    args = parser.parse_args(argv)
    args.bundle = (args.bundle or default_bundle()).resolve()
    args.workdir = (args.workdir or Path("workdir/bench/refresh-quick" if args.quick
                                         else "workdir/bench/refresh")).resolve()
    args.data = (args.data or (args.workdir / "data" / "shapes-tiny" if args.quick
                               else Path("workdir/bench/shapes-x4"))).resolve()
    args.doc = args.doc or (args.workdir / "refresh-quick.md" if args.quick else DOC)
    if (args.size is not None and args.size <= 0) or args.queries < 2:
        raise SystemExit(f"--size must be positive and --queries >= 2; got {args.size}, {args.queries}")
    return args


def sample_queries(bundle: Path, data: Path, count: int, cores: int) -> Queries:
    """A seeded sample of `count` test-split composed queries (as bench/indexing.py draws them)."""
    runtime = BundleRuntime.load(bundle, providers="cpu", intra_op_threads=cores)
    queries = encode_query_split(runtime, "shapes", data, "test")
    return queries.take(np.sort(np.random.default_rng(SEED).permutation(len(queries.vectors))[:count]))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # EmbedMarks lowers one logger to INFO: keep the console quiet
        handler.setLevel(logging.WARNING)
    command = shlex.join([".venv/bin/python", "bench/refresh.py", *(sys.argv[1:] if argv is None else argv)])
    cores = len(os.sched_getaffinity(0))
    say = progress()
    warn_if_busy(say, args.quick)
    if not (args.data / SHAPES_MANIFEST).exists():
        say(f"generating the shapes dataset in {args.data} ...")
        generate_shapes(QUICK_DATA if args.quick else FULL_DATA, args.data)
    info = read_json(args.data / SHAPES_MANIFEST)
    train = sorted((args.data / info["splits"]["train"]["image_dir"]).iterdir())
    size = args.size or (len(train) - QUICK_POOL if args.quick else 100_000)
    if size >= len(train):
        raise SystemExit(f"--size {size}: the data has {len(train)} training images; some must stay out as the pool")
    images, pool = train[:size], train[size:]

    folder, work, prefect_home = args.workdir / "catalog", args.workdir / "work", args.workdir / "prefect"
    for path in (work, prefect_home):
        shutil.rmtree(path, ignore_errors=True)
    os.environ.update(PREFECT_ENV, PREFECT_HOME=str(prefect_home))  # read when the flow part imports Prefect
    say(f"making the catalog: {size:,} symlinks in {folder} ...")
    make_catalog(folder, images)
    catalog = CatalogConfig(name=f"{args.data.name}-refresh", folder=str(folder))
    config = EmbedConfig(catalog=catalog, bundle=str(args.bundle), workdir=str(work))
    from cirflow.flows.catalog_flow import CatalogFlowConfig  # after PREFECT_HOME is set

    min_recall, max_fraction = CatalogFlowConfig().min_recall, CatalogFlowConfig().index_delta_max
    say(f"encoding the test split's queries ({args.queries:,} sampled) ...")
    queries = sample_queries(args.bundle, args.data, args.queries, cores)

    say("full: embed everything, build, validate, publish ...")
    full = run_stages(config, queries, work / "indexes", min_recall, max_fraction)
    say(f"full: {full['total']:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in full['seconds'].items())})")
    change = plan_change(sorted(p.name for p in images), pool, change_counts(size), SEED)
    apply_change(folder, change)
    say(f"changed the catalog: {change.counts()}; refresh ...")
    refresh = run_stages(config, queries, work / "indexes", min_recall, max_fraction)
    say(f"refresh: {refresh['total']:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in refresh['seconds'].items())}); "
        f"ratio {refresh['total'] / full['total']:.3f}")
    checks = check_refresh(full, refresh, change, catalog)
    apart = measure_apart(catalog, args.bundle, config.batch_size, change, folder, refresh, queries, work / "indexes")
    say(f"checks passed: {checks}; measured apart: {apart}")

    setup = {"size": size, "train_images": len(train), "change": change.counts(), "bundle_id": full["bundle_id"],
             "dim": queries.vectors.shape[1], "queries": len(queries.vectors), "min_recall": min_recall,
             "max_fraction": max_fraction}
    flow = None
    if not args.no_flow:
        overrides = [f"embed.catalog.name={catalog.name}", f"embed.catalog.folder={folder}",
                     f"embed.bundle={args.bundle}", f"embed.workdir={work}", "queries.kind=shapes",
                     f"queries.root={args.data}", "queries.split=val"]
        say("flow: warm-up run (Prefect server start, val queries, their index) ...")
        warmup = run_flow(overrides)
        second = plan_change(sorted(p.name for p in folder.iterdir()), sorted(set(pool) - change.used()),
                             change_counts(size), SEED + 1)
        apply_change(folder, second)
        say(f"flow: warm-up {warmup['seconds']:.1f} s; changed the catalog again: {second.counts()}; timed run ...")
        flow = run_flow(overrides)
        if flow["encoded"] != second.counts()["added"] + second.counts()["changed"]:
            raise RuntimeError(f"the flow encoded {flow['encoded']} images; expected added + changed of "
                               f"{second.counts()}")
        setup["flow_warmup_s"] = warmup["seconds"]
        setup["flow_queries"] = info["splits"]["val"]["queries"]
        say(f"flow: {flow['seconds']:.1f} s ({flow['seconds'] / full['total']:.3f} of the full run)")

    results = {"setup": setup, "full": full, "refresh": refresh, "checks": checks, "apart": apart, "flow": flow}
    write_json_atomic(args.workdir / "refresh-results.json", results)
    body = render(args, command, setup, full, refresh, checks, apart, flow, cores)
    write_section("refresh", body, args.doc)
    print(body)
    say(f"wrote the refresh section to {args.doc}")


if __name__ == "__main__":
    main()

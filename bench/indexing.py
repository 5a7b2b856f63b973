"""Catalog embedding (Ray job vs a plain ONNX Runtime loop) and FAISS index build and search, per index type.

    .venv/bin/python bench/indexing.py [--bundle DIR] [--data workdir/bench/shapes-x4]
        [--workdir workdir/bench/indexing] [--doc docs/benchmarks.md] [--sizes 100000 1000000]
        [--types flat hnsw ivf_flat ivf_pq] [--queries 2000] [--ef-construction 80]
    .venv/bin/python bench/indexing.py --quick [--bundle DIR] [--workdir DIR] [--doc PATH]   # smoke, < 1 min
    .venv/bin/python bench/indexing.py --scale [--sizes 10000000] [--dims 128 512] [--budget-mb 16384]

--scale runs part 3 instead of part 2: the planner's index at millions of vectors within a memory budget, in
128 and 512 dimensions (bench/index_scale.py says how; about 90 minutes at 10M on 2 cores, 60 GB of disk), into
its own section of the doc.

--bundle defaults to the registered bundle, workdir/bundles/CURRENT (the demo registers its trained one); --data to
a shapes dataset at scale 4 (~106k training images, 8k test queries), generated when the folder has no
dataset yet; a folder that holds one is used as it is. About 16 minutes on 2 quiet cores, 13 once the data
exists (an estimate per part is printed at the start).

Part 1, embedding: the training images of the data are the catalog (all of them, >= 20k, so that the same run
also gives the >= 100k real vectors of part 2). First a plain single-process loop: read, decode and resize with
the job's own function (indexing.embed_stages.read_image), batches of 64 through BundleRuntime.encode_images,
ONNX Runtime with one intra-op thread per core. Then the Ray job (indexing.embed.run_embed, default actor
settings) on a fresh local Ray cluster with one CPU per core, in a fresh workdir; one after the other, never
side by side. Its images/s come from the job's own timing (manifest "last_run": after the cluster is up, actor
start included); the wall time adds ray.init and listing the catalog. Peak memory is the
largest sum of PSS (proportional set size: shared pages split among the processes sharing them, so the Ray
workers' shared libraries and object store are counted once) over the bench process and all its descendants
(the Ray cluster's processes are children of the driver), sampled every second from /proc (Linux; psutil is not
among the dependencies; a sample costs ~40 ms of CPU with Ray's 13 processes, so denser sampling would slow the
job it measures). The driver's own memory is its PSS peak above its PSS when the job starts (the bench's earlier
data aside), measured for the whole catalog and for its first quarter (a manifest catalog): the workers write
the shards, so it must not grow with the catalog. Resume: the last two shards are taken out of the finished run's manifest (complete
false, their files deleted), exactly the state a kill leaves, and the job is rerun on a fresh cluster; the
resumed run must list the same ids. The plain loop's vectors are compared with the job's (max abs diff).

Part 2, index and search, for each size and index type. Queries are real composed queries, the test split's,
encoded by indexing.queries.encode_query_split with their reference images; a seeded sample of --queries of them
(the exact ground truth, the Flat searches and IVF-PQ's tuning sweep cost time in proportion to the queries: 2000
keep the 1M builds within the budget and still leave about 1000 held-out queries, a standard error of ~0.003 on
recall near 0.95). build_index gets them as its `queries`: it splits them (seeded) into tuning and held-out halves
by reference image (all queries of one reference on one side), leaves each query's reference out of the exact
top-10 and of the index's results where the catalog holds it (as search does; the test split's references are
not among the training images, so here none is), and records the held-out recall@10 and how the split was made;
the report gives both. The catalog of size N: the first min(N, smallest size) real vectors of part 1's run (id
order, i.e. a random sample of the images), then noisy copies of them until N:
v' = normalize(v + n), n ~ N(0, s^2 I), s = r / sqrt(D), where r is the median distance of a real vector to its
nearest real neighbour (2000 sampled): a copy lies about as far from its source as a real image from its nearest
neighbour, so the copies neither duplicate their source (tie-ridden recall) nor scatter into noise (no neighbour
structure), and the local density grows with N as a larger catalog of the same images would. Copy 0 is the real
vectors themselves, so each catalog contains the smaller ones. Copies get ids stable_id("<id>/<copy>"), written as
an embedding snapshot (indexing.shards, one shard per copy) that build_index streams. Every type gets its own default
parameters (IndexConfig; memory budget large enough to decide nothing, so IVF-PQ gets dim/2 sub-quantizers). The
index is then loaded as served (VectorIndex.load: memory-mapped, tuned setting applied) and timed:
- single-query search latency p50/p99 (one query per call, after a warm-up), with faiss at 1 thread and at
  faiss's default, one OpenMP thread per core (OpenMP's default unless OMP_NUM_THREADS says otherwise). faiss
  splits Flat, IVF and HNSW search across threads by query, so a single query gains nothing from more: 1
  thread is how a service runs single queries, and the second figure shows what the extra OpenMP threads cost
  one (on busy cores up to a scheduler tick, 4-8 ms: seen here under load). 200 queries, fewer where one query
  is slow (Flat at 1M: ~50 ms expected) to keep each measurement near 10 s, never fewer than 50 (counted in
  the table).
- batch QPS: all sampled queries in one call, best of 3, one faiss thread per core (as for the build).
- encode+search p50/p99: Searcher.search(reference image file, caption, k=10) on 200 test queries, faiss at 1
  thread and ONNX Runtime at one thread per core: decoding, preprocessing, tokenising, the query encoder and
  the search, as a service runs them.
The aim (1M vectors on 2 cores: recall@10 >= 0.95, search p50 <= 2 ms, encode+search p50 <= 5 ms) is checked
per type at the largest size, from the numbers (search at 1 thread).

Resuming: part 1's numbers are kept in the workdir with its run and reused (delete
WORKDIR/embedding-*.json to measure again); the synthetic catalogs are named by their recipe and reused when
complete; build_index returns an existing index for identical inputs (its build times are then the recorded
ones, marked "reused"). Latencies are measured afresh every time. --quick embeds a tiny generated dataset (the
test suites' tiny_shapes), indexes 2000 and 10000 vectors on one faiss thread (main() says why), times fewer
queries, and writes to WORKDIR/indexing-quick.md unless --doc is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import faiss
import numpy as np
import pyarrow.csv as pacsv
from index_scale import render as render_scale
from index_scale import run_scale
from report import DOC, default_bundle, machine, today, write_section

from cirflow.core.files import read_json, write_json_atomic
from cirflow.export.runtime import BundleRuntime
from cirflow.indexing.embedding import shards
from cirflow.indexing.embedding.catalog import CatalogConfig, load_catalog, stable_id
from cirflow.indexing.embedding.embed_stages import read_image
from cirflow.indexing.embedding.job import EmbedConfig
from cirflow.indexing.embedding.shards import EmbeddingSnapshot
from cirflow.indexing.index.build import build_index, index_id, tune_index
from cirflow.indexing.index.plan import INDEX_TYPES, IndexConfig, plan_index
from cirflow.indexing.index.queries import Queries, encode_query_split
from cirflow.indexing.search import Searcher, VectorIndex
from cirflow.indexing.search.index_store import verify_index
from cirflow.models.data.loaders import load_split
from cirflow.models.data.shapes import MANIFEST as SHAPES_MANIFEST
from cirflow.models.data.shapes import ShapesConfig, generate_shapes
from cirflow.models.preprocess import normalize_uint8

K = 10
SEED = 0
FULL_DATA = ShapesConfig(scale=4)  # ~106k training images: >= 100k real vectors for part 2
QUICK_DATA = ShapesConfig(seed=0, train_triplets=160, val_queries=40, test_queries=40, workers=1)  # tiny_shapes
QUICK_ROWS_PER_SHARD = 64  # several shards from ~240 images, so that the resume has shards to redo
RESUME_SHARDS = 2  # shards a simulated kill leaves unfinished
DRIVER_SAMPLE_S = 0.05
SMALL_CATALOG_FRACTION = 4  # the driver's memory is also measured on this fraction of the catalog
NN_SAMPLE = 2000  # real vectors whose nearest-neighbour distance sets the noise scale
DEGENERATE_NN = 1e-3  # a median nearest-neighbour distance below this: the vectors have no spread to copy
# Above every type's size at 1M (Flat 520 MB, HNSW ~800 MB): the budget decides nothing, each type gets its
# defaults, and IVF-PQ the most sub-quantizers (dim/2).
MEMORY_BUDGET_MB = 65536.0
SINGLE_QUERIES, ENCODE_QUERIES, WARMUP = 200, 200, 20
QUICK_SINGLE_QUERIES, QUICK_ENCODE_QUERIES, QUICK_WARMUP = 30, 20, 3
MIN_SINGLE_QUERIES, SINGLE_BUDGET_S = 50, 10.0  # slow indexes: fewer single queries, but never under 50
BATCH_REPEATS = 3
MEMORY_SAMPLE_S = 1.0  # one sample reads smaps of every process: ~40 ms of CPU with a Ray cluster up
AIM = {"recall": 0.95, "search_p50_ms": 2.0, "encode_search_p50_ms": 5.0, "size": 1_000_000, "cores": 2}
# For the printed estimate only, on 2 quiet cores: extrapolated from CPU times measured here under load (2026-11,
# AMD EPYC: an 8k-image plain loop, 50k-200k HNSW and IVF builds); index seconds are per million vectors, build +
# tuning + timing (HNSW at efConstruction EST_EF_CONSTRUCTION, scaled linearly with it).
EST_RENDER_PER_S, EST_PLAIN_PER_S, EST_RAY_PER_S, EST_RAY_START_S = 900.0, 1400.0, 1800.0, 15.0
IMAGES_PER_QUERY = 1.33  # shapes: 26,538 training images for 20,000 training queries (scale 1)
EST_INDEX_S_PER_M = {"flat": 90.0, "hnsw": 240.0, "hnsw_sq": 300.0, "ivf_flat": 70.0, "ivf_pq": 100.0,
                     "ivf_pq_rerank": 120.0}
# --scale: catalog, build, ground truth and tuning per million vectors and dimension (a guess before the first
# 10M run; k-means and assignment grow with the dimension)
EST_SCALE_S_PER_M_DIM = 1.0
EST_EF_CONSTRUCTION = 80
EST_INDEX_FIXED_S = 10.0  # per index: loading, warm-ups, encode+search


# --- memory ------------------------------------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc/*/stat parent links."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        found.append(stack.pop())
        stack.extend(children.get(found[-1], []))
    return found


def pss_mb(pid: int) -> float:
    """Proportional set size of one process (0 if it has ended)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PeakMemory:
    """Samples the summed PSS of this process tree in a thread while the `with` block runs."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self.processes = 0  # tree size at the peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            pids = descendants(os.getpid())
            total = sum(pss_mb(p) for p in pids)
            if total > self.peak_mb:
                self.peak_mb, self.processes = total, len(pids)
            if self._stop.wait(MEMORY_SAMPLE_S):
                return


# --- part 1: embedding -------------------------------------------------------------------------------------

def embed_plain(bundle: Path, uris: list[str], threads: int, batch: int) -> np.ndarray:
    """(N, D) vectors of `uris` in order: one process reads, decodes and encodes batch after batch."""
    runtime = BundleRuntime.load(bundle, providers="cpu", intra_op_threads=threads)
    pre = runtime.preprocess
    parts = []
    for start in range(0, len(uris), batch):
        pixels = np.stack([read_image(uri, pre) for uri in uris[start:start + batch]])  # (B, H, W, 3) uint8
        parts.append(runtime.encode_images(normalize_uint8(pixels, pre)))
    return np.concatenate(parts)


def embed_with_ray(config: EmbedConfig, cores: int) -> dict[str, Any]:
    """The job as a user runs it: `cirflow embed` in a process of its own (the driver), which starts a local Ray
    instance of `cores` CPUs and stops it at the end; wall seconds and the driver's peak PSS (sampled every
    DRIVER_SAMPLE_S: one process's PSS costs little to read)."""
    catalog = config.catalog
    source = f"catalog.folder={catalog.folder}" if catalog.folder else f"catalog.manifest={catalog.manifest}"
    command = [sys.executable, "-m", "cirflow.flows.cli", "--log-level", "WARNING", "embed",
               f"catalog.name={catalog.name}", source, f"bundle={config.bundle}", f"workdir={config.workdir}",
               f"rows_per_shard={config.rows_per_shard}", f"ray.num_cpus={cores}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a new local instance, as bench's own
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], pss_mb(proc.pid))
            time.sleep(DRIVER_SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    wall = time.perf_counter() - started
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{shlex.join(command)} failed ({proc.returncode}):\n{output[-3000:]}")
    return {"snapshot_dir": output.strip().splitlines()[-1], "wall_s": wall, "driver_mb": peak[0]}


def first_entries(catalog: CatalogConfig, table: Any, count: int, path: Path) -> CatalogConfig:
    """A manifest catalog of the first `count` entries (id order) of `table` (load_catalog's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(table.slice(0, count).select(["id", "uri", "version"]), path)
    return CatalogConfig(name=f"{catalog.name}-first-{count}", manifest=str(path))


def simulate_kill(snapshot_dir: Path, count: int) -> int:
    """Leave the run as a kill does: its last `count` shards unfinished (files gone, not in the manifest).
    Returns the rows taken out."""
    manifest = shards.read_manifest(snapshot_dir)
    assert manifest is not None and manifest["complete"]
    removed = 0
    for name in sorted(manifest["shards"])[-count:]:
        removed += manifest["shards"].pop(name)["rows"]
        (snapshot_dir / name).unlink()
        (snapshot_dir / shards.SHARD_ERRORS_DIR / name).unlink(missing_ok=True)
    manifest["rows"] = sum(s["rows"] for s in manifest["shards"].values())
    manifest["errors"] = sum(s["errors"] for s in manifest["shards"].values())
    manifest["complete"] = False
    shards.write_manifest(snapshot_dir, manifest)
    return removed


def measure_embedding(bundle: Path, catalog: CatalogConfig, workdir: Path, cores: int,
                      rows_per_shard: int) -> dict[str, Any]:
    """Part 1 in a fresh job workdir: the plain loop, the Ray job, then a resume after a simulated kill."""
    shutil.rmtree(workdir, ignore_errors=True)
    config = EmbedConfig(catalog=catalog, bundle=str(bundle), workdir=str(workdir), rows_per_shard=rows_per_shard)
    table = load_catalog(catalog)
    uris = table.column("uri").to_pylist()

    print(f"part 1: plain ORT loop over {len(uris):,} images ...", flush=True)
    with PeakMemory() as memory:
        started = time.perf_counter()
        plain = embed_plain(bundle, uris, cores, config.batch_size)
        plain_s = time.perf_counter() - started
    result: dict[str, Any] = {"images": len(uris), "batch": config.batch_size, "rows_per_shard": rows_per_shard,
                              "plain": {"seconds": plain_s, "images_per_s": len(uris) / plain_s,
                                        "peak_mb": memory.peak_mb, "processes": memory.processes}}
    print(f"  {len(uris) / plain_s:.0f} images/s", flush=True)

    print("part 1: Ray job ...", flush=True)
    with PeakMemory() as memory:
        ray_run = embed_with_ray(config, cores)
    snapshot_dir = Path(ray_run["snapshot_dir"])
    run = shards.open_snapshot(snapshot_dir)
    last = run.manifest["last_run"]
    ids, vectors, _ = run.read_all()
    if not np.array_equal(ids, table.column("id").to_numpy()):
        raise RuntimeError(f"{snapshot_dir}: the job's ids differ from the catalog's ({run.manifest['errors']} errors)")
    result["ray"] = {**ray_run, "seconds": last["seconds"], "images_per_s": last["entries_per_s"],
                     "peak_mb": memory.peak_mb, "processes": memory.processes, "shards": run.manifest["num_shards"],
                     "actors": last["actors"], "max_abs_diff": float(np.abs(vectors - plain).max())}
    print(f"  {last['entries_per_s']:.0f} images/s (job), {ray_run['wall_s']:.1f} s wall, driver peak "
          f"{ray_run['driver_mb']:.0f} MB", flush=True)

    part = max(1, len(uris) // SMALL_CATALOG_FRACTION)
    print(f"part 1: Ray job on the first {part:,} images (the driver's memory against the catalog's size) ...",
          flush=True)
    small = first_entries(catalog, table, part, workdir / "small-catalog.csv")
    small_run = embed_with_ray(replace(config, catalog=small), cores)
    small_last = shards.read_manifest(Path(small_run["snapshot_dir"]))["last_run"]
    result["small"] = {**small_run, "images": part, "seconds": small_last["seconds"],
                       "images_per_s": small_last["entries_per_s"]}
    print(f"  driver peak {small_run['driver_mb']:.0f} MB", flush=True)

    print(f"part 1: resume after a simulated kill ({RESUME_SHARDS} shards unfinished) ...", flush=True)
    removed = simulate_kill(snapshot_dir, RESUME_SHARDS)
    with PeakMemory() as memory:
        resumed = embed_with_ray(config, cores)
    run = shards.open_snapshot(snapshot_dir)
    result["resume"] = {**resumed, "shards": RESUME_SHARDS, "rows": removed, "peak_mb": memory.peak_mb,
                        "processes": memory.processes, "seconds": run.manifest["last_run"]["seconds"],
                        "same_ids": bool(np.array_equal(run.read_all()[0], ids))}
    print(f"  {resumed['wall_s']:.1f} s wall, same ids: {result['resume']['same_ids']}", flush=True)
    return result


# --- part 2: catalogs of N vectors ---------------------------------------------------------------------------

def median_nn_distance(vectors: np.ndarray, sample: int, seed: int) -> float:
    """Median Euclidean distance from a seeded sample of unit `vectors` to their nearest other vector."""
    rows = np.random.default_rng(seed).choice(len(vectors), size=min(sample, len(vectors)), replace=False)
    scores, _ = faiss.knn(vectors[rows], vectors, 2, metric=faiss.METRIC_INNER_PRODUCT)  # [:, 0] is itself
    return float(np.median(np.sqrt(np.maximum(0.0, 2.0 - 2.0 * scores[:, 1]))))


def noisy_copies(ids: np.ndarray, vectors: np.ndarray, uris: list[str], size: int, scale: float,
                 seed: int) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """(ids, vectors, uris) of copy 0 (the vectors themselves), 1, 2, ... until `size` rows in all; copy c adds
    seeded N(0, scale^2 I) noise and renormalises. Copy c is the same whatever `size` asks for."""
    for copy in range(math.ceil(size / len(ids))):
        rows = min(len(ids), size - copy * len(ids))
        if copy == 0:
            yield ids[:rows], vectors[:rows], uris[:rows]
            continue
        noisy = vectors[:rows] + np.random.default_rng([seed, copy]).standard_normal(
            (rows, vectors.shape[1]), dtype=np.float32) * scale
        noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
        yield (np.array([stable_id(f"{i}/{copy}") for i in ids[:rows]], dtype=np.int64), noisy,
               [f"{u}#copy{copy}" for u in uris[:rows]])


def catalog_run(root: Path, real: tuple[np.ndarray, np.ndarray, list[str]], size: int, scale: float,
                bundle_id: str, recipe: str, name: str | None = None) -> shards.EmbeddingSnapshot:
    """The run of `size` vectors made from `real` (reused when a complete one of the same recipe exists)."""
    snapshot_dir = root / f"{size}-{recipe}"
    manifest = shards.read_manifest(snapshot_dir)
    if manifest is not None and manifest["complete"]:
        return shards.open_snapshot(snapshot_dir)
    ids, vectors, uris = real
    described = {"name": name or f"bench-{size}", "source": f"bench/indexing.py recipe {recipe}", "entries": size,
                 "fingerprint": recipe}
    shutil.rmtree(snapshot_dir, ignore_errors=True)  # an interrupted earlier attempt
    return shards.write_snapshot(snapshot_dir, noisy_copies(ids, vectors, uris, size, scale, SEED), bundle_id, described,
                            len(ids))


# --- part 2: timing -----------------------------------------------------------------------------------------

def latencies_ms(call: Callable[[int], object], count: int, warmup: int, budget_s: float | None = None,
                 minimum: int = 0) -> np.ndarray:
    """Milliseconds of call(i) for i = 0, 1, ... after `warmup` untimed calls; with `budget_s`, as many calls
    as the warm-up's pace fits in it, between `minimum` and `count`."""
    started = time.perf_counter()
    for i in range(warmup):
        call(i)
    if budget_s is not None and warmup:
        pace = (time.perf_counter() - started) / warmup
        count = min(count, max(minimum, int(budget_s / pace)))
    times = []
    for i in range(count):
        start = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - start)
    return np.array(times) * 1e3


def batch_qps(index: VectorIndex, queries: np.ndarray, repeats: int) -> float:
    """Queries per second of one call with every query, best of `repeats`."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        index.search(queries, K)
        best = min(best, time.perf_counter() - start)
    return len(queries) / best


@dataclass(frozen=True)
class Counts:
    single: int
    encode: int
    warmup: int


def per_query_split_recall(index_dir: Path, run: EmbeddingSnapshot, queries: Queries, config: IndexConfig) -> float:
    """Held-out recall under the tuning protocol of earlier versions, on the same index and queries: queries split
    one by one (a reference's queries on both sides) and no reference left out. Tuning runs again on its own
    split, as it did then; the report sets its result beside the current protocol's."""
    manifest = verify_index(index_dir, checksums=False)
    plan = plan_index(run.rows, run.dim, config, vector_store=run.reranks)
    return tune_index(index_dir, manifest, plan, run, Queries.unreferenced(queries.vectors), config,
                      on_gpu=False)["held_out"]


def measure_index(index_dir: Path, runtime: BundleRuntime, queries: np.ndarray, images: list[Path],
                  captions: list[str], cores: int, batch_threads: int, counts: Counts) -> dict[str, Any]:
    """Load the index as served and time it (queries: the vectors); the build's figures come from its manifest."""
    index = VectorIndex.load(index_dir)
    manifest = index.manifest
    single = {}
    for threads in (cores, 1):  # 1 last: encode+search runs with it (module docstring)
        faiss.omp_set_num_threads(threads)
        single[threads] = latencies_ms(lambda i: index.search(queries[i % len(queries)][None], K), counts.single,
                                       counts.warmup, SINGLE_BUDGET_S, min(MIN_SINGLE_QUERIES, counts.single))
    searcher = Searcher(index, runtime)
    encode = latencies_ms(lambda i: searcher.search(images[i % len(images)], captions[i % len(captions)], K),
                          counts.encode, counts.warmup)
    faiss.omp_set_num_threads(batch_threads)
    return {"type": manifest["type"], "params": manifest["params"], "build_seconds": manifest["build_seconds"],
            "bytes_per_vector": manifest["bytes_per_vector"], "search": manifest["search"],
            "recall": manifest["recall"]["held_out"], "split": manifest["recall"]["split"],
            "reference_excluded": manifest["recall"]["reference_excluded"],
            "single_ms": {str(t): [float(np.percentile(v, 50)), float(np.percentile(v, 99)), len(v)]
                          for t, v in single.items()},
            "encode_ms": [float(np.percentile(encode, 50)), float(np.percentile(encode, 99)), len(encode)],
            "batch_qps": batch_qps(index, queries, BATCH_REPEATS)}


# --- report --------------------------------------------------------------------------------------------------

def render_embedding(e: dict[str, Any], cores: int) -> list[str]:
    plain, ray, resume = e["plain"], e["ray"], e["resume"]
    lines = ["| pipeline | images | seconds | images/s | wall s (with cluster start) | peak memory MB (PSS, "
             "processes) |", "|---|---|---|---|---|---|",
             f"| plain ORT loop (1 process, {cores} ORT threads) | {e['images']} | {plain['seconds']:.1f} | "
             f"{plain['images_per_s']:.0f} | {plain['seconds']:.1f} | {plain['peak_mb']:.0f} "
             f"({plain['processes']}) |",
             f"| Ray job ({ray['actors']} actors x 1 CPU, {ray['shards']} shards) | {e['images']} | "
             f"{ray['seconds']:.1f} | {ray['images_per_s']:.0f} | {ray['wall_s']:.1f} | {ray['peak_mb']:.0f} "
             f"({ray['processes']}) |",
             f"| Ray job, resume after a kill ({resume['shards']} of {ray['shards']} shards redone) | "
             f"{resume['rows']} | {resume['seconds']:.1f} | {resume['rows'] / resume['seconds']:.0f} | "
             f"{resume['wall_s']:.1f} | {resume['peak_mb']:.0f} ({resume['processes']}) |", ""]
    ratio, wall_ratio = ray["images_per_s"] / plain["images_per_s"], plain["seconds"] / ray["wall_s"]
    small = e["small"]
    lines += [f"Scaling ratio Ray job / plain loop: **{ratio:.2f}x** by the job's own timing, {wall_ratio:.2f}x "
              f"by wall time (`cirflow embed` in its own process: Python, imports, listing and ray.init included). "
              f"Resume: {resume['rows']} rows redone in {resume['wall_s']:.1f} s wall; the resumed run lists "
              f"{'the same' if resume['same_ids'] else 'DIFFERENT'} ids. Plain loop vs job vectors: max abs diff "
              f"{ray['max_abs_diff']:.1e}.", "",
              f"Driver memory (the peak PSS of the `cirflow embed` process alone, its Ray processes aside: it lists "
              f"the catalog and records the shards the workers write): **{small['driver_mb']:.0f} MB** for "
              f"{small['images']:,} images, **{ray['driver_mb']:.0f} MB** for {e['images']:,} "
              f"({e['images'] / small['images']:.0f}x the images; the small run: {small['images_per_s']:.0f} "
              "images/s)."]
    return lines


def render_size(size: int, rows: list[dict[str, Any]], cores: int, dim: int) -> list[str]:
    lines = [f"### {size:,} vectors", "",
             f"| index | params | build s total (train / add / tune) | bytes/vector | tuned setting | recall@{K} "
             f"held out | before the fix (per-query split) | search p50 / p99 ms (1 thread) | search p50 / p99 ms ({cores} threads) | encode+search "
             "p50 / p99 ms | batch QPS | single queries timed |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["build_seconds"]
        params = ", ".join(f"{k} {v}" for k, v in r["params"].items()) or "-"
        setting = "exact" if r["search"]["param"] is None else f"{r['search']['param']} {r['search']['value']}"
        one, many = r["single_ms"]["1"], r["single_ms"][str(cores)]
        lines.append(f"| {r['type']} | {params} | {b['total']:.1f} ({b['train']:.1f} / {b['add']:.1f} / "
                     f"{b['tune']:.1f}){' reused' if r['reused'] else ''} | {r['bytes_per_vector']:.1f} | {setting} | "
                     f"{r['recall']:.3f} | {r['recall_per_query_split']:.3f} ({r['recall'] - r['recall_per_query_split']:+.3f}) | "
                     f"{one[0]:.2f} / {one[1]:.2f} | {many[0]:.2f} / {many[1]:.2f} | "
                     f"{r['encode_ms'][0]:.2f} / {r['encode_ms'][1]:.2f} | {r['batch_qps']:.0f} | "
                     f"{one[2]} / {many[2]} |")
    split, excluded = rows[0]["split"], rows[0]["reference_excluded"]  # the same queries and seed for every type
    tuning, held = split["tuning"], split["held_out"]
    lines += ["", f"Recall split by {split['by']} (seed {split['seed']}): {tuning['queries']} queries of "
              f"{tuning['references']} references tuned, {held['queries']} queries of {held['references']} "
              f"references held out; {excluded} queries had their reference in this catalog and left it out."]
    flat = [r for r in rows if r["type"] == "flat"]
    if flat:
        scan = size * dim * 4
        lines += ["", f"Exact scan: {scan / 1e6:,.1f} MB per query batch; one Flat query (1 thread) reads it at "
                  f"{scan / flat[0]['single_ms']['1'][0] / 1e6:.1f} GB/s."]
    return lines


def render_aim(size: int, rows: list[dict[str, Any]], cores: int) -> list[str]:
    where = (f"{size:,} vectors" if size == AIM["size"] else
             f"{size:,} vectors (the largest size here; the aim is stated for {AIM['size']:,})")
    if cores != AIM["cores"]:
        where += f", {cores} cores (the aim is stated for {AIM['cores']})"
    lines = [f"Aim at {where}: recall@{K} >= {AIM['recall']}, search p50 <= {AIM['search_p50_ms']:g} ms and "
             f"encode+search p50 <= {AIM['encode_search_p50_ms']:g} ms (search at 1 faiss thread):", ""]
    for r in rows:
        checks = [(f"recall {r['recall']:.3f}", r["recall"] >= AIM["recall"]),
                  (f"search p50 {r['single_ms']['1'][0]:.2f} ms", r["single_ms"]["1"][0] <= AIM["search_p50_ms"]),
                  (f"encode+search p50 {r['encode_ms'][0]:.2f} ms", r["encode_ms"][0] <= AIM["encode_search_p50_ms"])]
        verdict = "**all met**" if all(ok for _, ok in checks) else "not met"
        lines.append(f"- {r['type']}: " + "; ".join(f"{text} {'met' if ok else 'NOT met'}" for text, ok in checks)
                     + f" -> {verdict}")
    return lines


def render(args: argparse.Namespace, command: str, data: dict[str, Any], embedding: dict[str, Any],
           catalogs: dict[str, Any], results: dict[int, list[dict[str, Any]]], cores: int, dim: int) -> str:
    e = embedding
    lines = ["## Indexing: embedding job and FAISS indexes (CPU)", "",
             f"- date: {today()}; machine: {machine()}; faiss {faiss.__version__}",
             f"- command: `{command}`",
             f"- bundle: {args.bundle} (bundle_id {catalogs['bundle_id']}, {dim} dims); data: {args.data} (shapes, "
             + ", ".join(f"{k} {v}" for k, v in data["config"].items()) + f"): catalog = the {e['images']:,} "
             f"training images, queries = the test split's {data['test_queries']:,} composed queries",
             "- method, choices and their reasons: the docstring of bench/indexing.py", "",
             "### Embedding", "",
             f"Batches of {e['batch']} images; the job with default actor settings on a fresh local Ray cluster of "
             f"{cores} CPUs, {e['rows_per_shard']} rows per shard; the two pipelines ran one after the other. Peak "
             "memory: the largest sum of PSS over the bench process and its descendants (Ray's processes "
             f"included), sampled every {MEMORY_SAMPLE_S:g} s.", "",
             *render_embedding(e, cores), "",
             "### Index and search", "",
             f"- catalogs: the first {catalogs['base']:,} real vectors, then noisy copies v' = normalize(v + n), "
             f"n ~ N(0, s^2 I), s = r / sqrt({dim}) = {catalogs['scale']:.4f} with r = {catalogs['nn_distance']:.4f} "
             f"the median distance of a real vector to its nearest real neighbour ({catalogs['nn_sample']} "
             "sampled): each copy lies about as far from its source as a real neighbour does",
             f"- queries: {catalogs['queries']:,} test-split composed queries of {catalogs['references']:,} reference "
             "images (seeded sample), split by build_index into tuning and held-out halves by reference image (all "
             f"queries of one reference on one side; counts per size below); recall@{K} on the held-out half "
             "against exact inner-product search, each query's reference left out of both the exact and the "
             "index's top-10 where the catalog holds it, as search leaves it out",
             f"- index defaults of IndexConfig (memory budget {MEMORY_BUDGET_MB:,.0f} MB decides nothing), HNSW "
             f"efConstruction {args.ef_construction}; faiss with {catalogs['faiss_threads']} OpenMP thread(s) for "
             "build and batch; "
             "indexes loaded as served (memory-mapped, tuned setting applied); single-query and encode+search "
             f"after {args.counts.warmup} warm-up calls; batch QPS: all {catalogs['queries']:,} queries in one call, "
             f"best of {BATCH_REPEATS}; encode+search: Searcher.search(reference image file, caption, k={K}) with "
             f"faiss at 1 thread, ONNX Runtime at {cores}",
             *([f"- WARNING: r < {DEGENERATE_NN:g}: the bundle maps the images to nearly one vector (untrained?), so "
                "the copies are near-duplicates and recall and tuning say little"]
               if catalogs["nn_distance"] < DEGENERATE_NN else []),
             "- build s of a reused index (marked) are those of its original build", ""]
    for size, rows in results.items():
        lines += [*render_size(size, rows, cores, dim), ""]
    largest = max(results)
    lines += render_aim(largest, results[largest], cores)
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="model bundle (default: the newest under workdir/bundles/)")
    parser.add_argument("--data", type=Path, help="shapes dataset, generated when missing (default "
                        "workdir/bench/shapes-x4; --quick: WORKDIR/data/shapes-tiny)")
    parser.add_argument("--workdir", type=Path, help="default workdir/bench/indexing (--quick: "
                        "workdir/bench/indexing-quick)")
    parser.add_argument("--doc", type=Path, help="default docs/benchmarks.md (--quick: WORKDIR/indexing-quick.md)")
    parser.add_argument("--sizes", type=int, nargs="+", help="catalog sizes (default 100000 1000000; --quick: "
                        "2000 10000)")
    parser.add_argument("--types", nargs="+", choices=INDEX_TYPES[1:], default=list(INDEX_TYPES[1:]))
    parser.add_argument("--queries", type=int, default=2000, help="test queries sampled for tuning, recall and "
                        "batch QPS (default 2000; the split's size if smaller)")
    parser.add_argument("--ef-construction", type=int, default=IndexConfig().hnsw_ef_construction,
                        help="HNSW build width (lower builds faster; default: IndexConfig's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, small sizes, few queries")
    parser.add_argument("--scale", action="store_true", help="part 3 instead of part 2: the planner's index at "
                        "--sizes (default 10000000) in --dims, within --budget-mb")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512], help="--scale: the model's dimension "
                        "and lifts of it (default 128 512)")
    parser.add_argument("--budget-mb", type=float, default=16384.0, help="--scale: the index's memory budget")
    args = parser.parse_args(argv)
    args.bundle = args.bundle or default_bundle()
    args.workdir = args.workdir or Path("workdir/bench/indexing-quick" if args.quick else "workdir/bench/indexing")
    args.data = args.data or (args.workdir / "data" / "shapes-tiny" if args.quick else Path("workdir/bench/shapes-x4"))
    args.doc = args.doc or (args.workdir / "indexing-quick.md" if args.quick else DOC)
    args.sizes = sorted(set(args.sizes or ([2000, 10000] if args.quick else [10_000_000] if args.scale
                                           else [100_000, 1_000_000])))
    args.seed = SEED
    args.counts = (Counts(QUICK_SINGLE_QUERIES, QUICK_ENCODE_QUERIES, QUICK_WARMUP) if args.quick
                   else Counts(SINGLE_QUERIES, ENCODE_QUERIES, WARMUP))
    if min(args.sizes) <= 0 or args.queries < 2 or args.ef_construction <= 0:
        raise SystemExit(f"--sizes must be positive, --queries >= 2, --ef-construction > 0; got {args.sizes}, "
                         f"{args.queries}, {args.ef_construction}")
    return args


def estimate_minutes(args: argparse.Namespace, shapes: ShapesConfig, generate: bool) -> dict[str, float]:
    """Minutes per part on 2 quiet cores, from the EST_ constants."""
    images = {split: shapes.query_count(split) * IMAGES_PER_QUERY for split in ("train", "val", "test")}
    index_s = {t: s * (args.ef_construction / EST_EF_CONSTRUCTION if t == "hnsw" else 1.0)
               for t, s in EST_INDEX_S_PER_M.items()}
    parts = {"data": sum(images.values()) / EST_RENDER_PER_S if generate else 0.0,
             "embedding": images["train"] / EST_PLAIN_PER_S + images["train"] / EST_RAY_PER_S + 2 * EST_RAY_START_S
             + RESUME_SHARDS * EmbedConfig().rows_per_shard / EST_RAY_PER_S
             + images["train"] / SMALL_CATALOG_FRACTION / EST_RAY_PER_S + EST_RAY_START_S}
    for size in args.sizes:
        if args.scale:
            for dim in args.dims:
                parts[f"{size:,} x {dim}"] = EST_SCALE_S_PER_M_DIM * dim * size / 1e6 + EST_INDEX_FIXED_S
        else:
            parts[f"{size:,} vectors"] = sum(index_s[t] * size / 1e6 + EST_INDEX_FIXED_S for t in args.types)
    return {k: v / 60 for k, v in parts.items()}


def embedding_results(args: argparse.Namespace, catalog: CatalogConfig, bundle_id: str,
                      cores: int) -> dict[str, Any]:
    """Part 1's numbers: measured, or read back from an earlier run of the bench whose embedding snapshot is complete."""
    saved = args.workdir / f"embedding-{catalog.name}-{bundle_id}.json"
    if saved.exists():
        embedding = read_json(saved)
        if (shards.read_manifest(Path(embedding["ray"]["snapshot_dir"])) or {}).get("complete"):
            print(f"part 1: reusing {saved} (delete it to measure again)", flush=True)
            return embedding
    embedding = measure_embedding(args.bundle, catalog, args.workdir / "embed", cores,
                                  QUICK_ROWS_PER_SHARD if args.quick else EmbedConfig().rows_per_shard)
    write_json_atomic(saved, embedding)
    return embedding


def composed_queries(runtime: BundleRuntime, data: Path, count: int) -> tuple[Queries, list[Path], list[str]]:
    """A seeded sample of `count` test-split queries: (vectors with their references, reference image files,
    captions)."""
    queries = encode_query_split(runtime, "shapes", data, "test")
    split = load_split("shapes", data, "test")
    rows = np.sort(np.random.default_rng(SEED).permutation(len(queries.vectors))[:count])
    return (queries.take(rows), [split.images[split.queries[i].reference] for i in rows],
            [split.queries[i].caption for i in rows])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = shlex.join([".venv/bin/python", "bench/indexing.py", *(sys.argv[1:] if argv is None else argv)])
    cores = len(os.sched_getaffinity(0))
    # --quick builds on one faiss thread: its numbers are not recorded, and on cores busy with other jobs two
    # OpenMP threads made IVF-PQ training 2.4x slower (measured: 17 s instead of 7 s).
    faiss_threads = 1 if args.quick else cores
    faiss.omp_set_num_threads(faiss_threads)
    started = time.monotonic()
    shapes = QUICK_DATA if args.quick else FULL_DATA
    generate = not (args.data / SHAPES_MANIFEST).exists()
    estimate = estimate_minutes(args, shapes, generate)
    print("indexing bench: estimated " + ", ".join(f"{k} ~{v:.1f} min" for k, v in estimate.items())
          + f"; ~{sum(estimate.values()):.0f} min in all on 2 quiet cores", flush=True)
    load = os.getloadavg()[0]
    if not args.quick and load > 0.5:
        print(f"warning: load average {load:.1f} on {cores} cores: other jobs skew every timing here", flush=True)

    if generate:
        print(f"generating the shapes dataset in {args.data} ...", flush=True)
        generate_shapes(shapes, args.data)
    info = read_json(args.data / SHAPES_MANIFEST)
    data = {"config": info["config"], "test_queries": info["splits"]["test"]["queries"]}
    images_dir = args.data / info["splits"]["train"]["image_dir"]
    catalog = CatalogConfig(name=f"{args.data.name}-train", folder=str(images_dir))
    embedding = embedding_results(args, catalog, read_json(args.bundle / "manifest.json")["bundle_id"], cores)
    print(f"[{(time.monotonic() - started) / 60:.1f} min] part 1 done", flush=True)

    runtime = BundleRuntime.load(args.bundle, providers="cpu", intra_op_threads=cores)
    queries, images, captions = composed_queries(runtime, args.data, args.queries)
    run = shards.open_snapshot(Path(embedding["ray"]["snapshot_dir"]))
    ids, vectors, uris = run.read_all()
    base = min(len(ids), args.sizes[0])
    real = (ids[:base], vectors[:base], uris[:base])
    nn_distance = median_nn_distance(real[1], NN_SAMPLE, SEED)
    scale = nn_distance / math.sqrt(run.dim)
    print(f"noise: median nearest-neighbour distance {nn_distance:.4f} over {min(NN_SAMPLE, base)} of {base:,} "
          f"real vectors -> per-dimension scale {scale:.5f}", flush=True)
    if nn_distance < DEGENERATE_NN:
        print(f"warning: median nearest-neighbour distance < {DEGENERATE_NN:g}: the bundle maps every image to "
              "nearly the same vector; the noisy copies will be near-duplicates", flush=True)
    # The synthetic catalogs are named by everything their vectors depend on.
    recipe = hashlib.sha256(json.dumps({"shards": {n: s["sha256"] for n, s in run.manifest["shards"].items()},
                                        "base": base, "scale": scale, "seed": SEED}, sort_keys=True).encode())
    catalogs = {"bundle_id": run.bundle_id, "base": base, "scale": scale, "nn_distance": nn_distance,
                "nn_sample": min(NN_SAMPLE, base), "queries": len(queries.vectors),
                "references": len(set(queries.references)), "faiss_threads": faiss_threads}

    args.faiss_threads = faiss_threads
    if args.scale:
        def scaled_catalog(real_dim: tuple[np.ndarray, np.ndarray, list[str]], size: int, noise: float,
                           dim: int) -> EmbeddingSnapshot:
            named = hashlib.sha256(f"{recipe.hexdigest()}/{dim}/{real_dim[1][:4].tobytes().hex()}".encode())
            return catalog_run(args.workdir / "catalogs", real_dim, size, noise, run.bundle_id,
                               named.hexdigest()[:12], f"bench-{size}-{dim}d")

        def say(text: str) -> None:
            print(f"[{(time.monotonic() - started) / 60:.1f} min] {text}", flush=True)

        rows = run_scale(args, runtime, queries, images, captions, real, nn_distance, scaled_catalog,
                         lambda v: median_nn_distance(v, NN_SAMPLE, SEED), latencies_ms, say)
        header = [f"- date: {today()}; machine: {machine()}; faiss {faiss.__version__}", f"- command: `{command}`",
                  f"- bundle: {args.bundle} (bundle_id {run.bundle_id}, {run.dim} dims); queries: "
                  f"{len(queries.vectors):,} test-split composed queries of {len(set(queries.references)):,} "
                  f"reference images, split by reference into tuning and held-out halves; catalogs: the first "
                  f"{base:,} real vectors and noisy copies (part 2's recipe; r = {nn_distance:.4f}), lifted to the "
                  f"dimensions above {run.dim} (bench/index_scale.py)"]
        body = render_scale(rows, args, header)
        write_section("indexing-scale", body, args.doc)
        print(body)
        print(f"wrote the indexing-scale section to {args.doc} in {(time.monotonic() - started) / 60:.1f} min")
        return

    results: dict[int, list[dict[str, Any]]] = {}
    indexes = args.workdir / "indexes"
    for size in args.sizes:
        size_run = catalog_run(args.workdir / "catalogs", real, size, scale, run.bundle_id, recipe.hexdigest()[:12])
        results[size] = []
        for index_type in args.types:
            config = IndexConfig(index_type=index_type, memory_budget_mb=MEMORY_BUDGET_MB,
                                 hnsw_ef_construction=args.ef_construction, seed=SEED)
            reused = (indexes / size_run.manifest["catalog"]["name"] / index_id(size_run, queries, config)).is_dir()
            index_dir = build_index(size_run, queries, indexes, config)
            measured = {**measure_index(index_dir, runtime, queries.vectors, images, captions, cores, faiss_threads,
                                        args.counts), "reused": reused,
                        "recall_per_query_split": per_query_split_recall(index_dir, size_run, queries, config)}
            results[size].append(measured)
            print(f"[{(time.monotonic() - started) / 60:.1f} min] {size:,} {index_type}: build "
                  f"{measured['build_seconds']['total']:.1f} s{' (reused)' if reused else ''}, recall "
                  f"{measured['recall']:.3f}, search p50 {measured['single_ms']['1'][0]:.2f} ms, "
                  f"encode+search p50 {measured['encode_ms'][0]:.2f} ms", flush=True)

    body = render(args, command, data, embedding, catalogs, results, cores, run.dim)
    write_section("indexing", body, args.doc)
    print(body)
    print(f"wrote the indexing section to {args.doc} in {(time.monotonic() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()

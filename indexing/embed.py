"""The catalog embedding job: a catalog + a model bundle -> an embedding snapshot (Parquet shards, errors table,
manifest), made incrementally from the previous snapshot.

Its one command line is `cirflow embed --config FILE [key.path=value ...]` (flows/cli.py), locally or as the
entrypoint of a job submitted to a Ray cluster (README.md); `run_embed` is the entry point for code.

    embeddings/<catalog>/<bundle_id>/<snapshot_id>/   one state of the catalog (shards.py has the format)
    embeddings/<catalog>/<bundle_id>/CURRENT          the latest complete snapshot

A snapshot's id hashes the catalog's (id, uri, version) rows and metadata columns (catalog.py) and the shard
size, so an unchanged catalog finds its finished snapshot and does nothing. A changed one gets a new snapshot,
made from the CURRENT one: entries with the same id, uri and version keep their vector (copied, byte for byte) or
their errors row, new and changed entries are embedded, removed ones are left out. A change of metadata alone
(a category renamed) thus makes a new snapshot that embeds nothing: its catalog.parquet carries the new
metadata to the index built from it. The snapshot moves CURRENT when complete; the older ones stay
(`keep_snapshots`) and are never modified.

Ray Data reads and decodes in tasks, and embeds in a fixed pool of actors (one bundle runtime each); the
driver gathers each shard's rows and writes the shard (temp name, rename) once every entry of it is accounted
for, embedded, reused or recorded as an error. A delta smaller than `local_below` images is embedded in this
process with the same code instead: starting a Ray instance costs more than it does. Shards are cut from the
id-sorted catalog (indexing/shards.py), so a rerun after a kill redoes only the unfinished shards and ends with
exactly the same rows. Every start checks the files the manifest records (size and sha256) and redoes the
shards whose files were deleted or changed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cirflow.core.config import check_non_negative, check_positive, to_dict
from cirflow.core.files import check_files, follow_current, publish_current
from cirflow.export.manifest import read_preprocess, resolve_bundle_dir, verify_bundle
from cirflow.indexing import shards
from cirflow.indexing.catalog import CatalogConfig, fingerprint, load_catalog, metadata_fields
from cirflow.indexing.embed_stages import ImageEmbedder, decode_batch
from cirflow.indexing.ray_cluster import check_job_paths, connect_ray
from cirflow.models.preprocess import PreprocessConfig

log = logging.getLogger(__name__)

# What `providers` may name: the GPU execution provider of actors given a GPU (export.runtime.PROVIDERS).
GPU_PROVIDER_CHOICES = ("auto", "cuda", "tensorrt")


class EmbedError(ValueError):
    """The job cannot run as configured (resources, a changed catalog, a lost shard); the message says why."""


@dataclass(frozen=True)
class RayConfig:
    # None: RAY_ADDRESS (set by `ray job submit`), else a new local instance bound to 127.0.0.1 (ray_cluster.py).
    address: str | None = None
    num_cpus: int | None = None  # CPUs of a new local cluster (None: all of this machine's)


@dataclass(frozen=True)
class EmbedConfig:
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    bundle: str = ""  # model bundle directory (export stage), or a bundles directory whose CURRENT names one
    workdir: str = "workdir"  # the run goes to WORKDIR/embeddings/<catalog.name>/<bundle_id>/
    rows_per_shard: int = 8192  # resume granularity; ~4 MB of Parquet per shard at 128 dims
    batch_size: int = 64  # images per read/decode/encode task (and per encoder call)
    # Encoder copies, each holding one ONNX Runtime session pair; 0: as many as the cluster's CPUs (or GPUs, with
    # num_gpus) allow. Ray fuses the read/decode stage into these actors (same CPU request), so each actor
    # reads, decodes and embeds its own batches and pixels never travel through the object store.
    num_actors: int = 0
    cpus_per_actor: int = 1  # also the actor's ONNX Runtime thread count
    num_gpus: float = 0.0  # GPUs per actor; > 0 runs the encoder on them and fails fast where there are none
    # The GPU provider of actors with num_gpus > 0: tensorrt (TensorRT, else CUDA), cuda, or auto (the best this
    # onnxruntime offers). Actors with num_gpus == 0 run on CPU whatever the host has: a CUDA session there would
    # use a GPU that Ray has not given them.
    providers: str = "auto"
    ray: RayConfig = field(default_factory=RayConfig)
    # Fewer images to embed than this (a small refresh) run in this process instead of a new local Ray instance,
    # whose start alone (~4 s) costs more; 0: always Ray. A cluster given by ray.address or RAY_ADDRESS is used
    # whatever the count.
    local_below: int = 2048
    keep_snapshots: int = 2  # complete snapshots kept per catalog and bundle (CURRENT and the one before at least)

    def __post_init__(self) -> None:
        check_positive(self, "rows_per_shard", "batch_size", "cpus_per_actor", "keep_snapshots")
        check_non_negative(self, "num_actors", "num_gpus", "local_below")
        if self.providers not in GPU_PROVIDER_CHOICES:
            raise ValueError(f"providers={self.providers!r} is not one of {list(GPU_PROVIDER_CHOICES)} (the GPU provider "
                             "of actors with num_gpus > 0; actors without a GPU run on CPU)")
        if self.providers != "auto" and self.num_gpus == 0:
            raise ValueError(f"providers={self.providers!r} needs num_gpus > 0: actors without a GPU run on CPU")


def actor_providers(config: EmbedConfig) -> tuple[str, bool]:
    """(providers, require_gpu) of the encoder actors: the GPU only where Ray gave them one (num_gpus > 0), so
    that no actor runs on a GPU outside Ray's accounting; CPU otherwise."""
    if config.num_gpus > 0:
        return config.providers, True
    return "cpu", False


def run_embed(config: EmbedConfig) -> Path:
    """Embed the catalog's current state (resuming an interrupted run, reusing the previous snapshot's vectors);
    returns the snapshot directory, which is then CURRENT."""
    if not config.bundle:
        raise EmbedError("bundle is not set: give the model bundle directory (cirflow export --out ...)")
    check_job_paths({"workdir": config.workdir, "bundle": config.bundle, "catalog.folder": config.catalog.folder,
                     "catalog.manifest": config.catalog.manifest})
    # Resolved once: a bundles directory's CURRENT re-pointed mid-job must not change what the actors load.
    bundle_dir = resolve_bundle_dir(Path(config.bundle)).resolve()
    bundle = verify_bundle(bundle_dir)
    preprocess = read_preprocess(bundle_dir)
    catalog = load_catalog(config.catalog)
    base = Path(config.workdir) / "embeddings" / config.catalog.name / bundle["bundle_id"]
    if (base / shards.MANIFEST).exists():
        raise EmbedError(f"{base} holds an embedding run of an older cirflow (no snapshots); delete it to embed "
                         "the catalog again")
    snapshot = snapshot_id(catalog, config.rows_per_shard)
    run_dir = base / snapshot
    num_shards = math.ceil(catalog.num_rows / config.rows_per_shard)
    described = {"name": config.catalog.name, "source": config.catalog.source, "entries": catalog.num_rows,
                 "fingerprint": fingerprint(catalog), "snapshot": snapshot}
    fields = metadata_fields(catalog.schema)
    if fields:
        described["metadata_fields"] = fields
    previous = _previous_snapshot(base, run_dir)
    reuse = Reuse.plan(catalog, previous)
    manifest = _resume_or_start(run_dir, bundle, described, config.rows_per_shard, num_shards, catalog, reuse)
    if manifest["complete"]:
        log.info("embedding snapshot %s is complete (%d rows, %d errors); nothing to do", run_dir, manifest["rows"],
                 manifest["errors"])
        _publish(run_dir, config.keep_snapshots)
        return run_dir
    pending = [k for k in range(num_shards) if shards.shard_name(k) not in manifest["shards"]]
    writer = ShardWriter(run_dir, manifest, catalog, config.rows_per_shard, pending, reuse)
    todo = writer.todo()
    log.info("snapshot %s of catalog %r (%d entries): %s; %d of %d shards to write, %d images to embed", snapshot,
             config.catalog.name, catalog.num_rows, _delta_text(manifest["delta"]), len(pending), num_shards,
             todo.num_rows)
    started = time.perf_counter()
    writer.write_reused_only()
    where, actors = "none", 0
    if todo.num_rows:
        if _in_process(config, todo.num_rows):
            where, actors = "in-process", 1
            _embed_in_process(config, bundle_dir, todo, preprocess, writer)
        else:
            where, actors = "ray", _embed_with_ray(config, bundle_dir, todo, preprocess, writer)
    writer.check_done()
    seconds = time.perf_counter() - started
    _finish(run_dir, manifest, {"config": to_dict(config), "bundle_dir": str(bundle_dir), "embedded_by": where,
                                "actors": actors, "shards": len(pending), "entries": todo.num_rows,
                                "seconds": round(seconds, 2),
                                "entries_per_s": round(todo.num_rows / seconds, 1) if seconds else None})
    _publish(run_dir, config.keep_snapshots)
    log.info("embedding snapshot complete: %d rows, %d errors; %d images embedded (%s) in %.1f s", manifest["rows"],
             manifest["errors"], todo.num_rows, where, seconds)
    return run_dir


def snapshot_id(catalog: pa.Table, rows_per_shard: int) -> str:
    """The snapshot directory name of a catalog state: its (id, uri, version) rows, metadata and the shard
    size."""
    return hashlib.sha256(f"{fingerprint(catalog)}/{rows_per_shard}".encode()).hexdigest()[:16]


def _previous_snapshot(base: Path, run_dir: Path) -> shards.EmbeddingRun | None:
    """The CURRENT snapshot to reuse vectors from, verified; None when there is none (or it is damaged: then
    everything is embedded again, with a warning)."""
    current = follow_current(base, EmbedError)
    if current is None or current == run_dir:
        return None
    try:
        return shards.open_run(current)
    except shards.EmbeddingsError as e:
        log.warning("previous snapshot %s cannot be reused (%s); embedding every entry", current, e)
        return None


@dataclass(frozen=True)
class Reuse:
    """What a new snapshot takes from the previous one: for each catalog row (id order) whether its vector or
    errors row carries over, and where to read them."""

    unchanged: np.ndarray  # (N,) bool over the new catalog's rows
    delta: dict[str, Any]
    changes: pa.Table  # id, change (added, changed, removed): what an index of the previous snapshot must update
    previous: shards.EmbeddingRun | None
    errors: dict[int, str]  # id -> reason, of unchanged entries that failed before

    @classmethod
    def plan(cls, catalog: pa.Table, previous: shards.EmbeddingRun | None) -> Reuse:
        n = catalog.num_rows
        if previous is not None and not (previous.run_dir / shards.CATALOG).is_file():
            log.warning("previous snapshot %s has no %s; embedding every entry", previous.run_dir, shards.CATALOG)
            previous = None
        if previous is None:
            return cls(np.zeros(n, bool), {"previous": None, "added": n, "changed": 0, "removed": 0,
                                           "unchanged": 0, "reused_vectors": 0, "reused_errors": 0},
                       _changes([], [], []), None, {})
        old = pq.read_table(previous.run_dir / shards.CATALOG).sort_by("id")
        new_ids, old_ids = catalog.column("id").to_numpy(), old.column("id").to_numpy()
        pos = np.searchsorted(old_ids, new_ids).clip(max=max(len(old_ids) - 1, 0))
        present = (old_ids[pos] == new_ids) if len(old_ids) else np.zeros(n, bool)
        same = present.copy()
        for column in ("uri", "version"):
            ours = np.array(catalog.column(column).to_pylist(), dtype=object)
            theirs = np.array(old.column(column).to_pylist(), dtype=object)
            same &= ours == theirs[pos]
        errors_table = pq.read_table(previous.run_dir / shards.ERRORS, columns=["id", "reason"])
        failed = dict(zip(errors_table.column("id").to_pylist(), errors_table.column("reason").to_pylist()))
        errors = {i: failed[i] for i in new_ids[same].tolist() if i in failed}
        removed = np.setdiff1d(old_ids, new_ids)
        delta = {"previous": previous.run_dir.name, "added": int((~present).sum()),
                 "changed": int((present & ~same).sum()), "removed": len(removed),
                 "unchanged": int(same.sum()), "reused_vectors": int(same.sum()) - len(errors),
                 "reused_errors": len(errors)}
        changes = _changes(new_ids[~present], new_ids[present & ~same], removed)
        return cls(same, delta, changes, previous, errors)


def _changes(added: Any, changed: Any, removed: Any) -> pa.Table:
    ids = np.concatenate([np.asarray(x, np.int64) for x in (added, changed, removed)])
    kinds = ["added"] * len(added) + ["changed"] * len(changed) + ["removed"] * len(removed)
    return pa.table({"id": pa.array(ids, pa.int64()), "change": pa.array(kinds, pa.string())}).sort_by("id")


class ShardWriter:
    """Assembles each pending shard from reused rows and embedded batches, and writes it when every entry of it
    is accounted for."""

    def __init__(self, run_dir: Path, manifest: dict[str, Any], catalog: pa.Table, rows_per_shard: int,
                 pending: list[int], reuse: Reuse) -> None:
        self.run_dir, self.manifest, self.reuse = run_dir, manifest, reuse
        self.slices = {k: (k * rows_per_shard, min((k + 1) * rows_per_shard, catalog.num_rows)) for k in pending}
        self.catalog = catalog
        self.expected = {k: int((~reuse.unchanged[lo:hi]).sum()) for k, (lo, hi) in self.slices.items()}
        self.buffers: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
        self.seen: dict[int, int] = defaultdict(int)
        self.vectors = PreviousVectors(reuse.previous) if reuse.previous is not None else None

    def todo(self) -> pa.Table:
        """(id, uri, shard) of the pending shards' entries to embed, in id order."""
        parts = []
        for k, (lo, hi) in self.slices.items():
            rows = np.flatnonzero(~self.reuse.unchanged[lo:hi]) + lo
            part = self.catalog.take(pa.array(rows, pa.int64())).select(["id", "uri"])
            parts.append(part.append_column("shard", pa.array(np.full(len(rows), k, np.int64))))
        schema = pa.schema([("id", pa.int64()), ("uri", pa.string()), ("shard", pa.int64())])
        return pa.concat_tables(parts) if parts else schema.empty_table()

    def write_reused_only(self) -> None:
        for k in [k for k, n in self.expected.items() if n == 0]:
            self._write(k)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for k in np.unique(batch["shard"]).tolist():
            rows = batch["shard"] == k
            self.buffers[k].append({key: batch[key][rows] for key in ROW_KEYS})
            self.seen[k] += int(rows.sum())
            if self.seen[k] == self.expected[k]:
                self._write(k)

    def check_done(self) -> None:
        lost = {k: (self.seen[k], n) for k, n in self.expected.items()
                if shards.shard_name(k) not in self.manifest["shards"]}
        if lost:
            raise EmbedError(f"shards {sorted(lost)} came back incomplete (rows seen, expected: {lost}); rerun to "
                             "redo them")

    def _write(self, k: int) -> None:
        lo, hi = self.slices[k]
        parts = self.buffers.pop(k, [])
        rows = np.flatnonzero(self.reuse.unchanged[lo:hi]) + lo
        if len(rows):
            part = self.catalog.take(pa.array(rows, pa.int64()))
            ids = part.column("id").to_numpy()
            failed = np.array([i in self.reuse.errors for i in ids.tolist()], dtype=bool)
            vectors = np.zeros((len(ids), self.manifest["embed_dim"]), np.float32)
            if (~failed).any() and self.vectors is not None:
                vectors[~failed] = self.vectors.take(ids[~failed])
            parts.append({"id": ids, "uri": np.array(part.column("uri").to_pylist(), dtype=object),
                          "embedding": vectors,
                          "error": np.array([self.reuse.errors.get(i, "") for i in ids.tolist()], dtype=object)})
        _write_shard(self.run_dir, k, parts, self.manifest)


ROW_KEYS = ("id", "uri", "embedding", "error")


class PreviousVectors:
    """Vectors of the previous snapshot by id, read shard by shard (both snapshots are id-sorted, so one new
    shard needs one or two old ones; the last two read stay in memory)."""

    def __init__(self, run: shards.EmbeddingRun) -> None:
        self.run = run
        self.ranges = []
        for path in run.shard_files:
            ids = pq.read_table(path, columns=["id"]).column("id").to_numpy()
            if len(ids):
                self.ranges.append((int(ids[0]), int(ids[-1]), path))
        self.cache: dict[Path, tuple[np.ndarray, np.ndarray]] = {}

    def take(self, ids: np.ndarray) -> np.ndarray:
        out = np.zeros((len(ids), self.run.dim), np.float32)
        found = np.zeros(len(ids), bool)
        for lo, hi, path in self.ranges:
            if hi < ids[0] or lo > ids[-1]:
                continue
            old_ids, vectors = self._read(path)
            pos = np.searchsorted(old_ids, ids).clip(max=len(old_ids) - 1)
            hit = old_ids[pos] == ids
            out[hit] = vectors[pos[hit]]
            found |= hit
        if not found.all():
            raise EmbedError(f"previous snapshot {self.run.run_dir} lacks the vectors of ids "
                             f"{ids[~found][:5].tolist()} that its catalog lists; delete it to embed everything")
        return out

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        if path not in self.cache:
            if len(self.cache) >= 2:
                self.cache.pop(next(iter(self.cache)))
            ids, vectors, _ = shards.read_shard(path, self.run.dim)
            self.cache[path] = (ids, vectors)
        return self.cache[path]


def _delta_text(delta: dict[str, Any]) -> str:
    if delta["previous"] is None:
        return "no previous snapshot, every entry is new"
    return (f"against {delta['previous']}: {delta['added']} added, {delta['changed']} changed, {delta['removed']} "
            f"removed, {delta['unchanged']} unchanged ({delta['reused_vectors']} vectors and "
            f"{delta['reused_errors']} errors rows reused)")


def _resume_or_start(run_dir: Path, bundle: dict[str, Any], catalog: dict[str, Any], rows_per_shard: int,
                     num_shards: int, table: pa.Table, reuse: Reuse) -> dict[str, Any]:
    manifest = shards.read_manifest(run_dir)
    if manifest is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        catalog_file = shards.write_parquet_atomic(table, run_dir / shards.CATALOG)
        manifest = shards.new_manifest(bundle["bundle_id"], int(bundle["embed_dim"]), catalog, rows_per_shard,
                                       num_shards)
        manifest["catalog_file"] = {shards.CATALOG: catalog_file}
        manifest["changes_file"] = {shards.CHANGES: shards.write_parquet_atomic(reuse.changes,
                                                                               run_dir / shards.CHANGES)}
        manifest["delta"] = reuse.delta
        shards.write_manifest(run_dir, manifest)
        return manifest
    before = (manifest["catalog"]["fingerprint"], manifest["catalog"]["entries"], manifest["rows_per_shard"])
    if before != (catalog["fingerprint"], catalog["entries"], rows_per_shard):
        raise EmbedError(f"{run_dir} holds a snapshot of a different catalog state or shard size (fingerprint, "
                         f"entries, rows_per_shard {before} != "
                         f"{(catalog['fingerprint'], catalog['entries'], rows_per_shard)}); delete it")
    _drop_damaged(run_dir, manifest)
    log.info("resuming %s: %d of %d shards already done", run_dir, len(manifest["shards"]), num_shards)
    return manifest


def _drop_damaged(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Reopen what a rerun would otherwise trust blindly: recorded shards whose files were deleted or changed are
    dropped (to be redone), and a complete run whose errors.parquet is damaged is merged again. Every file is
    hashed: that costs seconds per GB, far less than embedding its rows did."""
    damaged = shards.damaged_shards(run_dir, manifest)
    for name, problem in damaged.items():
        log.warning("embedding run %s: %s; redoing shard %s", run_dir, problem, name)
        shards.drop_shard(manifest, name)
    problem = manifest["complete"] and check_files(run_dir, manifest["errors_file"])
    if problem:
        log.warning("embedding run %s: %s; writing it again", run_dir, problem)
        manifest["complete"] = False
    if damaged or problem:
        shards.write_manifest(run_dir, manifest)


def _in_process(config: EmbedConfig, count: int) -> bool:
    """Small CPU deltas skip Ray when this job would start its own instance (a cluster given is always used,
    and so is Ray when GPUs are asked for: it is what hands them out)."""
    joining = config.ray.address is not None or bool(os.environ.get("RAY_ADDRESS"))
    return not joining and config.num_gpus == 0 and count < config.local_below


def _embed_in_process(config: EmbedConfig, bundle_dir: Path, todo: pa.Table, preprocess: PreprocessConfig,
                      writer: ShardWriter) -> None:
    """The Ray pipeline's two stages, called in this process on each batch."""
    embedder = ImageEmbedder(str(bundle_dir), "cpu", False, os.cpu_count() or 1)
    for start in range(0, todo.num_rows, config.batch_size):
        block = todo.slice(start, config.batch_size)
        batch = {"id": block.column("id").to_numpy(), "uri": np.array(block.column("uri").to_pylist(), object),
                 "shard": block.column("shard").to_numpy()}
        writer.add(embedder(decode_batch(batch, preprocess)))


def _embed_with_ray(config: EmbedConfig, bundle_dir: Path, todo: pa.Table, preprocess: PreprocessConfig,
                    writer: ShardWriter) -> int:
    """Runs the Ray pipeline over the entries to embed; returns the number of encoder actors."""
    import ray

    started = connect_ray(config.ray.address, config.ray.num_cpus)
    try:
        return _run_pipeline(config, bundle_dir, todo, preprocess, writer)
    finally:
        if started:  # a cluster this job started ends with it; a caller's or a submitted job's stays
            ray.shutdown()


def _run_pipeline(config: EmbedConfig, bundle_dir: Path, todo: pa.Table, preprocess: PreprocessConfig,
                  writer: ShardWriter) -> int:
    import ray

    num_actors = _pool_size(config, ray.cluster_resources())
    blocks = [todo.slice(i, config.batch_size) for i in range(0, todo.num_rows, config.batch_size)]
    context = ray.data.DataContext.get_current()
    # In-order output lets the driver finish shards one after another, holding about one shard in memory.
    context.execution_options.preserve_order = True
    context.enable_progress_bars = sys.stderr.isatty()
    ds = ray.data.from_arrow(blocks).map_batches(decode_batch, fn_kwargs={"preprocess": preprocess},
                                                 batch_size=None, batch_format="numpy")
    providers, use_gpu = actor_providers(config)
    ds = ds.map_batches(
        ImageEmbedder, batch_size=config.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"bundle_dir": str(bundle_dir), "providers": providers, "require_gpu": use_gpu,
                               "threads": config.cpus_per_actor},
        compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=config.cpus_per_actor,
        num_gpus=config.num_gpus if use_gpu else None)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        writer.add(batch)
    return num_actors


def _pool_size(config: EmbedConfig, resources: dict[str, float]) -> int:
    """The number of actors; fails now on requests the cluster cannot meet (Ray would wait for them forever)."""
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    if config.num_gpus > 0:
        n = config.num_actors or int(gpus // config.num_gpus)
        if n == 0 or n * config.num_gpus > gpus:
            raise EmbedError(f"num_gpus={config.num_gpus:g} per actor x {max(n, 1)} actors needs "
                             f"{max(n, 1) * config.num_gpus:g} GPUs, but the Ray cluster has {gpus:g}; set "
                             "num_gpus: 0 to embed on CPUs")
    else:
        n = config.num_actors or int(cpus // config.cpus_per_actor)
    if n == 0 or n * config.cpus_per_actor > cpus:
        raise EmbedError(f"cpus_per_actor={config.cpus_per_actor} x {max(n, 1)} actors needs "
                         f"{max(n, 1) * config.cpus_per_actor} CPUs, but the Ray cluster has {cpus:g}; lower them")
    log.info("%d encoder actor(s), %d CPU(s)%s each", n, config.cpus_per_actor,
             f" and {config.num_gpus:g} GPU" if config.num_gpus else "")
    return n


def _write_shard(run_dir: Path, k: int, parts: list[dict[str, np.ndarray]], manifest: dict[str, Any]) -> None:
    rows = {key: np.concatenate([p[key] for p in parts]) for key in ROW_KEYS}
    failed = np.array([bool(e) for e in rows["error"]], dtype=bool)
    ok = ~failed
    uris = [str(u) for u in rows["uri"]]
    name = shards.shard_name(k)
    table = shards.embedding_table(rows["id"][ok], [u for u, good in zip(uris, ok) if good],
                                   rows["embedding"][ok], manifest["bundle_id"])
    info = shards.write_parquet_atomic(table, run_dir / name)
    errors_path = run_dir / shards.SHARD_ERRORS_DIR / name
    errors_info = None
    if failed.any():
        errors = shards.error_table(rows["id"][failed], [u for u, bad in zip(uris, failed) if bad],
                                    [str(e) for e in rows["error"][failed]])
        errors_info = shards.write_parquet_atomic(errors, errors_path)
        for uri, reason in zip(errors.column("uri").to_pylist()[:5], errors.column("reason").to_pylist()):
            log.warning("skipped %s: %s", uri, reason)
    else:
        errors_path.unlink(missing_ok=True)  # a killed earlier attempt may have left one
    shards.record_shard(manifest, name, info, errors_info)
    shards.write_manifest(run_dir, manifest)
    log.info("shard %s: %d rows, %d errors (%d/%d shards)", name, info["rows"], int(failed.sum()),
             len(manifest["shards"]), manifest["num_shards"])


def _finish(run_dir: Path, manifest: dict[str, Any], this_run: dict[str, Any]) -> None:
    tables = [pq.read_table(run_dir / shards.SHARD_ERRORS_DIR / name)
              for name, info in sorted(manifest["shards"].items()) if info["errors"]]
    errors = pa.concat_tables(tables).sort_by("id") if tables else shards.ERROR_SCHEMA.empty_table()
    manifest["errors_file"] = {shards.ERRORS: shards.write_parquet_atomic(errors, run_dir / shards.ERRORS)}
    manifest["last_run"] = this_run
    manifest["complete"] = True
    shards.write_manifest(run_dir, manifest)


def _publish(run_dir: Path, keep: int) -> None:
    """Point CURRENT at the snapshot, then delete complete snapshots beyond the `keep` newest (CURRENT and the
    one before it are always kept; incomplete ones are left to be resumed)."""
    base = run_dir.parent
    if follow_current(base, EmbedError) != run_dir:
        publish_current(run_dir)
        log.info("embedding snapshot %s is now CURRENT of %s", run_dir.name, base)
    complete = []
    for path in base.iterdir():
        if path.is_dir() and not path.name.startswith("."):
            manifest = shards.read_manifest(path)
            if manifest is not None and manifest.get("complete"):
                complete.append(((path / shards.MANIFEST).stat().st_mtime_ns, path))
    for _, path in sorted(complete, reverse=True)[max(keep, 2):]:
        if path != run_dir:
            log.info("removing embedding snapshot %s (keep_snapshots=%d)", path, keep)
            shutil.rmtree(path)

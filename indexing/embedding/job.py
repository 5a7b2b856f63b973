"""The catalog embedding job: a catalog + a model bundle -> an embedding snapshot (Parquet shards, errors table,
manifest), made incrementally from the previous snapshot.

Its one command line is `cirflow embed --config FILE [key.path=value ...]` (flows/cli.py), locally or as the
entrypoint of a job submitted to a Ray cluster (docs/catalogs-and-indexes.md); `run_embed` is the entry point for code.

    embeddings/<catalog>/<bundle_id>/<snapshot_id>/   one state of the catalog (indexing/embedding/shards.py has the format)
    embeddings/<catalog>/<bundle_id>/CURRENT          the latest complete snapshot

A snapshot's id hashes the catalog's (id, uri, version) rows and metadata columns (indexing/embedding/catalog.py) and the shard
size, so an unchanged catalog finds its finished snapshot and does nothing. A changed one gets a new snapshot,
made from the CURRENT one: entries with the same id, uri and version keep their vector (copied, byte for byte) or
their errors row, new and changed entries are embedded, removed ones are left out. A change of metadata alone
(a category renamed) thus makes a new snapshot that embeds nothing: its catalog.parquet carries the new
metadata to the index built from it. The snapshot moves CURRENT when complete; the older ones stay
(`keep_snapshots`) and are never modified.

An image that could not be read for a reason of the moment (a 503, a timeout, a node without s3fs: the rule is
in indexing/embedding/embed_stages.py) is retried in the worker (`read_retries`, `retry_backoff_seconds`) and, still failing, is an
errors row marked transient (manifest["transient_errors"] counts them). Such a row is never carried over: a
refresh reads it again, and an unchanged catalog whose snapshot has transient errors is not "nothing to do". As
a complete snapshot is never modified (an index records the snapshot it was built from), the retry makes a new
one, `<snapshot_id>-r1` (then -r2, ... while reads keep failing), from the previous one by the same reuse path:
everything carries over but the transient rows, which are read again and listed in changes.parquet as
"changed" (an index overlay then adds those that now have a vector) and counted in the delta as `retried`.
`snapshot_location` names the directory a run completes; `run_embed` returns it.

The driver lists the catalog, plans the reuse and writes the snapshot's catalog.parquet (one row group per
shard) and manifest; the shards are built by workers, a pool of Ray actors (indexing/embedding/embed_stages.py
ShardBuilder, one bundle runtime each) handed one shard at a time. A worker reads its shard's rows from
catalog.parquet, copies the unchanged entries' vectors from the previous snapshot, reads, decodes and embeds the
others, and writes the shard's files itself (temp name, rename) into the snapshot directory, which every node
sees (a shared filesystem); it returns only the files' size and sha256, which the driver records in the
manifest. No pixel or vector passes through the driver. An actor lost with its node gives its shard back to the
others. A delta smaller than `local_below` images is built in this process with the same code instead:
starting a Ray instance costs more than it does. Shards are cut from the id-sorted catalog (indexing/embedding/shards.py),
so a rerun after a kill redoes only the unfinished shards and ends with exactly the same rows. Every start
checks the files the manifest records (size and sha256) and redoes the
shards whose files were deleted or changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa

from cirflow.core.config import check_non_negative, check_positive, to_dict
from cirflow.core.files import check_files, follow_current, location, publish_current, remove_tree
from cirflow.core.ray_local import check_job_paths, connect_ray
from cirflow.export.manifest import read_preprocess, resolve_bundle_dir, verify_bundle
from cirflow.indexing.embedding import shards
from cirflow.indexing.embedding.catalog import CatalogConfig, fingerprint, load_catalog, metadata_fields
from cirflow.indexing.embedding.embed_stages import ShardBuilder, ShardJob, compare_rows, limits_changed
from cirflow.models.images import ImageLimits

if TYPE_CHECKING:
    from cirflow.core.files import Location

log = logging.getLogger(__name__)

# What `providers` may name: the GPU execution provider of actors given a GPU (export.runtime.PROVIDERS).
GPU_PROVIDER_CHOICES = ("auto", "cuda", "tensorrt")
RETRY_SEP = "-r"  # snapshot <snapshot_id>-r<n>: the n-th retry of a catalog state's transient errors


class EmbedError(ValueError):
    """The job cannot run as configured (resources, a changed catalog, a lost shard); the message says why."""


@dataclass(frozen=True)
class RayConfig:
    # None: RAY_ADDRESS (set by `ray job submit`), else a new local instance bound to 127.0.0.1 (core/ray_local.py).
    address: str | None = None
    num_cpus: int | None = None  # CPUs of a new local cluster (None: all of this machine's)


@dataclass(frozen=True)
class EmbedConfig:
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    bundle: str = ""  # model bundle directory (export stage), or a bundles directory whose CURRENT names one
    workdir: str = "workdir"  # the run goes to WORKDIR/embeddings/<catalog.name>/<bundle_id>/
    rows_per_shard: int = 8192  # resume granularity; ~4 MB of Parquet per shard at 128 dims
    batch_size: int = 64  # images per encoder call (a worker reads and decodes a batch, then encodes it)
    # Encoder actors (workers), each holding one bundle runtime and building one shard at a time; 0: as many as
    # the cluster's CPUs (or GPUs, with num_gpus) allow, at most one per unfinished shard.
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
    # A read that failed for a reason of the moment (indexing/embedding/embed_stages.py) is tried again this many times, after
    # retry_backoff_seconds, then twice that, ...: 0.5 + 1 + 2 s rides out a throttled or restarting store
    # without holding a batch for long; still failing, it is retried by the next run.
    read_retries: int = 3
    retry_backoff_seconds: float = 0.5
    # What the image gate (models/images.py) lets through: at most max_bytes per file (a larger one is refused
    # before it is read), max_pixels per picture (refused from its header), only these formats. A refused image
    # is an errors row.
    images: ImageLimits = field(default_factory=ImageLimits)

    def __post_init__(self) -> None:
        check_positive(self, "rows_per_shard", "batch_size", "cpus_per_actor", "keep_snapshots")
        check_non_negative(self, "num_actors", "num_gpus", "local_below", "read_retries", "retry_backoff_seconds")
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


def run_embed(config: EmbedConfig) -> Location:
    """Embed the catalog's current state (resuming an interrupted run, reusing the previous snapshot's vectors,
    reading again the entries whose read failed transiently); returns the snapshot directory it completed
    (`snapshot_location`), which is then CURRENT."""
    if not config.bundle:
        raise EmbedError("bundle is not set: give the model bundle directory (cirflow export --out ...)")
    check_job_paths({"workdir": config.workdir, "bundle": config.bundle, "catalog.folder": config.catalog.folder,
                     "catalog.manifest": config.catalog.manifest})
    # Resolved once: a bundles directory's CURRENT re-pointed mid-job must not change what the actors load.
    bundle_dir = resolve_bundle_dir(Path(config.bundle)).resolve()
    bundle = verify_bundle(bundle_dir)
    read_preprocess(bundle_dir)  # a bad preprocess.json fails here, not in every worker
    catalog = load_catalog(config.catalog)
    base = _output(config.workdir) / "embeddings" / config.catalog.name / bundle["bundle_id"]
    if (base / shards.MANIFEST).exists():
        raise EmbedError(f"{base} holds an embedding snapshot of an older cirflow (no snapshots); delete it to embed "
                         "the catalog again")
    snapshot_dir, retried = _target(base, snapshot_id(catalog, config.rows_per_shard, config.images))
    snapshot = snapshot_dir.name
    num_shards = math.ceil(catalog.num_rows / config.rows_per_shard)
    described = {"name": config.catalog.name, "source": config.catalog.source, "entries": catalog.num_rows,
                 "fingerprint": fingerprint(catalog), "snapshot": snapshot}
    fields = metadata_fields(catalog.schema)
    if fields:
        described["metadata_fields"] = fields
    previous = _previous_snapshot(base, snapshot_dir, retried)
    reuse = Reuse.plan(catalog, previous, config.images)
    manifest = _resume_or_start(snapshot_dir, bundle, described, config.rows_per_shard, num_shards, catalog, reuse,
                                config.images)
    if manifest["complete"]:
        log.info("embedding snapshot %s is complete (%d rows, %d errors); nothing to do", snapshot_dir, manifest["rows"],
                 manifest["errors"])
        _publish(snapshot_dir, config.keep_snapshots)
        return snapshot_dir
    pending = [k for k in range(num_shards) if shards.shard_name(k) not in manifest["shards"]]
    tasks = [(k, k * config.rows_per_shard, min((k + 1) * config.rows_per_shard, catalog.num_rows))
             for k in pending]
    count = sum(int((~reuse.carried[lo:hi]).sum()) for _, lo, hi in tasks)
    log.info("snapshot %s of catalog %r (%d entries): %s; %d of %d shards to write, %d images to embed", snapshot,
             config.catalog.name, catalog.num_rows, _delta_text(manifest["delta"]), len(pending), num_shards, count)
    job = ShardJob(str(snapshot_dir), str(reuse.previous) if reuse.previous else None, str(bundle_dir),
                   bundle["bundle_id"], int(bundle["embed_dim"]), config.batch_size,
                   read_retries=config.read_retries, retry_backoff_seconds=config.retry_backoff_seconds,
                   images=config.images)
    started = time.perf_counter()
    record = partial(_record, snapshot_dir, manifest)  # called with each shard a worker wrote
    if not tasks:  # every shard was written by an earlier attempt, which stopped before finishing the run
        where, actors, nodes = "none", 0, 0
    elif _in_process(config, count):
        where, actors, nodes = "in-process", 1, 1
        _build_in_process(job, tasks, record)
    else:
        where = "ray"
        actors, nodes = _build_with_ray(config, job, tasks, record)
    missing = sorted(k for k in pending if shards.shard_name(k) not in manifest["shards"])
    if missing:
        raise EmbedError(f"shards {missing} of {snapshot_dir} were not written; rerun to redo them")
    seconds = time.perf_counter() - started
    this_run = {"config": to_dict(config), "bundle_dir": str(bundle_dir), "embedded_by": where, "actors": actors,
                "nodes": nodes, "shards": len(pending), "entries": count, "seconds": round(seconds, 2),
                "entries_per_s": round(count / seconds, 1) if seconds else None}
    _finish(snapshot_dir, manifest, reuse.retried, this_run)
    _publish(snapshot_dir, config.keep_snapshots)
    log.info("embedding snapshot complete: %d rows, %d errors; %d images embedded (%s) in %.1f s", manifest["rows"],
             manifest["errors"], count, where, seconds)
    transient = shards.transient_errors(manifest)
    if transient:
        log.warning("embedding snapshot %s: %d entries could not be read for a reason of the moment (errors rows "
                    "marked transient); the next run reads them again", snapshot_dir.name, transient)
    return snapshot_dir


def _output(workdir: str) -> Location:
    """The workdir as a location, its filesystem reached once: an unknown URI scheme, or one whose fsspec
    package is not installed (s3:// without s3fs), fails here with the setting's name."""
    try:
        root = location(workdir)
        root.exists()
    except (ValueError, ImportError) as e:
        raise EmbedError(f"workdir={workdir!r} cannot be used: {e}") from e
    return root


def snapshot_id(catalog: pa.Table, rows_per_shard: int, images: ImageLimits = ImageLimits()) -> str:
    """The id of a catalog state: its (id, uri, version) rows, metadata and the shard size, and the image gate's
    limits where they are not the defaults (other limits may admit other files: another snapshot, whose errors
    rows are read again). Its first snapshot's directory has this name; the retries of its transient errors are
    `<id>-r1`, `<id>-r2`, ... (snapshot_location)."""
    key = f"{fingerprint(catalog)}/{rows_per_shard}"
    if images != ImageLimits():  # the defaults add nothing: snapshots named before limits existed keep their names
        key += "/" + json.dumps(to_dict(images), sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def snapshot_location(base: Location | str, catalog: pa.Table, rows_per_shard: int,
                 images: ImageLimits = ImageLimits()) -> Location:
    """The snapshot directory that `run_embed` completes for this catalog state under `base`
    (WORKDIR/embeddings/<catalog>/<bundle_id>): the state's complete snapshot without transient errors when
    there is one, else the one to make or resume (the first, or the next retry)."""
    return _target(location(base), snapshot_id(catalog, rows_per_shard, images))[0]


def _target(base: Location, snapshot: str) -> tuple[Location, Location | None]:
    """(the directory to complete for catalog state `snapshot`, the snapshot of the same state whose transient
    errors it retries, or None). The walk starts at CURRENT when it is of this state (earlier generations may have
    been pruned), else at the first snapshot, and moves to the next generation past each complete snapshot that
    still has transient errors."""
    current = follow_current(base, EmbedError)
    name = current.name if current is not None and _state_of(current.name) == snapshot else snapshot
    retried = None
    while True:
        snapshot_dir = base / name
        manifest = shards.read_manifest(snapshot_dir)
        if manifest is None or not manifest["complete"] or not shards.transient_errors(manifest):
            return snapshot_dir, retried
        retried, name = snapshot_dir, f"{snapshot}{RETRY_SEP}{_generation(name) + 1}"


def _state_of(name: str) -> str:
    return name.split(RETRY_SEP, 1)[0]


def _generation(name: str) -> int:
    _, _, n = name.partition(RETRY_SEP)
    return int(n) if n.isdigit() else 0


def _previous_snapshot(base: Location, snapshot_dir: Location, retried: Location | None) -> shards.EmbeddingSnapshot | None:
    """The snapshot to reuse vectors from, verified: the one whose transient errors `snapshot_dir` retries, else
    CURRENT; None when there is none (or it is damaged: then everything is embedded again, with a warning)."""
    current = retried or follow_current(base, EmbedError)
    if current is None or current == snapshot_dir:
        return None
    try:
        return shards.open_snapshot(current)
    except shards.EmbeddingsError as e:
        log.warning("previous snapshot %s cannot be reused (%s); embedding every entry", current, e)
        return None


@dataclass(frozen=True)
class Reuse:
    """What a new snapshot takes from the previous one: for each catalog row (id order) whether its vector or
    errors row carries over (the workers do the carrying, shard by shard: embed_stages.PreviousSnapshot). An
    unchanged row whose previous read failed transiently does not: it is `retried`, and listed as changed."""

    carried: np.ndarray  # (N,) bool over the new catalog's rows
    delta: dict[str, Any]
    changes: pa.Table  # id, change (added, changed, removed): what an index of the previous snapshot must update
    previous: Location | None  # the previous snapshot's directory
    retried: np.ndarray  # the ids read again for their transient failure (sorted); in `changes` as "changed"

    @classmethod
    def plan(cls, catalog: pa.Table, previous: shards.EmbeddingSnapshot | None, images: ImageLimits) -> Reuse:
        n = catalog.num_rows
        if previous is not None and not (previous.snapshot_dir / shards.CATALOG).is_file():
            log.warning("previous snapshot %s has no %s; embedding every entry", previous.snapshot_dir, shards.CATALOG)
            previous = None
        if previous is None:
            return cls(np.zeros(n, bool), {"previous": None, "added": n, "changed": 0, "removed": 0,
                                           "unchanged": 0, "reused_vectors": 0, "reused_errors": 0, "retried": 0},
                       _changes([], [], []), None, np.zeros(0, np.int64))
        old = shards.read_table(previous.snapshot_dir / shards.CATALOG, columns=["id", "uri", "version"]).sort_by("id")
        present, same = compare_rows(catalog, old)
        new_ids, old_ids = catalog.column("id").to_numpy(), old.column("id").to_numpy()
        failed = shards.read_errors(previous.snapshot_dir / shards.ERRORS)
        transient = failed.column("transient").to_numpy()
        failed_ids = failed.column("id").to_numpy()
        if limits_changed(previous.manifest, images):  # every errors row is read again (limits_changed)
            transient = np.ones(len(failed_ids), bool)
        retry = same & np.isin(new_ids, failed_ids[transient])
        reused_errors = int((same & np.isin(new_ids, failed_ids[~transient])).sum())
        removed = np.setdiff1d(old_ids, new_ids)
        delta = {"previous": previous.snapshot_dir.name, "added": int((~present).sum()),
                 "changed": int((present & ~same).sum()), "removed": len(removed),
                 "unchanged": int(same.sum()), "reused_vectors": int(same.sum()) - reused_errors - int(retry.sum()),
                 "reused_errors": reused_errors, "retried": int(retry.sum())}
        changes = _changes(new_ids[~present], new_ids[(present & ~same) | retry], removed)
        return cls(same & ~retry, delta, changes, previous.snapshot_dir, np.sort(new_ids[retry]))


def _changes(added: Any, changed: Any, removed: Any) -> pa.Table:
    ids = np.concatenate([np.asarray(x, np.int64) for x in (added, changed, removed)])
    kinds = ["added"] * len(added) + ["changed"] * len(changed) + ["removed"] * len(removed)
    return pa.table({"id": pa.array(ids, pa.int64()), "change": pa.array(kinds, pa.string())}).sort_by("id")


def _delta_text(delta: dict[str, Any]) -> str:
    if delta["previous"] is None:
        return "no previous snapshot, every entry is new"
    return (f"against {delta['previous']}: {delta['added']} added, {delta['changed']} changed, {delta['removed']} "
            f"removed, {delta['unchanged']} unchanged ({delta['reused_vectors']} vectors and "
            f"{delta['reused_errors']} errors rows reused, {delta.get('retried', 0)} transient failures read again)")


def _resume_or_start(snapshot_dir: Location, bundle: dict[str, Any], catalog: dict[str, Any], rows_per_shard: int,
                     num_shards: int, table: pa.Table, reuse: Reuse, images: ImageLimits) -> dict[str, Any]:
    manifest = shards.read_manifest(snapshot_dir)
    if manifest is None:
        snapshot_dir.mkdir(parents=True, exist_ok=True)
        # One row group per shard: a worker reads its shard's entries alone (shards.read_rows).
        catalog_file = shards.write_parquet_atomic(table, snapshot_dir / shards.CATALOG, row_group_size=rows_per_shard)
        manifest = shards.new_manifest(bundle["bundle_id"], int(bundle["embed_dim"]), catalog, rows_per_shard,
                                       num_shards, reranks="reranker" in bundle)
        manifest["catalog_file"] = {shards.CATALOG: catalog_file}
        manifest["changes_file"] = {shards.CHANGES: shards.write_parquet_atomic(reuse.changes,
                                                                               snapshot_dir / shards.CHANGES)}
        manifest["delta"] = reuse.delta
        manifest["images"] = to_dict(images)  # what the gate let through: limits_changed compares the next run's
        shards.write_manifest(snapshot_dir, manifest)
        return manifest
    before = (manifest["catalog"]["fingerprint"], manifest["catalog"]["entries"], manifest["rows_per_shard"])
    if before != (catalog["fingerprint"], catalog["entries"], rows_per_shard):
        raise EmbedError(f"{snapshot_dir} holds a snapshot of a different catalog state or shard size (fingerprint, "
                         f"entries, rows_per_shard {before} != "
                         f"{(catalog['fingerprint'], catalog['entries'], rows_per_shard)}); delete it")
    _drop_damaged(snapshot_dir, manifest)
    log.info("resuming %s: %d of %d shards already done", snapshot_dir, len(manifest["shards"]), num_shards)
    return manifest


def _drop_damaged(snapshot_dir: Location, manifest: dict[str, Any]) -> None:
    """Reopen what a rerun would otherwise trust blindly: recorded shards whose files were deleted or changed are
    dropped (to be redone), and a complete run whose errors.parquet is damaged is merged again. Every file is
    hashed: that costs seconds per GB, far less than embedding its rows did."""
    damaged = shards.damaged_shards(snapshot_dir, manifest)
    for name, problem in damaged.items():
        log.warning("embedding snapshot %s: %s; redoing shard %s", snapshot_dir, problem, name)
        shards.drop_shard(manifest, name)
    problem = manifest["complete"] and check_files(snapshot_dir, manifest["errors_file"])
    if problem:
        log.warning("embedding snapshot %s: %s; writing it again", snapshot_dir, problem)
        manifest["complete"] = False
    if damaged or problem:
        shards.write_manifest(snapshot_dir, manifest)


def _in_process(config: EmbedConfig, count: int) -> bool:
    """Small CPU deltas skip Ray when this job would start its own instance (a cluster given is always used,
    and so is Ray when GPUs are asked for: it is what hands them out)."""
    joining = config.ray.address is not None or bool(os.environ.get("RAY_ADDRESS"))
    return not joining and config.num_gpus == 0 and count < config.local_below


def _build_in_process(job: ShardJob, tasks: list[tuple[int, int, int]],
                      record: Callable[[dict[str, Any]], None]) -> None:
    """The workers' code, called in this process shard after shard, with every core for ONNX Runtime."""
    builder = ShardBuilder(replace(job, threads=os.cpu_count() or 1))
    for task in tasks:
        record(builder(*task))


def _build_with_ray(config: EmbedConfig, job: ShardJob, tasks: list[tuple[int, int, int]],
                    record: Callable[[dict[str, Any]], None]) -> tuple[int, int]:
    """Builds the shards on a pool of Ray actors (ShardBuilder); returns the number of actors and of the nodes
    they ran on."""
    import ray

    started = connect_ray(config.ray.address, config.ray.num_cpus)
    try:
        num_actors = min(_pool_size(config, ray.cluster_resources()), len(tasks))
        providers, use_gpu = actor_providers(config)
        job = replace(job, providers=providers, require_gpu=use_gpu, threads=config.cpus_per_actor)
        # SPREAD: one actor per node first, so that every node's CPUs (and local disk cache) take part. No
        # restarts: an actor lost with its node would wait for resources that may never come back; its shard
        # goes to the surviving actors instead (_dispatch).
        worker = ray.remote(ShardBuilder).options(num_cpus=config.cpus_per_actor,
                                                  num_gpus=config.num_gpus if use_gpu else 0,
                                                  scheduling_strategy="SPREAD", max_restarts=0)
        actors = [worker.remote(job) for _ in range(num_actors)]
        nodes = ray.get([actor.node.remote() for actor in actors])
        log.info("%d encoder actor(s) on %d node(s)", num_actors, len(set(nodes)))
        _dispatch(actors, tasks, record)
        return num_actors, len(set(nodes))
    finally:
        if started:  # a cluster this job started ends with it; a caller's or a submitted job's stays
            ray.shutdown()


def _dispatch(actors: list[Any], tasks: list[tuple[int, int, int]], record: Callable[[dict[str, Any]], None]) -> None:
    """Hand shards to idle actors one at a time (a fast actor takes more, a slow one holds up one shard only)
    and record each as it finishes. An actor that dies (its node lost, its process killed) gives its shard back
    to the others; with none left the job fails and a rerun redoes the unfinished shards."""
    import ray
    from ray.exceptions import RayActorError

    queue, idle = deque(tasks), list(actors)
    running: dict[Any, tuple[Any, tuple[int, int, int]]] = {}
    lost: list[str] = []
    while queue or running:
        while queue and idle:
            actor, task = idle.pop(), queue.popleft()
            running[actor.__call__.remote(*task)] = (actor, task)
        if not running:
            raise EmbedError(f"every encoder actor died ({'; '.join(lost[-3:])}); {len(queue)} shards are "
                             "unfinished: rerun to redo them")
        [ref], _ = ray.wait(list(running), num_returns=1)
        actor, task = running.pop(ref)
        try:
            result = ray.get(ref)
        except RayActorError as e:
            lost.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
            log.warning("encoder actor lost while building shard %d (%s); giving the shard to the others",
                        task[0], lost[-1])
            queue.appendleft(task)
            continue
        idle.append(actor)
        record(result)


def _record(snapshot_dir: Location, manifest: dict[str, Any], result: dict[str, Any]) -> None:
    """A worker wrote a shard's files: add them to the manifest (a rerun then skips the shard)."""
    for uri, reason in result["first_errors"]:
        # %r: a catalog's file name (and a reason naming it) may hold a newline or other control characters, which
        # would forge log lines
        log.warning("skipped %r: %r", uri, reason)
    shards.record_shard(manifest, result["name"], result["info"], result["errors_info"], result["transient"])
    shards.write_manifest(snapshot_dir, manifest)
    errors = result["errors_info"]["rows"] if result["errors_info"] else 0
    log.info("shard %s: %d rows, %d errors, %d embedded (%d/%d shards)", result["name"], result["info"]["rows"],
             errors, result["embedded"], len(manifest["shards"]), manifest["num_shards"])


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


def _finish(snapshot_dir: Location, manifest: dict[str, Any], retried: np.ndarray, this_run: dict[str, Any]) -> None:
    """Merge the shards' errors files, take the entries whose retry failed again out of changes.parquet (they
    have no vector in either snapshot: an index has nothing to update for them), mark the snapshot complete."""
    tables = [shards.read_errors(snapshot_dir / shards.SHARD_ERRORS_DIR / name)
              for name, info in sorted(manifest["shards"].items()) if info["errors"]]
    errors = pa.concat_tables(tables).sort_by("id") if tables else shards.ERROR_SCHEMA.empty_table()
    failed_again = np.intersect1d(retried, errors.column("id").to_numpy())
    if len(failed_again):  # idempotent: a rerun after a kill filters the filtered file again
        changes = shards.read_table(snapshot_dir / shards.CHANGES)
        changes = changes.filter(pa.array(~np.isin(changes.column("id").to_numpy(), failed_again)))
        manifest["changes_file"] = {shards.CHANGES: shards.write_parquet_atomic(changes, snapshot_dir / shards.CHANGES)}
    manifest["errors_file"] = {shards.ERRORS: shards.write_parquet_atomic(errors, snapshot_dir / shards.ERRORS)}
    manifest["last_run"] = this_run
    manifest["completed_at"] = time.time()  # orders the snapshots for keep_snapshots (any storage)
    manifest["complete"] = True
    shards.write_manifest(snapshot_dir, manifest)


def _publish(snapshot_dir: Location, keep: int) -> None:
    """Point CURRENT at the snapshot, then delete complete snapshots beyond the `keep` newest (CURRENT and the
    one before it are always kept; incomplete ones are left to be resumed)."""
    base = snapshot_dir.parent
    if follow_current(base, EmbedError) != snapshot_dir:
        publish_current(snapshot_dir)
        log.info("embedding snapshot %s is now CURRENT of %s", snapshot_dir.name, base)
    complete = []
    for path in base.iterdir():
        if path.is_dir() and not path.name.startswith("."):
            manifest = shards.read_manifest(path)
            if manifest is not None and manifest.get("complete"):
                # Snapshots of an older cirflow have no completed_at: their manifest's mtime (local ones).
                done = manifest.get("completed_at") or ((path / shards.MANIFEST).stat().st_mtime
                                                        if isinstance(path, Path) else 0.0)
                complete.append((done, path.name, path))
    for _, _, path in sorted(complete, reverse=True)[max(keep, 2):]:
        if path != snapshot_dir:
            log.info("removing embedding snapshot %s (keep_snapshots=%d)", path, keep)
            remove_tree(path)

"""The catalog embedding job: a catalog + a model bundle -> Parquet embedding shards, an errors table, a manifest.

Its one command line is `cirflow embed --config FILE [key.path=value ...]` (flows/cli.py), locally or as the
entrypoint of a job submitted to a Ray cluster (README.md); `run_embed` is the entry point for code.

Ray Data reads and decodes in tasks, and embeds in a fixed pool of actors (one bundle runtime each); the
driver gathers each shard's rows and writes the shard (temp name, rename) once every entry of it is accounted
for, embedded or recorded as an error. Shards are cut from the id-sorted catalog (indexing/shards.py), so a
rerun after a kill redoes only the unfinished shards and ends with exactly the same rows. Every start checks
the files the manifest records (size and sha256) and redoes the shards whose files were deleted or changed.
"""

from __future__ import annotations

import logging
import math
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
from cirflow.core.files import check_files
from cirflow.export.manifest import read_preprocess, resolve_bundle_dir, verify_bundle
from cirflow.indexing import shards
from cirflow.indexing.catalog import CatalogConfig, fingerprint, load_catalog
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

    def __post_init__(self) -> None:
        check_positive(self, "rows_per_shard", "batch_size", "cpus_per_actor")
        check_non_negative(self, "num_actors", "num_gpus")
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
    """Embed the catalog (resuming an interrupted run); returns the run directory."""
    if not config.bundle:
        raise EmbedError("bundle is not set: give the model bundle directory (cirflow export --out ...)")
    check_job_paths({"workdir": config.workdir, "bundle": config.bundle, "catalog.folder": config.catalog.folder,
                     "catalog.manifest": config.catalog.manifest})
    # Resolved once: a bundles directory's CURRENT re-pointed mid-job must not change what the actors load.
    bundle_dir = resolve_bundle_dir(Path(config.bundle)).resolve()
    bundle = verify_bundle(bundle_dir)
    preprocess = read_preprocess(bundle_dir)
    catalog = load_catalog(config.catalog)
    run_dir = Path(config.workdir) / "embeddings" / config.catalog.name / bundle["bundle_id"]
    num_shards = math.ceil(catalog.num_rows / config.rows_per_shard)
    described = {"name": config.catalog.name, "source": config.catalog.source, "entries": catalog.num_rows,
                 "fingerprint": fingerprint(catalog)}
    manifest = _resume_or_start(run_dir, bundle, described, config.rows_per_shard, num_shards)
    if manifest["complete"]:
        log.info("embedding run %s is complete (%d rows, %d errors); nothing to do", run_dir, manifest["rows"],
                 manifest["errors"])
        return run_dir
    pending = [k for k in range(num_shards) if shards.shard_name(k) not in manifest["shards"]]
    log.info("embedding %d of %d shards of catalog %r (%d entries) into %s", len(pending), num_shards,
             config.catalog.name, catalog.num_rows, run_dir)
    started = time.perf_counter()
    # Nothing pending: only the merged errors table is missing or damaged, which needs no Ray.
    rows, actors = _embed_shards(config, bundle_dir, catalog, pending, preprocess, run_dir,
                                 manifest) if pending else (0, 0)
    seconds = time.perf_counter() - started
    _finish(run_dir, manifest, {"config": to_dict(config), "bundle_dir": str(bundle_dir), "actors": actors,
                                "shards": len(pending), "entries": rows, "seconds": round(seconds, 2),
                                "entries_per_s": round(rows / seconds, 1) if seconds else None})
    log.info("embedding run complete: %d rows, %d errors, %.1f s (%.1f entries/s this run)", manifest["rows"],
             manifest["errors"], seconds, rows / max(seconds, 1e-9))
    return run_dir


def _resume_or_start(run_dir: Path, bundle: dict[str, Any], catalog: dict[str, Any], rows_per_shard: int,
                     num_shards: int) -> dict[str, Any]:
    manifest = shards.read_manifest(run_dir)
    if manifest is None:
        manifest = shards.new_manifest(bundle["bundle_id"], int(bundle["embed_dim"]), catalog, rows_per_shard,
                                       num_shards)
        shards.write_manifest(run_dir, manifest)
        return manifest
    before = (manifest["catalog"]["fingerprint"], manifest["catalog"]["entries"], manifest["rows_per_shard"])
    if before != (catalog["fingerprint"], catalog["entries"], rows_per_shard):
        raise EmbedError(f"{run_dir} holds a run of a different catalog or shard size (fingerprint, entries, "
                         f"rows_per_shard {before} != {(catalog['fingerprint'], catalog['entries'], rows_per_shard)}"
                         "); use another workdir or catalog name, or delete the old run")
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


def _embed_shards(config: EmbedConfig, bundle_dir: Path, catalog: pa.Table, pending: list[int],
                  preprocess: PreprocessConfig, run_dir: Path, manifest: dict[str, Any]) -> tuple[int, int]:
    """Runs the pipeline over the pending shards; returns (catalog entries processed, encoder actors)."""
    import ray

    started = connect_ray(config.ray.address, config.ray.num_cpus)
    try:
        return _run_pipeline(config, bundle_dir, catalog, pending, preprocess, run_dir, manifest)
    finally:
        if started:  # a cluster this job started ends with it; a caller's or a submitted job's stays
            ray.shutdown()


def _run_pipeline(config: EmbedConfig, bundle_dir: Path, catalog: pa.Table, pending: list[int],
                  preprocess: PreprocessConfig, run_dir: Path, manifest: dict[str, Any]) -> tuple[int, int]:
    import ray

    num_actors = _pool_size(config, ray.cluster_resources())
    per_shard = config.rows_per_shard
    parts = [catalog.slice(k * per_shard, per_shard) for k in pending]
    table = pa.concat_tables([p.append_column("shard", pa.array(np.full(p.num_rows, k, np.int64)))
                              for k, p in zip(pending, parts)])
    expected = {k: p.num_rows for k, p in zip(pending, parts)}
    blocks = [table.slice(i, config.batch_size) for i in range(0, table.num_rows, config.batch_size)]

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

    buffers: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
    seen: dict[int, int] = defaultdict(int)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in np.unique(batch["shard"]).tolist():
            rows = batch["shard"] == k
            buffers[k].append({key: value[rows] for key, value in batch.items()})
            seen[k] += int(rows.sum())
            if seen[k] == expected[k]:
                _write_shard(run_dir, k, buffers.pop(k), manifest)
    lost = {k: (seen[k], n) for k, n in expected.items() if shards.shard_name(k) not in manifest["shards"]}
    if lost:
        raise EmbedError(f"shards {sorted(lost)} came back incomplete (rows seen, expected: {lost}); rerun to "
                         "redo them")
    return table.num_rows, num_actors


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
    rows = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
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


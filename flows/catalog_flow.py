"""The `catalog` flow: snapshot the catalog -> embed what changed (Ray) -> build the index -> validate -> publish.

    catalog(config="configs/catalog_flow.yaml", overrides=["embed.catalog.folder=/shop/images"])

1. The snapshot task lists the catalog with each entry's version (indexing/embedding/catalog.py) and writes it to
   WORKDIR/catalogs/<name>/<fingerprint>.parquet: the embedding job then embeds exactly that state.
2. The embedding job (indexing/embedding/job.py) makes the snapshot's embeddings from the previous snapshot of the same
   bundle: new and changed images are encoded, unchanged vectors copied, removed ids dropped. A new bundle has
   no previous snapshot: everything is embedded, into its own directory. It runs in this process (a local Ray
   instance, or none for a small delta), or as a Ray job on a cluster when `ray_job_address` is set, the same
   entry point as `ray job submit -- cirflow embed`, followed to completion. Images whose read failed for a
   reason of the moment (a timeout, a 503) are retried in the job; still failing, they make the snapshot
   unfinished for this flow, so the next run retries them even when the catalog did not change.
3. The index is built and tuned with the split's composed queries (for a small change: an overlay on the
   published version, indexing/index/refresh.py, while its delta stays under `index_delta_max`), validated
   (indexing/index/validate.py: recall on held-out queries re-measured, ids equal to the catalog's minus its errors
   rows) and only then published as a new version; a failed validation fails the run and leaves the published
   index as it was. After an operator's rollback, a snapshot and bundle that the rolled-back version was built
   from are not indexed or published again (versions.held) until a newer snapshot or bundle comes.

Snapshot, embedding, query encoding and index build are cached on content keys (catalog fingerprint, bundle id,
configs, and where the result is written), so a rerun with nothing changed embeds and builds nothing.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import flow, task

from cirflow.core.config import check_fraction, check_positive, flatten, load_config, to_dict
from cirflow.core.files import follow_current, sha256_file, write_atomic
from cirflow.core.fingerprint import data_fingerprint
from cirflow.export.manifest import resolve_bundle_dir, verify_bundle
from cirflow.export.runtime import BundleRuntime
from cirflow.flows.artifacts import markdown_table, publish_links, publish_markdown
from cirflow.flows.caching import by_key, cache_key, cached, content_key
from cirflow.flows.plots import plot_tuning_sweep
from cirflow.flows.retention import prune_bundles
from cirflow.indexing.embedding import shards
from cirflow.indexing.embedding.catalog import CatalogConfig, fingerprint, load_catalog
from cirflow.indexing.embedding.job import EmbedConfig, EmbedError, run_embed, snapshot_location
from cirflow.indexing.index.plan import IndexConfig
from cirflow.indexing.index.queries import encode_query_split, read_queries, write_queries
from cirflow.indexing.index.refresh import build_or_refresh
from cirflow.indexing.index.validate import validate_index
from cirflow.indexing.index.versions import held, publish
from cirflow.indexing.search.index_store import IndexFormatError, read_manifest, verify_index

log = logging.getLogger(__name__)

RAY_JOB_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class QuerySource:
    """The CIR split whose composed queries tune and validate the index (encoded with the catalog's bundle)."""

    kind: str = "shapes"
    root: str = "workdir/data/shapes"
    split: str = "val"


@dataclass(frozen=True)
class CatalogFlowConfig:
    # The catalog, the bundle ("": the one registered in WORKDIR/bundles), the workdir and the job's settings.
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    queries: QuerySource = field(default_factory=QuerySource)
    index: IndexConfig = field(default_factory=IndexConfig)
    # Publication floor for recall@k on held-out queries, re-measured by validation. Below the tuning target
    # (0.95): the held-out half moves by about a point from the tuning half on a thousand queries.
    min_recall: float = 0.93
    keep_versions: int = 5  # published index versions kept for rollback
    # Model bundles kept in WORKDIR/bundles (newest first; CURRENT and those of kept index versions always), with
    # their embedding snapshots and encoded queries (flows/retention.py)
    keep_bundles: int = 3
    # A refresh updates the published index in place of a rebuild (indexing/index/refresh.py: its files, a delta
    # of new and changed vectors, the ids that died) while delta and dead ids stay under this share of its base;
    # beyond it, or 0, the index is built in full.
    index_delta_max: float = 0.1
    ray_job_address: str | None = None  # e.g. http://127.0.0.1:8265: run the embedding as a job on that cluster

    def __post_init__(self) -> None:
        check_fraction(self, "min_recall", "index_delta_max")
        check_positive(self, "keep_versions", "keep_bundles")
        if "://" in self.embed.workdir:  # pathlib would take it for a local directory named "ftp:"
            raise ValueError(f"embed.workdir={self.embed.workdir!r} is a URI; the catalog flow keeps its work directory "
                             "on a local (or mounted) filesystem: give its path (`cirflow embed` alone writes to a URI)")


class IndexValidationError(RuntimeError):
    """The new index may not be published; the message says why."""


@task
def snapshot_catalog(catalog: CatalogConfig, workdir: str) -> dict[str, Any]:
    """List the catalog with versions; write the state to WORKDIR/catalogs/<name>/<fingerprint>.parquet."""
    table = load_catalog(catalog)
    snapshot = fingerprint(table)
    path = Path(workdir).resolve() / "catalogs" / catalog.name / f"{snapshot}.parquet"
    if not path.is_file():
        write_atomic(path, lambda tmp: pq.write_table(table, tmp))
    log.info("catalog %r: %d entries, state %s", catalog.name, table.num_rows, snapshot)
    return {"path": str(path), "fingerprint": snapshot, "entries": table.num_rows}


@task(cache_key_fn=by_key, persist_result=True)
def embed_snapshot(key: str, config: EmbedConfig, snapshot_dir: str, ray_job_address: str | None) -> str:
    """The job completes `snapshot_dir` (embed.snapshot_location: a catalog state's snapshot, or the retry of its transient
    errors), here or as a Ray job."""
    if ray_job_address:
        _submit_ray_job(config, ray_job_address)
    else:
        snapshot_dir = str(run_embed(config))
    shards.open_snapshot(Path(snapshot_dir), verify=False)  # complete, or the job did not do its work
    return snapshot_dir


@task(cache_key_fn=by_key, persist_result=True)
def encode_queries(key: str, bundle_dir: str, source: QuerySource, out: str) -> str:
    runtime = BundleRuntime.load(Path(bundle_dir), providers="cpu")
    queries = encode_query_split(runtime, source.kind, Path(source.root), source.split)
    return str(write_queries(Path(out), queries, runtime.bundle_id))


@task(cache_key_fn=by_key, persist_result=True)
def build(key: str, snapshot_dir: str, queries: str, config: IndexConfig, indexes: str, previous: str | None,
          max_fraction: float) -> str:
    run = shards.open_snapshot(Path(snapshot_dir))
    return str(build_or_refresh(run, read_queries(Path(queries), run.bundle_id), Path(indexes), config,
                                Path(previous) if previous else None, max_fraction))


@task
def validate(index_dir: str, snapshot_dir: str, queries: str, min_recall: float) -> dict[str, Any]:
    run = shards.open_snapshot(Path(snapshot_dir))
    result = validate_index(Path(index_dir), run, read_queries(Path(queries), run.bundle_id), min_recall)
    if not result.passed:
        raise IndexValidationError(f"index {Path(index_dir).name} not published: " + "; ".join(result.problems))
    return result.as_dict()


@task(retries=2, retry_delay_seconds=1)
def publish_version(index_dir: str, keep: int) -> str:
    return str(publish(Path(index_dir), keep=keep))


@flow(name="catalog", log_prints=True)
def catalog(config: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Refresh a catalog's embeddings and publish a validated index version; returns what it did."""
    cfg = load_config(CatalogFlowConfig, Path(config) if config else None, list(overrides or ()))
    return run_catalog(cfg)


def run_catalog(cfg: CatalogFlowConfig, bundle: str | None = None) -> dict[str, Any]:
    """The flow's body, callable from another flow (pipeline) with a loaded config; `bundle` overrides the
    config's."""
    workdir = Path(cfg.embed.workdir).resolve()
    bundle_dir = resolve_bundle_dir(Path(bundle or cfg.embed.bundle or workdir / "bundles")).resolve()
    bundle_id = verify_bundle(bundle_dir)["bundle_id"]
    snapshot = snapshot_catalog(cfg.embed.catalog, str(workdir))
    # The job embeds the snapshot file, with absolute paths (a Ray job runs in a copy of its working dir).
    job = replace(cfg.embed, bundle=str(bundle_dir), workdir=str(workdir),
                  catalog=CatalogConfig(name=cfg.embed.catalog.name, manifest=snapshot["path"]))
    state = load_catalog(job.catalog)
    snapshot_dir = snapshot_location(workdir / "embeddings" / job.catalog.name / bundle_id, state, job.rows_per_shard,
                           job.images)
    made_before = _run_complete(str(snapshot_dir))  # the same catalog state was embedded by an earlier run
    snapshot_dir = Path(cached(embed_snapshot, _run_complete, key=cache_key(snapshot_dir, to_dict(job), bundle_id),
                          config=job, snapshot_dir=str(snapshot_dir), ray_job_address=cfg.ray_job_address))
    data_key = data_fingerprint(Path(cfg.queries.root))
    queries_key = content_key(bundle_id, to_dict(cfg.queries), data_key)
    queries_out = workdir / "queries" / bundle_id / f"{queries_key[:16]}.parquet"
    queries = cached(encode_queries, lambda q: Path(q).is_file(), key=cache_key(queries_out, queries_key),
                     bundle_dir=str(bundle_dir), source=cfg.queries, out=str(queries_out))
    run_manifest = shards.read_manifest(snapshot_dir)
    delta = run_manifest.get("delta", {})
    encoded = 0 if made_before else run_manifest.get("last_run", {}).get("entries")
    print(f"catalog {job.catalog.name}: snapshot {snapshot_dir.name} made by an earlier run, nothing to embed"
          if made_before else _delta_table(job.catalog.name, snapshot_dir, delta, encoded))
    transient = shards.transient_errors(run_manifest)
    if transient:
        log.warning("catalog %s: %d images could not be read for a reason of the moment (errors.parquet, "
                    "transient); the next run reads them again", job.catalog.name, transient)
    catalog_dir = workdir / "indexes" / job.catalog.name
    hold = held(catalog_dir, snapshot_dir.name, bundle_id)
    if hold is not None:  # an operator rolled back from an index of this very snapshot and bundle
        print(f"index of catalog {job.catalog.name} not published: the rollback of {hold['at']} from "
              f"{hold.get('from')} holds snapshot {snapshot_dir.name} with bundle {bundle_id} back until a newer "
              "snapshot or bundle (cirflow index versions)")
        return {"snapshot": snapshot_dir.name, "snapshot_dir": str(snapshot_dir), "delta": delta, "encoded": encoded,
                "errors": run_manifest["errors"], "transient_errors": transient, "index_dir": None,
                "published": False, "held": hold,
                "bundle_id": bundle_id}
    published = follow_current(catalog_dir, IndexFormatError)
    previous = str(published) if published is not None and published.is_dir() else None
    # Keyed on the snapshot and where its index goes, not on the published version an overlay builds on: an
    # overlay is a whole index of its snapshot, whichever version it was made on, so a rerun of the same snapshot
    # reuses it. A rollback is honoured by the hold above, before this cache is asked.
    index_key = cache_key(catalog_dir, snapshot_dir.name, bundle_id, sha256_file(Path(queries)), to_dict(cfg.index),
                          cfg.index_delta_max)
    index_dir = cached(build, _index_ok, key=index_key, snapshot_dir=str(snapshot_dir), queries=queries, config=cfg.index,
                       indexes=str(workdir / "indexes"), previous=previous, max_fraction=cfg.index_delta_max)
    index_manifest = read_manifest(Path(index_dir))
    checked = validate(index_dir, str(snapshot_dir), queries, cfg.min_recall)
    k = index_manifest["recall"]["k"]
    overlay = index_manifest.get("overlay")
    how = (f"{index_manifest['type']}, an overlay on {overlay['base']}: {overlay['delta']} delta vectors, "
           f"{overlay['dead']} dead ids" if overlay else f"{index_manifest['type']}, built in full")
    print(f"index {Path(index_dir).name} ({how}): recall@{k} {checked[f'recall@{k}']:.4f} on "
          f"{checked['held_out_queries']} held-out queries (floor {cfg.min_recall}); {checked['vectors']} vectors "
          "= catalog minus errors")
    _artifacts(workdir, job.catalog.name, snapshot_dir, delta, encoded, Path(index_dir), index_manifest, checked)
    publish_version(index_dir, cfg.keep_versions)
    prune_bundles(workdir, cfg.keep_bundles)
    return {"snapshot": snapshot_dir.name, "snapshot_dir": str(snapshot_dir), "delta": delta, "encoded": encoded,
            "errors": run_manifest["errors"], "transient_errors": transient, "index_dir": index_dir,
            "published": True, "validation": checked,
            "bundle_id": bundle_id}


def _run_complete(snapshot_dir: str) -> bool:
    """Whether a snapshot is complete and final: one with transient errors is retried (indexing/embedding/job.py)."""
    try:
        run = shards.open_snapshot(Path(snapshot_dir))
    except shards.EmbeddingsError:
        return False
    return not shards.transient_errors(run.manifest)


def _index_ok(index_dir: str) -> bool:
    try:
        verify_index(Path(index_dir), checksums=False)
    except ValueError:
        return False
    return True


def _submit_ray_job(config: EmbedConfig, address: str) -> None:
    """`ray job submit -- cirflow embed key=value ...` through Ray's job API; waits for the end, raises with the
    log's tail when the job did not succeed."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    # The config as key.path=value arguments (None values left at their default).
    overrides = [f"{key}={value}" for key, value in flatten(to_dict(config)).items() if value is not None]
    entrypoint = shlex.join(["cirflow", "embed", *overrides])
    job_id = client.submit_job(entrypoint=entrypoint)
    log.info("submitted Ray job %s to %s: %s", job_id, address, entrypoint)
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(job_id)) not in terminal:
        time.sleep(RAY_JOB_POLL_SECONDS)
    if status != JobStatus.SUCCEEDED:
        tail = "\n".join(client.get_job_logs(job_id).splitlines()[-20:])
        raise EmbedError(f"Ray job {job_id} on {address} ended {status.value}:\n{tail}")
    log.info("Ray job %s succeeded", job_id)


def _delta_table(name: str, snapshot_dir: Path, delta: dict[str, Any], encoded: int | None) -> str:
    if not delta.get("previous"):
        return f"catalog {name}: snapshot {snapshot_dir.name}, no previous snapshot of this bundle: {encoded} encoded"
    return (f"catalog {name}: snapshot {snapshot_dir.name} from {delta['previous']}: {delta['added']} added, "
            f"{delta['changed']} changed, {delta['removed']} removed, {delta['unchanged']} unchanged; "
            f"{encoded} images encoded this run, {delta['reused_vectors']} vectors and {delta['reused_errors']} "
            f"errors rows reused, {delta.get('retried', 0)} read again after a transient failure")


def _artifacts(workdir: Path, name: str, snapshot_dir: Path, delta: dict[str, Any], encoded: int | None,
               index_dir: Path, manifest: dict[str, Any], checked: dict[str, Any]) -> None:
    recall = manifest["recall"]
    param = manifest["search"]["param"]
    sweep = [{"value": v, "recall": r, "ms_per_query": ms} for v, r, ms in recall["sweep"]]
    reports = workdir / "reports" / name / index_dir.name
    try:
        png = plot_tuning_sweep(sweep, reports / "tuning.png", recall["target"], manifest["search"]["value"],
                                param, recall["k"])
    except ValueError as e:  # a plot must never fail the run
        log.warning("no tuning plot for %s: %s", index_dir, e)
        png = None
    changes = {"this snapshot": {"previous": delta.get("previous") or "-", "added": delta.get("added"),
                                 "changed": delta.get("changed"), "removed": delta.get("removed"),
                                 "unchanged": delta.get("unchanged"), "encoded": encoded}}
    tuning = {f"{param or 'exact'}={v}": {f"recall@{recall['k']}": r, "ms/query (batch)": round(ms, 4)}
              for v, r, ms in recall["sweep"]}
    publish_markdown("catalog-refresh", f"Catalog {name}: index {index_dir.name}", [
        (f"Embedding snapshot {snapshot_dir.name}", markdown_table(changes, "")),
        ("Validation (re-measured on held-out queries)", markdown_table({"new index": checked}, "")),
        (f"Index: {manifest['type']}", f"{manifest['reason']}\n\nchosen: {param}={manifest['search']['value']}"
         + (f"\n\nan overlay on {manifest['overlay']['base']}: {manifest['overlay']['delta']} delta vectors, "
            f"{manifest['overlay']['dead']} dead ids" if manifest.get("overlay") else "")),
        ("Tuning sweep (tuning queries)", markdown_table(tuning, "setting"))])
    if png:
        publish_links("catalog", {"tuning-sweep": png})

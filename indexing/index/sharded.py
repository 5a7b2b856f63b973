"""An index version built as N shards by catalog id, for catalogs past one machine's memory: each shard serves the
ids that hash to it (embedding.shards.part_of) from its own machine, and a front merges their top-k
(search/sharded.py).

    build_sharded_index(run, queries, indexes_root, config, shards) -> indexes/<catalog>/<index_id>/

    indexes/<catalog>/<index_id>/
        manifest.json       layout "sharded": its shards, the merged recall, and every file below (shards' too)
        uris.parquet        the whole catalog's ids, uris, sources and metadata (what the front answers with)
        truth.npz           the tuning queries' exact top lists over the whole catalog (validation reads them)
        shard-00000/ ...    one complete index directory per shard (index/build.py), planned, trained and tuned
                            on its part alone with the same queries: its own manifest, truth and index_id

Each shard is tuned to the recall target on its own part; the merged answer's recall is then measured on the
held-out queries against the exact top lists of the whole catalog, with the split the shards used, and recorded
as the version's. The version is published, rolled back and pruned as one directory (versions.publish): a
front resolves CURRENT once and every shard answers for that version. A rerun with the same inputs finds the
verified directory, as for a single index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from cirflow.core.files import temp_dir_beside
from cirflow.export.manifest import ID_LENGTH
from cirflow.indexing.embedding.shards import EmbeddingSnapshot
from cirflow.indexing.index.build import (
    IndexBuildError,
    build_index,
    check_queries,
    index_id,
    move_into_place,
    queries_digest,
    record_metadata_fields,
    reference_groups,
)
from cirflow.indexing.index.plan import IndexConfig
from cirflow.indexing.index.queries import Queries, catalog_ids
from cirflow.indexing.index.tuning import TRUTH_DEPTH, exact_knn, save_truth, tune_setting
from cirflow.indexing.search import index_store as store
from cirflow.indexing.search.index_store import SHARDED_LAYOUT, shard_dir
from cirflow.indexing.search.sharded import ShardedIndex

log = logging.getLogger(__name__)


def build_sharded_index(run: EmbeddingSnapshot, queries: Queries, indexes_root: Path, config: IndexConfig,
                        shards: int) -> Path:
    """Build (or find) the version of `run` as `shards` index shards by catalog id; returns its directory."""
    if shards < 2:
        raise IndexBuildError(f"a sharded version needs at least 2 shards, got {shards}; one shard is build_index")
    queries = check_queries(queries, run.dim)
    catalog = run.manifest.get("catalog", {}).get("name")
    if not catalog or "/" in catalog or catalog.startswith("."):
        raise IndexBuildError(f"{run.snapshot_dir}: the run's catalog name {catalog!r} cannot name a directory")
    recipe = {"sharded": shards, "single": index_id(run, queries, config)}
    final = Path(indexes_root) / catalog / hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:ID_LENGTH]
    if (final / store.MANIFEST).exists():
        store.verify_index(final)
        log.info("sharded index %s is up to date (same shards, configuration and queries)", final)
        return final
    started = time.perf_counter()
    with temp_dir_beside(final) as tmp:
        parts = []
        for part in range(shards):
            part_run = run.partition(part, shards)
            if part_run.rows == 0:
                raise IndexBuildError(f"shard {part} of {shards} holds no vectors ({run.rows} in the catalog); "
                                      f"use fewer shards")
            log.info("shard %d of %d: %d vectors", part, shards, part_run.rows)
            built = build_index(part_run, queries, tmp / "_build", config)
            built.rename(tmp / shard_dir(part))
            parts.append(store.read_manifest(tmp / shard_dir(part)))
        (tmp / "_build" / catalog).rmdir()
        (tmp / "_build").rmdir()
        store.write_uris(tmp, run.read_sources(), run.read_metadata())
        first = parts[0]
        manifest: dict[str, Any] = {
            "format": store.FORMAT, "index_id": final.name, "layout": SHARDED_LAYOUT, "catalog": catalog,
            "bundle_id": run.bundle_id, "embed_dim": run.dim, "metric": "inner_product", "type": first["type"],
            "reason": f"{shards} shards by catalog id; shard 0: {first['reason']}",
            "shards": [{"dir": shard_dir(i), "index_id": p["index_id"], "vectors": p["counts"]["vectors"],
                        "type": p["type"], "search": p["search"], "recall_held_out": p["recall"]["held_out"]}
                       for i, p in enumerate(parts)],
            "search": first["search"], "counts": {"vectors": run.rows, "shards": shards},
            "embeddings": {"snapshot_dir": str(run.snapshot_dir), "rows": run.rows},
            "queries_sha256": queries_digest(queries), "config": dataclasses.asdict(config),
            "bytes_on_disk": sum(p["bytes_on_disk"] for p in parts)}
        record_metadata_fields(manifest, tmp)
        manifest["recall"] = _merged_recall(tmp, manifest, run, queries, config)
        manifest["build_seconds"] = {"total": round(time.perf_counter() - started, 3),
                                     "shards": [p["build_seconds"]["total"] for p in parts]}
        store.write_manifest(tmp, manifest)
        move_into_place(tmp, final)
    log.info("sharded index %s: %d shards of %s, recall@%d %.4f held out (merged)", final.name, shards,
             manifest["type"], manifest["recall"]["k"], manifest["recall"]["held_out"])
    return final


def _merged_recall(version_dir: Path, manifest: dict[str, Any], run: EmbeddingSnapshot, queries: Queries,
                   config: IndexConfig) -> dict[str, Any]:
    """The merged answer's recall@k on the shards' held-out queries against the whole catalog's exact lists
    (saved beside the version for validation)."""
    index = ShardedIndex.open(version_dir, manifest, mmap=True, use_gpu=config.use_gpu)
    ids, uris = store.read_uris(version_dir)
    reference_ids = catalog_ids(queries.references, ids, uris.to_pylist())
    k = min(config.recall_k, run.rows)
    truth = exact_knn(queries.vectors, ((i, v) for i, v, _ in run.iter_shards()), k * TRUTH_DEPTH, reference_ids)
    save_truth(version_dir / store.TRUTH_FILE, truth)
    groups = reference_groups(queries.references, reference_ids)
    result = tune_setting(lambda q, exclude, kk, _: index.search(q, kk, exclude)[0], None, [], queries.vectors,
                          truth, groups, k, config.recall_target, config.tune_fraction, config.seed)
    return {"k": k, "target": config.recall_target, "target_met": result.recall >= config.recall_target,
            "held_out": round(result.recall, 5), "tuning": round(result.tuning_recall, 5),
            "split": {"by": "reference image", "seed": config.seed, "tune_fraction": config.tune_fraction,
                      "tuning": {"references": result.references_tuning, "queries": result.queries_tuning},
                      "held_out": {"references": result.references_held_out, "queries": result.queries_held_out},
                      "queries_without_reference": queries.references.count(None)},
            "reference_excluded": int((reference_ids >= 0).sum()),
            "measured_with": f"the shards' merged top-{k} against exact search over all {run.rows} vectors"}

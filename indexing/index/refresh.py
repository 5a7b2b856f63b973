"""A refreshed catalog's index without rebuilding it: the previous version's index files, a small exact index of
what changed, and the ids whose old vectors are dead. Its cost follows the change, not the catalog.

    indexes/<catalog>/<index_id>/
        index.faiss ...     the base: the last full build's FAISS files, hard-linked (never modified)
        delta.faiss         IndexIDMap2(Flat): the vectors of ids new since the base, or changed, as the base's
                            codec reconstructs them (below)
        dead.npy            sorted ids of base vectors no longer valid (removed or changed since the base)
        base_ids.npy        sorted ids the base holds
        uris.parquet        this snapshot's ids, uris, formats, sha256s and metadata
        manifest.json       with the section "overlay"

Search (indexing/search/library.py) searches the base without its dead ids (a faiss selector; a GPU index fetches more
and drops them), merges the delta's results and keeps the top k: the same answer as an index rebuilt from the
snapshot, up to the base's own approximation. For that the delta scores each vector on the base's scale: it
holds the base codec's reconstruction of the vector (sa_encode then sa_decode), so an IVF-PQ base's delta
item scores q . (centroid + decoded residual), the inner product IVF-PQ itself computes, not the exact q . x;
exact codecs (Flat, HNSW's flat storage, IVF-Flat) give the vectors back unchanged. What remains approximate
is where the base looks (IVF: the probed lists; HNSW: the graph walk): the delta is always scanned whole, as if
its items lay in a probed list. A re-ranked base (search/rerank.py) scores its results from its float16 store,
so its delta holds the vectors rounded to float16, and the store is shared like the base's files. The tuned setting is swept again on the combined index and validation
re-measures recall before publication.

An overlay is made only on the previous version that was built from the snapshot the new one was refreshed
from (indexing/embedding/job.py records the ids it added, changed and removed), with the same bundle and configuration; when
the dead ids and the delta together exceed `max_fraction` of the base, or anything else differs, it returns
None and the caller builds in full (the compaction: a new base).

A snapshot that changed only metadata (no vector) gets an overlay with the previous version's dead ids and
delta, nothing added: the same vectors under the new metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cirflow.core.files import link_or_copy, temp_dir_beside
from cirflow.export.manifest import ID_LENGTH
from cirflow.indexing.embedding import shards
from cirflow.indexing.index.build import (
    add_metadata_digest,
    build_index,
    check_queries,
    move_into_place,
    queries_digest,
    record_metadata_fields,
    search_section,
    tune_index,
)
from cirflow.indexing.index.plan import IndexConfig, IndexPlan
from cirflow.indexing.index.queries import Queries, catalog_ids
from cirflow.indexing.index.tuning import GroundTruth, load_truth, refresh_truth
from cirflow.indexing.search import index_store as store
from cirflow.indexing.search.rerank import store_vectors

log = logging.getLogger(__name__)


def build_or_refresh(run: shards.EmbeddingSnapshot, queries: Queries, indexes_root: Path, config: IndexConfig,
                     previous: Path | None, max_fraction: float) -> Path:
    """An overlay on `previous` where one is possible and small enough, else a full build (build_index)."""
    if previous is not None and max_fraction > 0:
        refreshed = refresh_index(run, queries, previous, config, max_fraction)
        if refreshed is not None:
            return refreshed
    return build_index(run, queries, indexes_root, config)


def refresh_index(run: shards.EmbeddingSnapshot, queries: Queries, previous: Path, config: IndexConfig,
                  max_fraction: float) -> Path | None:
    """The overlay version of `previous` for snapshot `run`, or None when a full build is due (logged why)."""
    queries = check_queries(queries, run.dim)
    manifest = store.verify_index(previous, checksums=False)
    reason = _cannot_refresh(run, manifest, config)
    if reason:
        log.info("index %s: full build (%s)", previous.name, reason)
        return None
    base_ids = store.read_base_ids(previous, manifest)
    changes = shards.read_table(run.snapshot_dir / shards.CHANGES)
    touched = changes.filter(pc.is_in(changes.column("change"), value_set=pa.array(["changed", "removed"])))
    touched = np.sort(touched.column("id").to_numpy())
    dead = np.union1d(store.read_dead(previous, manifest), np.intersect1d(touched, base_ids))
    sources = run.read_sources()
    ids, uris = sources.column("id").to_numpy(), sources.column("uri").to_pylist()
    delta_ids = np.setdiff1d(ids, np.setdiff1d(base_ids, dead))
    if len(dead) + len(delta_ids) > max_fraction * len(base_ids):
        log.info("index %s: full build (%d dead + %d delta vectors exceed %.0f%% of the base's %d)", previous.name,
                 len(dead), len(delta_ids), 100 * max_fraction, len(base_ids))
        return None
    final = previous.parent / _overlay_id(manifest, run, queries, config)
    if (final / store.MANIFEST).exists():
        store.verify_index(final)
        log.info("index %s is up to date (an overlay on the same inputs)", final)
        return final
    started = time.perf_counter()
    with temp_dir_beside(final) as tmp:
        base_files = (list(manifest["index_files"]) + ([store.IVFDATA] if manifest["layout"] == "ondisk" else [])
                      + ([store.RERANK_FILE] if manifest.get("rerank") else [])
                      + ([manifest["vectors"]["file"]] if manifest.get("vectors") else []))
        for name in base_files:  # immutable: versions share them at no cost
            link_or_copy(previous / name, tmp / name)
        delta_vectors = _vectors_of(run, delta_ids)
        delta = faiss.IndexIDMap2(faiss.IndexFlatIP(run.dim))
        delta.add_with_ids(base_reconstruction(_base_part(previous, manifest), delta_vectors,
                                               bool(manifest.get("rerank"))), delta_ids)
        faiss.write_index(delta, str(tmp / store.DELTA_FILE))
        if manifest.get("vectors"):  # the re-ranker's candidates: exact, in the delta's sorted id order
            np.save(tmp / store.DELTA_VECTORS_FILE, delta_vectors)
        np.save(tmp / store.DEAD_FILE, dead)
        np.save(tmp / store.BASE_IDS_FILE, base_ids)
        store.write_uris(tmp, sources, run.read_metadata())
        base = manifest.get("overlay", {}).get("base", manifest["index_id"])
        kept = {key: manifest[key] for key in ("catalog", "embed_dim", "metric", "type", "factory", "params",
                                               "reason", "plan_warnings", "layout", "index_files",
                                               "estimated_bytes", "config", "faiss_version")}
        kept.update({key: manifest[key] for key in ("rerank", "vectors") if key in manifest})
        new = {**kept, "format": store.FORMAT, "index_id": final.name, "bundle_id": run.bundle_id,
               "overlay": {"base": base, "previous": manifest["index_id"], "dead": int(len(dead)),
                           "delta": int(len(delta_ids)), "base_vectors": int(len(base_ids)),
                           "max_fraction": max_fraction}}
        record_metadata_fields(new, tmp)
        plan = IndexPlan(manifest["type"], manifest["factory"], manifest["params"], manifest["search"]["param"],
                         manifest["estimated_bytes"], 0, manifest["reason"])
        built_at = time.perf_counter()
        truth = _refreshed_truth(previous, manifest, queries, changes, touched, ids, uris, delta_ids, delta_vectors,
                                 run)
        tuning = tune_index(tmp, new, plan, run, queries, config, on_gpu=False, truth=truth)
        done = time.perf_counter()
        new.update({"embeddings": {"snapshot_dir": str(run.snapshot_dir), "snapshot": run.snapshot_dir.name,
                                   "shards": len(run.shard_files), "rows": run.rows},
                    "counts": {"vectors": int(len(ids)), "shards": len(run.shard_files),
                               "index_files": len(manifest["index_files"])},
                    "id_range": [int(ids.min()), int(ids.max())],
                    "search": search_section(tuning), "recall": tuning,
                    "build_seconds": {"overlay": round(built_at - started, 3), "tune": round(done - built_at, 3),
                                      "total": round(done - started, 3)},
                    "device": "cpu", "queries_sha256": queries_digest(queries)})
        new["bytes_on_disk"] = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
        store.write_manifest(tmp, new)
        move_into_place(tmp, final)
    log.info("index %s: overlay on base %s (%d dead, %d delta vectors) in %.1f s", final.name, base, len(dead),
             len(delta_ids), time.perf_counter() - started)
    return final


def _refreshed_truth(previous: Path, manifest: dict[str, Any], queries: Queries, changes: pa.Table,
                     gone: np.ndarray, ids: np.ndarray, uris: list[str], delta_ids: np.ndarray,
                     delta_vectors: np.ndarray, run: shards.EmbeddingSnapshot) -> GroundTruth | None:
    """The tuning queries' exact top lists over the new snapshot, updated from the previous version's with this
    snapshot's changes (tuning.refresh_truth); None (compute them anew) when the previous lists are of other
    queries or missing."""
    path = previous / store.TRUTH_FILE
    if not path.is_file() or manifest.get("queries_sha256") != queries_digest(queries):
        return None
    came = changes.filter(pc.is_in(changes.column("change"), value_set=pa.array(["added", "changed"])))
    # An entry that came and failed to read (a corrupt upload) is an errors row: it has no vector to arrive.
    came = np.intersect1d(came.column("id").to_numpy(), delta_ids)
    order = np.argsort(ids, kind="stable")
    reference_ids = catalog_ids(queries.references, ids[order], [uris[i] for i in order])
    # What came since the previous snapshot is new to the base or replaces a dead base vector: in the delta.
    came_vectors = delta_vectors[np.searchsorted(delta_ids, came)]
    return refresh_truth(load_truth(path), queries.vectors, gone, came, came_vectors, reference_ids,
                         lambda: ((i, v) for i, v, _ in run.iter_shards()))


def _cannot_refresh(run: shards.EmbeddingSnapshot, manifest: dict[str, Any], config: IndexConfig) -> str | None:
    previous_snapshot = (run.manifest.get("delta") or {}).get("previous")
    built_from = Path(manifest.get("embeddings", {}).get("snapshot_dir", "")).name
    if manifest["bundle_id"] != run.bundle_id:
        return "another bundle"
    if not (run.snapshot_dir / shards.CHANGES).is_file() or previous_snapshot is None:
        return "the snapshot records no changes against a previous one"
    if built_from != previous_snapshot:
        return f"the published index was built from snapshot {built_from}, not from {previous_snapshot}"
    if manifest.get("config") != _comparable(config):
        return "another index configuration"
    return None


def _comparable(config: IndexConfig) -> dict[str, Any]:
    """The configuration as the index manifest records it."""
    return dataclasses.asdict(config)


def _overlay_id(manifest: dict[str, Any], run: shards.EmbeddingSnapshot, queries: Queries, config: IndexConfig) -> str:
    recipe = {"format": store.FORMAT, "overlay_on": manifest["index_id"], "bundle_id": run.bundle_id,
              "shards": {name: info["sha256"] for name, info in sorted(run.manifest["shards"].items())},
              "config": _comparable(config), "queries": queries_digest(queries),
              "delta": "base codec"}  # overlays made before the delta took the base's codes had exact vectors
    add_metadata_digest(recipe, run)
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:ID_LENGTH]


def base_reconstruction(base: faiss.Index, vectors: np.ndarray, reranked: bool = False) -> np.ndarray:
    """(n, D) `vectors` as the CPU index `base` scores them: decoded from the codes its codec gives them
    (module docstring). The codec is the index under an IndexIDMap, an HNSW's storage, or the index itself (an
    IVF index encodes the list and the residual). A re-ranked index scores its results from its float16 store:
    the vectors rounded to float16."""
    if reranked:
        return store_vectors(vectors)
    codec = faiss.downcast_index(base.index) if isinstance(base, faiss.IndexIDMap) else base
    if isinstance(codec, faiss.IndexHNSW):
        codec = faiss.downcast_index(codec.storage)
    if not len(vectors):
        return vectors
    return codec.sa_decode(codec.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32)))


def _base_part(index_dir: Path, manifest: dict[str, Any]) -> faiss.Index:
    """The first FAISS file of an index's base, memory-mapped where its layout allows: every file of a build holds
    the same trained codec (index/build.py clones one trained index per shard)."""
    return store.read_faiss(index_dir / manifest["index_files"][0], manifest["layout"], mmap=True)


def _vectors_of(run: shards.EmbeddingSnapshot, ids: np.ndarray) -> np.ndarray:
    """The snapshot's vectors of `ids` (sorted), read shard by shard."""
    out = np.zeros((len(ids), run.dim), np.float32)
    for shard_ids, vectors, _ in run.iter_shards():
        hit = np.isin(shard_ids, ids)
        out[np.searchsorted(ids, shard_ids[hit])] = vectors[hit]
    return out


"""Build a FAISS index from an embedding snapshot: plan, train once on a sample, add shard by shard, merge, tune.

    build_index(run, queries, indexes_root, config) -> indexes/<catalog>/<index_id>/

The index_id hashes everything the index depends on (the embedding shards' sha256s, the catalog's metadata
where it has any, the configuration, the tuning queries and their references), so a rerun with the same inputs finds the verified directory and returns
it untouched. The directory is assembled under a temp name beside its final place and renamed whole; the
manifest, written last, records the plan and its reason, the tuned search setting and the recall measured there
with real composed queries (split by reference image, each query's reference left out as search leaves it out;
see indexing.tuning), how the split was made, timings, sizes and the sha256 of every file.
`versions.publish` then moves CURRENT to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import mmap
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from cirflow.core.files import publish_dir, temp_dir_beside
from cirflow.export.manifest import ID_LENGTH
from cirflow.indexing.embedding.catalog import metadata_digest, metadata_fields
from cirflow.indexing.embedding.shards import EmbeddingSnapshot
from cirflow.indexing.index.plan import IndexConfig, IndexPlan, plan_index
from cirflow.indexing.index.queries import Queries, catalog_ids
from cirflow.indexing.index.tuning import (
    PASS_RULE,
    TRUTH_DEPTH,
    GroundTruth,
    TuningResult,
    ef_search_candidates,
    exact_knn,
    nprobe_candidates,
    save_truth,
    tune_setting,
)
from cirflow.indexing.search import VectorIndex
from cirflow.indexing.search import index_store as store
from cirflow.indexing.search.placement import GPU_MAX_K, resolve_gpu, to_cpu, to_gpu
from cirflow.indexing.search.rerank import RERANK_TYPES, STORE_DTYPE

log = logging.getLogger(__name__)

# IVF types whose per-shard lists merge on disk into one memory-mapped file (faiss's OnDiskInvertedLists); the
# fast-scan lists of ivf_pq_rerank are block-packed, which it cannot merge: they are added into one index in RAM
# (4-bit codes: 16-64 B per vector).
ONDISK_TYPES = ("ivf_flat", "ivf_pq")
# Candidate counts the tuning tries for a re-ranked index, k times each; for each, nprobe is swept as for IVF.
K_FACTORS = (1, 2, 4, 8, 16, 32, 64)

# Unit vectors from the query encoder; a looser norm means vectors from elsewhere (or unnormalised).
NORM_TOLERANCE = 1e-3


class IndexBuildError(ValueError):
    """The inputs cannot make an index (empty catalog, bad queries, unnamed catalog); the message says which."""


def build_index(run: EmbeddingSnapshot, queries: Queries, indexes_root: Path,
                config: IndexConfig = IndexConfig()) -> Path:
    """Build (or find, when already built) the index of `run` tuned on `queries`; returns its directory.

    queries: (Q, D) real composed query vectors from the run's bundle (encode_query_split, or a logged queries
    file), never catalog vectors, with their reference images: those in the catalog are matched to their
    catalog ids (catalog_ids) and left out of each query's results while tuning, as search leaves them out.
    The directory is not published: `versions.publish` does that.
    """
    queries = check_queries(queries, run.dim)
    if run.rows == 0:
        raise IndexBuildError(f"{run.snapshot_dir}: the embedding snapshot holds no vectors (empty catalog, or every image "
                              f"failed: {run.manifest.get('errors', 0)} errors)")
    catalog = run.manifest.get("catalog", {}).get("name")
    if not catalog or "/" in catalog or catalog.startswith("."):
        raise IndexBuildError(f"{run.snapshot_dir}: the run's catalog name {catalog!r} cannot name a directory")
    final = Path(indexes_root) / catalog / index_id(run, queries, config)
    if (final / store.MANIFEST).exists():
        try:
            store.verify_index(final)
        except store.IndexFormatError as e:
            raise IndexBuildError(f"{final} exists but is damaged ({e}); remove it to rebuild") from e
        log.info("index %s is up to date (same shards, configuration and queries)", final)
        return final

    plan = plan_index(run.rows, run.dim, config, vector_store=run.reranks)
    log.info("index plan for %s: %s", catalog, plan.reason)
    for warning in plan.warnings:
        log.warning("index plan: %s", warning)
    on_gpu = resolve_gpu(config.use_gpu, plan.index_type, "build")
    with temp_dir_beside(final) as tmp:
        started = time.perf_counter()
        trained = _train(plan, run, config, on_gpu)
        trained_at = time.perf_counter()
        layout, files, ids = _add(plan, trained, run, tmp, config.merge, on_gpu)
        added_at = time.perf_counter()
        manifest = {"format": store.FORMAT, "index_id": final.name, "catalog": catalog, "bundle_id": run.bundle_id,
                    "embed_dim": run.dim, "metric": "inner_product", "type": plan.index_type,
                    "factory": plan.factory, "params": plan.params, "reason": plan.reason,
                    "plan_warnings": list(plan.warnings), "layout": layout, "index_files": files,
                    "estimated_bytes": plan.estimated_bytes}
        if plan.index_type in RERANK_TYPES:
            manifest["rerank"] = {"file": store.RERANK_FILE, "dtype": np.dtype(STORE_DTYPE).name}
        if run.reranks:
            manifest["vectors"] = {"file": store.VECTORS_FILE, "dtype": "float32"}
        record_metadata_fields(manifest, tmp)
        tuning = tune_index(tmp, manifest, plan, run, queries, config, on_gpu)
        tuned_at = time.perf_counter()
        index_bytes = sum((tmp / name).stat().st_size for name in files)
        if layout == "ondisk":
            index_bytes += (tmp / store.IVFDATA).stat().st_size
        for section in ("rerank", "vectors"):
            if section in manifest:
                index_bytes += (tmp / manifest[section]["file"]).stat().st_size
        manifest.update({
            "embeddings": {"snapshot_dir": str(run.snapshot_dir), "shards": len(run.shard_files), "rows": run.rows},
            "counts": {"vectors": int(len(ids)), "shards": len(run.shard_files), "index_files": len(files)},
            "id_range": [int(ids.min()), int(ids.max())],
            "search": search_section(tuning),
            "recall": tuning,
            "build_seconds": {"train": round(trained_at - started, 3), "add": round(added_at - trained_at, 3),
                              "tune": round(tuned_at - added_at, 3), "total": round(tuned_at - started, 3)},
            "device": "gpu" if on_gpu else "cpu", "faiss_version": faiss.__version__,
            "bytes_on_disk": index_bytes, "bytes_per_vector": round(index_bytes / len(ids), 2),
            "queries_sha256": queries_digest(queries), "config": dataclasses.asdict(config)})
        store.write_manifest(tmp, manifest)
        move_into_place(tmp, final)
        return final


def search_section(tuning: dict[str, Any]) -> dict[str, Any]:
    """The manifest's "search" (the tuned setting) taken out of tune_index's result; the rest is "recall"."""
    section = {"param": tuning.pop("param"), "value": tuning.pop("value")}
    k_factor = tuning.pop("k_factor", None)
    if k_factor is not None:
        section["k_factor"] = k_factor
    return section


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename an assembled index directory to its content-addressed name. When another process built the same
    version first, that one is kept, once verified (a damaged one raises IndexFormatError): its files are the
    same, and CURRENT may already name it."""
    if not publish_dir(tmp, final, twin_ok=_verified_twin):
        log.info("index %s was built concurrently by another process; keeping that one", final)


def _verified_twin(final: Path) -> bool:
    if not (final / store.MANIFEST).exists():  # written last: without it, not a whole index directory
        return False
    store.verify_index(final)
    return True


def index_id(run: EmbeddingSnapshot, queries: Queries, config: IndexConfig) -> str:
    """Hash of the shards' sha256s, the catalog's metadata, the configuration (all but where it runs), the plan
    it makes (a planner that chooses differently for the same configuration makes another index) and the tuning
    queries."""
    plan = plan_index(run.rows, run.dim, config, vector_store=run.reranks)
    recipe = {"format": store.FORMAT, "bundle_id": run.bundle_id, "catalog": run.manifest["catalog"].get("name"),
              "shards": {name: info["sha256"] for name, info in sorted(run.manifest["shards"].items())},
              "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "use_gpu"},
              "plan": [plan.factory, plan.params, plan.train_points], "tuning": PASS_RULE,
              "queries": queries_digest(queries)}
    if "partition" in run.manifest:  # one shard of a sharded version (index/sharded.py)
        recipe["partition"] = run.manifest["partition"]
    add_metadata_digest(recipe, run)
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:ID_LENGTH]


def add_metadata_digest(recipe: dict[str, Any], run: EmbeddingSnapshot) -> None:
    """Put the snapshot's metadata into an index recipe: a change of metadata alone leaves every shard as it was
    but must make a new index version. Left out without metadata, so that those ids stay what they were."""
    metadata = run.read_metadata()
    if metadata is not None:
        recipe["metadata"] = metadata_digest(metadata)


def record_metadata_fields(manifest: dict[str, Any], index_dir: Path) -> None:
    """Name the metadata fields of the uris.parquet just written in `index_dir` in its manifest (none: no key)."""
    fields = store.read_metadata(index_dir).schema
    if fields.names:
        manifest["metadata_fields"] = metadata_fields(fields)


def check_queries(queries: Queries, dim: int) -> Queries:
    """(Q, D) float32 unit query vectors of >= 2 reference images (one side tunes, the other measures), or
    IndexBuildError."""
    vectors = np.asarray(queries.vectors)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise IndexBuildError(f"queries must be (Q, {dim}) to match the catalog's dimension, got {vectors.shape}")
    if len(vectors) < 2:
        raise IndexBuildError(f"tuning needs at least 2 queries (a few hundred measure recall well), got "
                              f"{len(vectors)}")
    known = {r for r in queries.references if r is not None}
    if queries.references.count(None) + len(known) < 2:
        raise IndexBuildError(f"tuning needs queries of at least 2 reference images (queries of one reference "
                              f"stay on one side of the tuning split), got {len(vectors)} queries of "
                              f"{sorted(known)}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise IndexBuildError("queries contain NaN or inf")
    norms = np.linalg.norm(vectors, axis=1)
    if np.abs(norms - 1).max() > NORM_TOLERANCE:
        raise IndexBuildError(f"queries must be unit vectors from the bundle's query encoder; norms range "
                              f"{norms.min():.4f}..{norms.max():.4f}")
    return Queries(vectors, tuple(queries.references))


def queries_digest(queries: Queries) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(queries.vectors, dtype=np.float32).tobytes())
    digest.update(json.dumps(queries.references).encode())
    return digest.hexdigest()


def reference_groups(references: tuple[str | None, ...], reference_ids: np.ndarray) -> np.ndarray:
    """(Q,) a label per query for the tuning split: its reference's catalog id where the catalog holds it (two
    spellings of one image are one group), else the reference as given, else a label of its own."""
    keys = [f"id:{i}" if i >= 0 else f"ref:{r}" if r is not None else f"row:{row}"
            for row, (r, i) in enumerate(zip(references, reference_ids.tolist()))]
    return np.unique(np.array(keys, dtype=object), return_inverse=True)[1]


def _train(plan: IndexPlan, run: EmbeddingSnapshot, config: IndexConfig, on_gpu: bool) -> faiss.Index:
    """The empty index, trained (IVF: centroids, and PQ codebooks) on a seeded sample of the catalog."""
    index = faiss.index_factory(run.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.index_type in ("hnsw", "hnsw_sq"):
        faiss.downcast_index(index.index).hnsw.efConstruction = config.hnsw_ef_construction
    if not plan.train_points:
        return index
    sample = _sample(run, plan.train_points, config.seed)
    log.info("training %s on %d sampled vectors", plan.factory, len(sample))
    if plan.index_type == "hnsw_sq":  # the scalar quantizer's ranges: no clustering, nothing to seed
        index.train(sample)
        return index
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = config.seed
    if plan.index_type in ("ivf_pq", "ivf_pq_rerank"):
        ivf.pq.cp.seed = config.seed
    if plan.index_type == "ivf_pq":
        # index_factory turns on polysemous training (a slow annealing of code order for Hamming filtering,
        # seconds even on tiny data); search never uses polysemous codes.
        ivf.do_polysemous_training = False
    if not on_gpu:
        index.train(sample)
        return index
    # faiss's way to train IVF on GPU: the k-means assignment runs on a GPU flat index while the trained index
    # stays a CPU object (keeping its seeds). The pointer is not owned: `clustering` keeps the GPU index alive,
    # and the pointer is cleared before it dies (clones and files must not carry it).
    clustering = to_gpu(faiss.IndexFlatIP(run.dim), "flat")
    ivf.clustering_index = clustering
    try:
        index.train(sample)
    finally:
        ivf.clustering_index = None
    return index


def _sample(run: EmbeddingSnapshot, count: int, seed: int) -> np.ndarray:
    """`count` catalog vectors drawn without replacement (seeded), read shard by shard."""
    rows = np.sort(np.random.default_rng(seed).choice(run.rows, size=count, replace=False))
    parts, offset = [], 0
    for _, vectors, _ in run.iter_shards():
        lo, hi = np.searchsorted(rows, [offset, offset + len(vectors)])
        parts.append(vectors[rows[lo:hi] - offset])
        offset += len(vectors)
    return np.ascontiguousarray(np.concatenate(parts))


def _add(plan: IndexPlan, trained: faiss.Index, run: EmbeddingSnapshot, out: Path, merge: bool,
         on_gpu: bool) -> tuple[str, list[str], np.ndarray]:
    """Add the shards with their catalog ids; returns (layout, FAISS file names, all ids). Writes uris.parquet
    (with each image's format and sha256 and the snapshot's metadata), a re-ranked type's float16 store, and the
    float32 catalog vectors when the snapshot's bundle re-ranks (EmbeddingSnapshot.reranks)."""
    ondisk = plan.index_type in ONDISK_TYPES
    whole = trained if merge and not ondisk else None  # Flat/HNSW/fast-scan merged: one index grows by shard
    parts_dir = out / "_parts" if merge and ondisk else out
    parts_dir.mkdir(exist_ok=True)
    sources = run.read_sources()
    sorted_ids = np.sort(sources.column("id").to_numpy())
    stores = [RowStoreWriter(out / name, sorted_ids, run.dim, dtype) for name, dtype, wanted in (
        (store.RERANK_FILE, STORE_DTYPE, plan.index_type in RERANK_TYPES),  # the index's own float16 re-rank
        (store.VECTORS_FILE, np.float32, run.reranks)) if wanted]  # the bundle's re-ranker's candidates
    files, all_ids, offset = [], [], 0
    for shard, (ids, vectors, _) in enumerate(run.iter_shards()):
        offset += len(ids)
        if len(ids) == 0:
            continue
        all_ids.append(ids)
        for row_store in stores:
            row_store.write(ids, vectors)
        if whole is not None:
            whole.add_with_ids(vectors, ids)
            continue
        part = faiss.clone_index(trained)
        if on_gpu and ondisk:  # Flat adds are copies; HNSW and fast-scan have no GPU version
            gpu_part = to_gpu(part, plan.index_type)
            gpu_part.add_with_ids(vectors, ids)
            part = to_cpu(gpu_part)
        else:
            part.add_with_ids(vectors, ids)
        faiss.write_index(part, str(parts_dir / store.shard_file(shard)))
        files.append(store.shard_file(shard))
        log.info("shard %d: %d vectors added (%d/%d)", shard, len(ids), offset, run.rows)
    if offset != run.rows:
        raise IndexBuildError(f"{run.snapshot_dir}: the shards hold {offset} rows, the manifest says {run.rows}")
    ids = np.concatenate(all_ids)
    for row_store in stores:
        row_store.close()  # the file is complete and closed before the manifest hashes it
    store.write_uris(out, sources, run.read_metadata())
    if whole is not None:
        faiss.write_index(whole, str(out / store.INDEX_FILE))
        return "single", [store.INDEX_FILE], ids
    if not merge:
        return "shards", files, ids
    merged = faiss.clone_index(trained)
    merge_ondisk(merged, [str(parts_dir / name) for name in files], str(out / store.IVFDATA))
    faiss.write_index(merged, str(out / store.INDEX_FILE))
    shutil.rmtree(parts_dir)
    return "ondisk", [store.INDEX_FILE], ids


class RowStoreWriter:
    """Fills an .npy of one row per catalog id, in sorted id order, shard by shard: a re-ranked index's float16
    store, or the float32 catalog vectors a bundle's re-ranker scores. Through a shared memory map, whose written
    pages are flushed and dropped from this process after each shard: a catalog larger than memory streams
    through it, and the build's resident memory does not grow by the store's size (10M x 512 dims: 10 GB in
    float16) as it would with the pages kept mapped until the end."""

    def __init__(self, path: Path, sorted_ids: np.ndarray, dim: int, dtype: Any) -> None:
        self.sorted_ids, self.dtype = sorted_ids, np.dtype(dtype)
        shape = (len(sorted_ids), dim)
        with open(path, "wb") as f:  # the .npy header, then the rows' bytes (zeros until written)
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                     "fortran_order": False, "shape": shape})
            header = f.tell()
            f.truncate(header + len(sorted_ids) * dim * self.dtype.itemsize)
        self._file = open(path, "r+b")
        self._map = mmap.mmap(self._file.fileno(), 0)
        self._header, self._shape = header, shape

    def write(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        rows = np.ndarray(self._shape, self.dtype, buffer=self._map, offset=self._header)
        rows[np.searchsorted(self.sorted_ids, ids)] = vectors
        del rows  # no view may outlive the map
        self._map.flush()
        self._map.madvise(mmap.MADV_DONTNEED)  # written back: the pages leave this process, the file keeps them

    def close(self) -> None:
        self._map.close()
        self._file.close()


def tune_index(index_dir: Path, manifest: dict[str, Any], plan: IndexPlan, run: EmbeddingSnapshot, queries: Queries,
               config: IndexConfig, on_gpu: bool, truth: GroundTruth | None = None) -> dict[str, Any]:
    """Sweep the search setting on the written index, opened and searched as search opens and searches it;
    returns the manifest's recall section plus "param" and "value". (bench/indexing.py also runs it on a built
    index with unreferenced queries, the per-query split of earlier versions, to compare the two protocols.)"""
    index = VectorIndex.open(index_dir, manifest, mmap=True, on_gpu=on_gpu)
    ids, uris = store.read_uris(index_dir)
    reference_ids = catalog_ids(queries.references, ids, uris.to_pylist())
    k = min(config.recall_k, run.rows)
    if truth is None:
        truth = exact_knn(queries.vectors, ((i, vectors) for i, vectors, _ in run.iter_shards()), k * TRUTH_DEPTH,
                          reference_ids)
    # Kept beside the index (listed in its manifest): validation measures against it, and the next overlay
    # refresh updates it with the changed vectors instead of searching the whole catalog again.
    save_truth(index_dir / store.TRUTH_FILE, truth)

    param = plan.search_param

    def search(q: np.ndarray, exclude: np.ndarray, kk: int, value: int | None) -> np.ndarray:
        index.set_search(param, value)
        return index.search(q, kk, exclude)[0]

    if param == "efSearch":
        candidates = ef_search_candidates(k, run.rows)
    elif param == "nprobe":
        candidates = nprobe_candidates(plan.params["nlist"], GPU_MAX_K if on_gpu else None)
    else:
        candidates = []
    groups = reference_groups(queries.references, reference_ids)
    if groups.max() < 1:  # check_queries counted spellings; the catalog showed them to be one image
        raise IndexBuildError(f"tuning needs queries of at least 2 reference images, but all {len(groups)} queries "
                              f"refer to catalog id {int(reference_ids.max())} (one image under several names)")
    def tune() -> TuningResult:
        return tune_setting(search, param, candidates, queries.vectors, truth, groups, k, config.recall_target,
                            config.tune_fraction, config.seed)

    rerank: dict[str, Any] = {}
    if manifest.get("rerank"):
        result, rerank = _tune_k_factor(index, tune)
    else:
        result = tune()
    setting = "exact search" if result.param is None else f"tuned {result.param}={result.value}"
    if rerank:
        setting += f", re-rank of k x {rerank['k_factor']} candidates"
    log.info("%s: recall@%d %.4f on %d held-out composed queries of %d reference images (target %.3f%s)", setting,
             k, result.recall, result.queries_held_out, result.references_held_out, result.target,
             "" if result.target_met else ", NOT MET")
    excluded = int((reference_ids >= 0).sum())
    return {**rerank, "param": result.param, "value": result.value, "k": k, "target": result.target,
            "target_met": result.target_met, "held_out": round(result.recall, 5),
            "tuning": round(result.tuning_recall, 5),
            "sweep": [[value, round(recall, 5), round(ms, 4)] for value, recall, ms in result.sweep],
            "split": {"by": "reference image", "seed": config.seed, "tune_fraction": config.tune_fraction,
                      "tuning": {"references": result.references_tuning, "queries": result.queries_tuning},
                      "held_out": {"references": result.references_held_out,
                                   "queries": result.queries_held_out},
                      "queries_without_reference": queries.references.count(None)},
            "reference_excluded": excluded,
            "measured_with": (f"{len(groups)} real composed query vectors in {int(groups.max()) + 1} groups "
                              f"(a reference image's queries, or a query without one), split by reference (seed {config.seed}) into {result.queries_tuning} "
                              f"queries of {result.references_tuning} references that chose the setting and "
                              f"{result.queries_held_out} of {result.references_held_out} held out; "
                              f"k-recall@{k} against exact inner-product search over all {run.rows} catalog "
                              f"vectors, each query's reference left out of both where the catalog holds it "
                              f"({excluded} queries), as search leaves it out; ties within 1e-5 counted as hits")}


def _tune_k_factor(index: VectorIndex, tune: Callable[[], TuningResult]) -> tuple[TuningResult, dict[str, Any]]:
    """The candidate count of a re-ranked index with its nprobe: for each of K_FACTORS the smallest nprobe that
    meets the target (tune), then the pair whose tuning search took the least time. More candidates let a
    smaller nprobe do, at a re-rank cost; the sweep stops once a passing pair is well past the fastest one.
    Returns the chosen result and the manifest's {"k_factor", "k_factor_sweep"} (k_factor, nprobe, recall on
    the tuning queries, ms per query, target met)."""
    tried: list[tuple[int, TuningResult, float]] = []
    for k_factor in K_FACTORS:
        index.set_search(None, None, k_factor)
        result = tune()
        ms = next(ms for value, _, ms in reversed(result.sweep) if value == result.value)
        tried.append((k_factor, result, ms))
        log.info("re-rank of k x %d: nprobe=%s, recall@%d %.4f on the tuning queries, %.3f ms/query%s", k_factor,
                 result.value, result.k, result.tuning_recall, ms, "" if result.target_met else " (target not met)")
        fastest = min((m for _, r, m in tried if r.target_met), default=None)
        if fastest is not None and result.target_met and ms > 2 * fastest:
            break
    met = [t for t in tried if t[1].target_met]
    k_factor, result, _ = min(met, key=lambda t: t[2]) if met else max(tried, key=lambda t: t[1].tuning_recall)
    index.set_search(result.param, result.value, k_factor)
    sweep = [[kf, r.value, round(r.tuning_recall, 5), round(ms, 4), r.target_met] for kf, r, ms in tried]
    return result, {"k_factor": k_factor, "k_factor_sweep": sweep}

"""Validation of a built index before it is published: it must hold exactly the snapshot's ids and reach the
recall floor on held-out composed queries, measured again here rather than read from the build's manifest.

The recall is measured the way search serves: the index directory loaded as a searcher loads it (checksums,
memory map, tuned setting), the held-out side of the build's own split by reference image (so no query that
chose the setting judges it), each query's reference left out where the catalog holds it, against exact
inner-product search over the snapshot's vectors: the exact lists the build saved beside the index (truth.npz,
covered by the manifest's sha256) when they are of the same queries and snapshot, else computed here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cirflow.indexing.embedding import shards
from cirflow.indexing.index.build import queries_digest, reference_groups
from cirflow.indexing.index.queries import Queries, catalog_ids
from cirflow.indexing.index.tuning import (
    TRUTH_DEPTH,
    GroundTruth,
    exact_knn,
    load_truth,
    recall_at_k,
    split_by_reference,
)
from cirflow.indexing.search import index_store as store
from cirflow.indexing.search import load_index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Validation:
    passed: bool
    problems: tuple[str, ...]  # why it may not be published; empty when it may
    recall: float  # recall@k on the held-out queries, measured here
    k: int
    queries: int  # held-out queries measured
    vectors: int  # ids in the index
    expected: int  # the snapshot's catalog entries minus its errors rows

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "problems": list(self.problems), f"recall@{self.k}": round(self.recall, 5),
                "held_out_queries": self.queries, "vectors": self.vectors, "expected_ids": self.expected}


def expected_ids(run: shards.EmbeddingSnapshot) -> np.ndarray:
    """Sorted ids an index of this snapshot must hold: its catalog's minus those recorded as errors (runs
    written without a catalog file, e.g. from vectors made elsewhere: the ids of their shards)."""
    catalog = run.snapshot_dir / shards.CATALOG
    if not catalog.is_file():
        return np.sort(np.concatenate([ids for ids, _, _ in run.iter_shards()]))
    ids = shards.read_table(catalog, columns=["id"]).column("id").to_numpy()
    errors = shards.read_table(run.snapshot_dir / shards.ERRORS, columns=["id"]).column("id").to_numpy()
    return np.setdiff1d(ids, errors)


def _saved_truth(index_dir: Path, manifest: dict[str, Any], run: shards.EmbeddingSnapshot, queries: Queries,
                 reference_ids: np.ndarray) -> GroundTruth | None:
    """The index's saved exact top lists when they are of these queries over this snapshot (the manifest's
    sha256 vouches for the file; the excluded ids must be the ones found here), else None."""
    path = index_dir / store.TRUTH_FILE
    built_from = Path(manifest.get("embeddings", {}).get("snapshot_dir", "")).name
    if not path.is_file() or built_from != run.snapshot_dir.name or manifest.get("queries_sha256") != queries_digest(
            queries):
        return None
    truth = load_truth(path)
    if not np.array_equal(truth.exclude_ids(), np.where(reference_ids >= 0, reference_ids, -1)):
        return None
    return truth


def validate_index(index_dir: Path, run: shards.EmbeddingSnapshot, queries: Queries, min_recall: float) -> Validation:
    index = load_index(Path(index_dir))
    manifest = index.manifest
    problems = []
    if manifest["bundle_id"] != run.bundle_id:
        problems.append(f"built from bundle {manifest['bundle_id']}, the snapshot is of bundle {run.bundle_id}")
    ids, uris = store.read_uris(index.index_dir)
    expected = expected_ids(run)
    missing, stale = np.setdiff1d(expected, ids), np.setdiff1d(ids, expected)
    if len(missing) or len(stale):
        problems.append(f"the index's ids differ from the snapshot's catalog minus its errors: {len(missing)} "
                        f"missing (e.g. {missing[:3].tolist()}), {len(stale)} stale (e.g. {stale[:3].tolist()})")
    split = manifest["recall"]["split"]
    k = int(manifest["recall"]["k"])
    reference_ids = catalog_ids(queries.references, ids, uris.to_pylist())
    groups = reference_groups(queries.references, reference_ids)
    _, held = split_by_reference(groups, split["tune_fraction"], split["seed"])
    truth = _saved_truth(index.index_dir, manifest, run, queries, reference_ids)
    if truth is None:
        truth = exact_knn(queries.vectors, ((i, v) for i, v, _ in run.iter_shards()), k * TRUTH_DEPTH,
                          reference_ids)
    truth = truth.take(held)
    recall = recall_at_k(index.search(queries.vectors[held], k, truth.exclude_ids())[0], truth, k)
    if recall < min_recall:
        problems.append(f"recall@{k} {recall:.4f} on {len(held)} held-out composed queries is under the floor "
                        f"{min_recall}")
    result = Validation(not problems, tuple(problems), recall, k, len(held), len(ids), len(expected))
    log.info("validation of %s: %s", index.index_dir.name, "passed" if result.passed else "; ".join(problems))
    return result

"""A sharded index version (indexing/index/sharded.py) searched in one process, and the one loader of any version.

`ShardedIndex` answers as VectorIndex does (search, results, entries, manifest): every shard's VectorIndex is
searched with the same queries, k, exclusions and allow-list (each keeps the ids it holds), side by side on a
thread per shard (faiss releases the GIL), and their top-k lists are merged (topk.merge). Each shard's own
answer is exact for Flat shards, so the merge equals the single index's answer; approximate shards are tuned
to the recall target on their part. The entries are the whole catalog's (the version's uris.parquet). Serving
shards from separate machines (service/ray_serve.py) runs the same merge on the shards' answers.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cirflow.indexing.search import index_store as store
from cirflow.indexing.search import topk
from cirflow.indexing.search.entries import Entries
from cirflow.indexing.search.placement import resolve_gpu
from cirflow.indexing.search.vector_index import VERIFY, IndexVersion, VectorIndex
from cirflow.indexing.search.vector_store import VectorStore

log = logging.getLogger(__name__)

class PartialAnswer(Exception):
    """A sharded search that some shards could not answer in time: the merged top-k of those that did, and the
    shards missing from it. Raised, never returned, so that no caller takes an incomplete list for a whole one."""

    def __init__(self, ids: np.ndarray, scores: np.ndarray, missing: tuple[int, ...]) -> None:
        super().__init__(f"shards {list(missing)} did not answer; the result holds the other shards' best only")
        self.ids, self.scores, self.missing = ids, scores, missing


class ShardsUnavailableError(RuntimeError):
    """No shard of a sharded version answered a search in time."""


@dataclass
class FanoutStats:
    """Counts of a sharded front's faults, kept across versions (Prometheus counters never go down): shard calls
    sent again after a failure, and answers that stayed partial (or had no shard at all)."""

    retries: dict[int, int] = field(default_factory=dict)  # shard -> calls retried
    partial: int = 0
    unavailable: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def retried(self, shard: int) -> None:
        with self._lock:
            self.retries[shard] = self.retries.get(shard, 0) + 1

    def answered(self, missing: int, shards: int) -> None:
        with self._lock:
            if missing == shards:
                self.unavailable += 1
            elif missing:
                self.partial += 1


class ShardedIndex(IndexVersion):
    """A sharded version: its shards' VectorIndexes and the whole catalog's entries."""

    def __init__(self, index_dir: Path, manifest: dict[str, Any], shards: list[VectorIndex], entries: Entries) -> None:
        self.index_dir, self.manifest, self.shards, self.entries = index_dir, manifest, shards, entries
        self.on_gpu = any(shard.on_gpu for shard in shards)
        self.fanout_stats = FanoutStats()  # in one process every shard answers: counted for the same metrics
        self._pool = ThreadPoolExecutor(len(shards), thread_name_prefix=f"shards-{index_dir.name}")

    @classmethod
    def open(cls, index_dir: Path, manifest: dict[str, Any], mmap: bool, use_gpu: str) -> ShardedIndex:
        """Every shard of a verified version directory, with its tuned setting, and the version's entries."""
        shards = []
        for shard in manifest["shards"]:
            shard_path = index_dir / shard["dir"]
            shard_manifest = store.read_manifest(shard_path)  # its files were verified with the version's
            if shard_manifest["index_id"] != shard["index_id"]:
                raise store.IndexFormatError(f"{shard_path}: holds index {shard_manifest['index_id']}, the version "
                                             f"lists {shard['index_id']}")
            on_gpu = resolve_gpu(use_gpu, shard_manifest["type"], "search")
            loaded = VectorIndex.open(shard_path, shard_manifest, mmap, on_gpu)
            loaded.use_tuned_setting()
            shards.append(loaded)
        ids, uris = store.read_uris(index_dir)
        if len(ids) != sum(shard.ntotal for shard in shards):
            raise store.IndexFormatError(f"{index_dir}: {store.URIS} lists {len(ids)} ids, its shards hold "
                                         f"{sum(shard.ntotal for shard in shards)}")
        entries = Entries(index_dir.name, ids, uris, store.read_metadata(index_dir), store.read_sources(index_dir))
        loaded = cls(index_dir, manifest, shards, entries)
        loaded.vector_store = joined_store([shard.vector_store for shard in shards])
        return loaded

    def search(self, queries: np.ndarray, k: int = 10,
               exclude_ids: Sequence[int | None] | np.ndarray | None = None,
               allow_ids: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As VectorIndex.search, over every shard: (ids (Q, n), scores (Q, n)), n = min(k, ntotal)."""
        self.check_k(k)
        answers = list(self._pool.map(lambda shard: shard.search(queries, k, exclude_ids, allow_ids), self.shards))
        return self.merge(answers, min(int(k), self.ntotal))

    @staticmethod
    def merge(answers: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores) of the k best of the shards' (ids, scores) answers, padded as faiss pads."""
        scores, ids = topk.merge([(scores, ids) for ids, scores in answers], len(answers[0][0]), k)
        return ids, scores


def joined_store(stores: list[VectorStore | None]) -> VectorStore | None:
    """One store over the shards' (their ids are disjoint); None when they keep no vectors."""
    if not stores or any(part is None for part in stores):
        return None
    return VectorStore([part for shard_store in stores if shard_store is not None for part in shard_store.parts])


def shard_vector_store(index_dir: Path, manifest: dict[str, Any]) -> VectorStore | None:
    """The vectors of a sharded version's shards, read from their directories (a front that holds no shard)."""
    stores = []
    for shard in manifest["shards"]:
        shard_path = index_dir / shard["dir"]
        stores.append(store.open_vector_store(shard_path, store.read_manifest(shard_path)))
    return joined_store(stores)


def load_index(index_dir: Path, use_gpu: str = "auto", verify: str = "sha256",
               mmap: bool = True) -> VectorIndex | ShardedIndex:
    """An index version, single or sharded, or the CURRENT one of a catalog directory (VectorIndex.load's
    arguments)."""
    if verify not in VERIFY:
        raise ValueError(f"verify={verify!r} is not one of {list(VERIFY)}")
    index_dir = store.resolve_index_dir(Path(index_dir))
    manifest = store.verify_index(index_dir, checksums=verify == "sha256")
    if manifest.get("layout") != store.SHARDED_LAYOUT:
        return VectorIndex.load(index_dir, use_gpu, verify="size", mmap=mmap)  # just verified
    loaded = ShardedIndex.open(index_dir, manifest, mmap, use_gpu)
    recall = manifest["recall"]
    log.info("index %s: %d shards of %s, %d vectors (recall@%d %.3f held out, merged)%s", index_dir,
             len(loaded.shards), manifest["type"], loaded.ntotal, recall["k"], recall["held_out"],
             "" if recall["target_met"] else " RECALL TARGET NOT MET")
    return loaded

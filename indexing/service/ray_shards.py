"""A sharded index version (indexing/index/sharded.py) served past one machine on Ray Serve: a deployment per shard,
each with its own replicas (a GPU each where the cluster has them), and a front that encodes the query once, sends
it to every shard and merges their top-k.

    serve run cirflow.indexing.service.ray_serve:app_builder index=/data/indexes/shop shards=4 shard_replicas=2

The front is the search service's own app (service.create_app): the same routes, checks, metrics and hot
reload, with versions whose index is `RemoteShards` instead of one loaded in its process. Its entries (uris,
metadata, the filters' allowed ids) are the version's, read in the front; the shards hold vectors only.

One version answers a request across every shard, and the response names it: the front resolves CURRENT, and a
new version is swapped in only once every shard deployment has loaded its shard of it (all or none: a shard
that fails to load leaves the old version serving, counted as a failed reload). Each request carries its
version to every shard; a shard replica holds the versions asked of it (the two most recent), loading one it
lacks from the shared index directory (a replica started after the switch, or one the front's prepare call did
not reach).

Faults: each shard call has the request's deadline (`shard_timeout_s`). A call that fails (its replica died:
Ray Serve starts another) or times out is sent again once if time remains, to whichever replica Serve picks.
A shard still missing after that leaves the answer partial: the other shards' merged top-k, flagged
`"partial": true` with the missing shards named, never a silently shorter list; no shard at all is a 503. The
front awaits its shard calls on its event loop: a request thread encodes, none waits on the network. The front's metrics count retries per shard and partial / unavailable answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from cirflow.indexing.search import VectorIndex
from cirflow.indexing.search import index_store as store
from cirflow.indexing.search.entries import Entries, SearchError
from cirflow.indexing.search.placement import gpu_count, resolve_gpu
from cirflow.indexing.search.sharded import FanoutStats, ShardedIndex, ShardsUnavailableError, shard_vector_store
from cirflow.indexing.search.vector_index import IndexVersion
from cirflow.indexing.service.app import create_app
from cirflow.indexing.service.state import Published, ServiceConfig, ServiceError

log = logging.getLogger(__name__)

KEEP_VERSIONS = 2  # a shard replica's loaded versions: the served one and the one before (requests in flight)
PREPARE_TIMEOUT_S = 600.0  # a shard's load of a new version (checksums of a large shard take minutes)


class ShardServer:
    """One shard replica's loaded versions of shard `part` of a catalog's sharded versions."""

    def __init__(self, catalog_dir: Path, part: int, verify: str = "sha256", use_gpu: str = "auto") -> None:
        self.catalog_dir, self.part, self.verify, self.use_gpu = Path(catalog_dir), part, verify, use_gpu
        self._versions: OrderedDict[str, VectorIndex] = OrderedDict()
        self._lock = threading.Lock()  # one load at a time; searches read the dict without it

    def prepare(self, version: str) -> int:
        """Load (or keep) this shard of `version`; its vector count."""
        return self.index(version).ntotal

    def search(self, version: str, queries: np.ndarray, k: int, exclude_ids: Sequence[int | None] | None,
               allow_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        return self.index(version).search(queries, k, exclude_ids, allow_ids)

    def index(self, version: str) -> VectorIndex:
        loaded = self._versions.get(version)
        if loaded is not None:
            return loaded
        with self._lock:
            if version not in self._versions:
                self._versions[version] = self._load(version)
                while len(self._versions) > KEEP_VERSIONS:
                    dropped, _ = self._versions.popitem(last=False)
                    log.info("shard %d: dropped version %s", self.part, dropped)
            return self._versions[version]

    def _load(self, version: str) -> VectorIndex:
        version_dir = self.catalog_dir / version
        if "/" in version or version.startswith(".") or not (version_dir / store.MANIFEST).is_file():
            raise SearchError(f"no index version {version!r} in {self.catalog_dir}")
        manifest = store.read_manifest(version_dir)
        if manifest.get("layout") != store.SHARDED_LAYOUT or self.part >= len(manifest["shards"]):
            raise SearchError(f"index version {version} has no shard {self.part}")
        shard_dir = version_dir / manifest["shards"][self.part]["dir"]
        shard_manifest = store.verify_index(shard_dir, checksums=self.verify == "sha256")
        index = VectorIndex.open(shard_dir, shard_manifest, True, resolve_gpu(self.use_gpu, shard_manifest["type"],
                                                                              "search"))
        index.use_tuned_setting()
        log.info("shard %d: loaded version %s (%d vectors)", self.part, version, index.ntotal)
        return index


@serve.deployment(ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
class ShardDeployment:
    """A replica of one shard: loads the shard of the catalog's CURRENT version when it starts, answers for any."""

    def __init__(self, catalog_dir: str, part: int, verify: str) -> None:
        self.server = ShardServer(Path(catalog_dir), part, verify)
        if (Path(catalog_dir) / store.CURRENT).is_file():  # ready for the common case before the first request
            self.server.prepare(store.resolve_index_dir(Path(catalog_dir)).name)

    def prepare(self, version: str) -> int:
        return self.server.prepare(version)

    def search(self, version: str, queries: np.ndarray, k: int, exclude_ids: Sequence[int | None] | None,
               allow_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        return self.server.search(version, queries, k, exclude_ids, allow_ids)

    def pid(self) -> int:
        return os.getpid()


class RemoteShards(IndexVersion):
    """One sharded version as the front sees it: its manifest and entries here, its shards behind `handles`,
    searched with `await search_async(...)` on the front's event loop (no request thread waits on the network)."""

    remote = True

    def __init__(self, index_dir: Path, handles: list[DeploymentHandle], timeout_s: float, stats: FanoutStats,
                 verify: str = "size") -> None:
        self.index_dir, self.handles, self.timeout_s, self.fanout_stats = index_dir, handles, timeout_s, stats
        self.manifest = store.verify_index(index_dir, checksums=verify == "sha256")
        if self.manifest.get("layout") != store.SHARDED_LAYOUT:
            raise ServiceError(f"{index_dir} is not a sharded version: the sharded front serves sharded versions "
                               f"of {len(handles)} shards")
        if len(self.manifest["shards"]) != len(handles):
            raise ServiceError(f"{index_dir} has {len(self.manifest['shards'])} shards, the deployment serves "
                               f"{len(handles)}; deploy it with shards={len(self.manifest['shards'])}")
        ids, uris = store.read_uris(index_dir)
        self.entries = Entries(index_dir.name, ids, uris, store.read_metadata(index_dir), store.read_sources(index_dir))
        self.vector_store = shard_vector_store(index_dir, self.manifest)  # the re-ranker's, read here
        self.on_gpu = False  # the front holds no FAISS index: nothing to take turns on
        # All or none: every shard deployment holds its shard of this version before it is served.
        loads = [handle.prepare.remote(index_dir.name) for handle in handles]
        counts = [load.result(timeout_s=PREPARE_TIMEOUT_S) for load in loads]
        if sum(counts) != len(ids):
            raise ServiceError(f"{index_dir}: the shards hold {sum(counts)} vectors, {store.URIS} lists {len(ids)}")

    async def search_async(self, queries: np.ndarray, k: int = 10,
                           exclude_ids: Sequence[int | None] | np.ndarray | None = None,
                           allow_ids: Sequence[int] | np.ndarray | None = None
                           ) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
        """As ShardedIndex.search, each shard remote and awaited together: (ids, scores, the shards missing from
        them; none: whole). Raises ShardsUnavailableError when no shard answered (module docstring)."""
        queries = self.check_queries(queries)
        self.check_k(k)
        allow = None if allow_ids is None else np.asarray(list(allow_ids) if isinstance(allow_ids, (set, frozenset))
                                                          else allow_ids)
        args = (self.index_dir.name, queries, int(k), exclude_ids, allow)
        deadline = time.monotonic() + self.timeout_s
        answers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        parts = list(range(len(self.handles)))
        for attempt in (0, 1):
            outcomes = await asyncio.gather(*(self._call(part, args, deadline) for part in parts))
            failed = []
            for part, outcome in zip(parts, outcomes):
                if isinstance(outcome, SearchError):
                    raise outcome  # the request's own fault (a bad k or id list): every shard would say the same
                if isinstance(outcome, Exception):  # a dead replica, a timeout, an overloaded deployment
                    log.warning("shard %d: search failed (%s: %s)%s", part, type(outcome).__name__, outcome,
                                "" if attempt else "; sending it again")
                    failed.append(part)
                else:
                    answers[part] = outcome
            if not failed or attempt or time.monotonic() >= deadline:
                break
            for part in failed:
                self.fanout_stats.retried(part)
            parts = failed
        missing = tuple(sorted(set(range(len(self.handles))) - set(answers)))
        self.fanout_stats.answered(len(missing), len(self.handles))
        if len(missing) == len(self.handles):
            raise ShardsUnavailableError(f"no shard of index {self.index_dir.name} answered within "
                                         f"{self.timeout_s:g} s")
        ids, scores = ShardedIndex.merge([answers[part] for part in sorted(answers)], min(int(k), self.ntotal))
        return ids, scores, missing

    async def _call(self, part: int, args: tuple, deadline: float) -> tuple[np.ndarray, np.ndarray] | Exception:
        """Shard `part`'s answer by the deadline, or what went wrong."""
        call = self.handles[part].search.remote(*args)
        try:
            return await asyncio.wait_for(call, max(0.0, deadline - time.monotonic()))
        except Exception as e:
            call.cancel()  # a call still queued for a replica would run for nobody
            return e


@serve.deployment(ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
@serve.ingress()
class FrontDeployment:
    """The search service's app over the shard deployments: encodes, fans out, merges."""

    def __init__(self, config: ServiceConfig, shard_timeout_s: float, *shards: DeploymentHandle) -> None:
        self.config = config
        stats = FanoutStats()  # one for the front's life: the counters survive version swaps
        self.published = Published(config, lambda path: RemoteShards(path, list(shards), shard_timeout_s, stats,
                                                                     config.verify))
        self.search_app: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        self.search_app = create_app(self.config, self.published)
        return self.search_app

    def check_health(self) -> None:
        if self.published.load_error is not None:
            raise RuntimeError(self.published.load_error)


def sharded_deployment(config: ServiceConfig, shards: int, shard_replicas: int = 1, replicas: int = 1,
                       cpus_per_replica: float = 1.0, shard_timeout_s: float = 2.0) -> Application:
    """The bound application: `shards` shard deployments ("shard-0", ...) of `shard_replicas` replicas each (one
    GPU each when the cluster has GPUs and faiss sees one here), and the front of `replicas` replicas."""
    if shards < 1 or shard_replicas < 1 or replicas < 1 or cpus_per_replica <= 0 or shard_timeout_s <= 0:
        raise ServiceError(f"shards, shard_replicas and replicas must be >= 1, cpus_per_replica and "
                           f"shard_timeout_s > 0; got {shards}, {shard_replicas}, {replicas}, {cpus_per_replica}, "
                           f"{shard_timeout_s}")
    if not (Path(config.index) / store.CURRENT).is_file():
        raise ServiceError(f"the sharded front serves a catalog directory's CURRENT version; {config.index} has no "
                           f"{store.CURRENT}")
    gpus = 1 if gpu_count() else 0
    bound = [ShardDeployment.options(name=f"shard-{part}", num_replicas=shard_replicas,
                                     ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus}
                                     ).bind(str(config.index), part, config.verify) for part in range(shards)]
    return FrontDeployment.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica}
                                   ).bind(config, shard_timeout_s, *bound)


def shards_of(catalog_dir: Path) -> int:
    """How many shards the catalog's CURRENT version has (1 for a single index)."""
    manifest = store.read_manifest(store.resolve_index_dir(Path(catalog_dir)))
    return len(manifest["shards"]) if manifest.get("layout") == store.SHARDED_LAYOUT else 1


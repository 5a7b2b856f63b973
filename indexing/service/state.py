"""What the search service serves: its configuration, the loaded (index, bundle) version, and hot reload.

A `Version` is one index version with the bundle its vectors came from, loaded whole before it is served. The
`Published` holder swaps versions by replacing one reference: a request reads `published.version` once and
uses that object to the end, so it never mixes two versions, and the old one stays alive (ORT sessions, the
memory-mapped index) until the last request holding it returns. A watcher thread polls the catalog's CURRENT
pointer; when it names another index version, that version (and its bundle, when the bundle changed too) is
loaded beside the one being served and swapped in only once it loaded and verified. A version that fails to
load is logged and counted, and the old one keeps serving; the load is tried again once CURRENT moves or the
failed version's files (or the bundles) change, not at every poll (a load checks every file's sha256).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cirflow.core.config import check_integer, check_non_negative, check_positive
from cirflow.export.manifest import MANIFEST, BundleError, read_manifest
from cirflow.export.runtime import BundleRuntime
from cirflow.indexing.search import Searcher, ShardedIndex, VectorIndex, load_index
from cirflow.indexing.search import index_store as store
from cirflow.indexing.service.security import ApiKeyError, check_api_key
from cirflow.models.images import ImageLimits

log = logging.getLogger(__name__)

MODES = ("composed", "image-only", "text-only")


class ServiceError(ValueError):
    """The service cannot start as configured (paths, limits); the message names the setting."""


@dataclass(frozen=True)
class ServiceConfig:
    index: Path  # a catalog's index directory (its CURRENT is served and watched) or one index version
    # A bundle directory, or a directory of bundles searched for the index's bundle_id; None: the bundles/
    # directory of the index's work directory (WORKDIR/indexes/<catalog> -> WORKDIR/bundles).
    bundle: Path | None = None
    providers: str = "auto"  # ONNX Runtime providers (export.runtime.PROVIDERS)
    verify: str = "sha256"  # index files checked at each load: "sha256" or "size" (huge indexes)
    reload_seconds: float = 2.0  # how often CURRENT is checked; 0 turns hot reload off
    workers: int = 0  # threads that decode, encode and search; 0 = one per core
    ort_threads: int = 1  # ONNX Runtime intra-op threads per request (requests run side by side)
    max_k: int = 100
    max_rerank_n: int = 1000  # a request's rerank_n (a bundle with a re-ranker): candidates re-scored per query
    max_body_bytes: int = 16 * 2**20
    # Uploads and catalog images pass the image gate with these: bytes, pixels (from the header, before anything
    # is decoded) and the format allow-list.
    images: ImageLimits = ImageLimits()
    max_text_chars: int = 1000
    max_ids: int = 10_000  # entries of exclude_ids / allow_ids in one request
    # A bearer token for search, the items and /api/info (indexing/service/security.py); None: open. Kept out of repr
    # (configs get logged).
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        limits = ("max_k", "max_rerank_n", "max_body_bytes", "max_text_chars", "max_ids", "ort_threads")
        check_integer(self, *limits, "workers", error=ServiceError)
        check_positive(self, *limits, error=ServiceError)
        check_non_negative(self, "workers", "reload_seconds", error=ServiceError)
        if not isinstance(self.images, ImageLimits):
            raise ServiceError(f"images must be an ImageLimits, got {self.images!r}")
        try:
            check_api_key(self.api_key)
        except ApiKeyError as e:
            raise ServiceError(str(e)) from e

    @property
    def threads(self) -> int:
        return self.workers or os.cpu_count() or 1


@dataclass(frozen=True)
class Version:
    """One servable pair: an index version and the bundle whose vectors it holds."""

    searcher: Searcher
    loaded_at: float  # time.time() when it was loaded
    # faiss GPU indexes are not thread-safe (their StandardGpuResources: one stream and scratch memory, made for
    # this version by placement.to_gpu): its searches take turns under this lock. CPU indexes do not take it.
    search_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def searching(self) -> AbstractContextManager[Any]:
        """What one search of this version runs under: its lock when the index is on GPU, nothing on CPU."""
        return self.search_lock if self.index.on_gpu else nullcontext()

    @property
    def index(self) -> VectorIndex | ShardedIndex:
        return self.searcher.index

    @property
    def index_id(self) -> str:
        return self.index.manifest["index_id"]

    @property
    def bundle_id(self) -> str:
        return self.index.bundle_id

    @property
    def catalog(self) -> str:
        return self.index.manifest["catalog"]


def find_bundle(config: ServiceConfig, index_dir: Path, bundle_id: str) -> Path:
    """The bundle directory holding `bundle_id`: config.bundle itself when it is one bundle, else the bundle with
    that id under config.bundle (or WORKDIR/bundles beside WORKDIR/indexes)."""
    if config.bundle is not None and (config.bundle / MANIFEST).is_file():
        return config.bundle  # Searcher refuses it if its bundle_id is not the index's
    root = bundle_source(config, index_dir)
    if not root.is_dir():
        raise ServiceError(f"index {index_dir} holds vectors of bundle {bundle_id}, and {root} is not a directory "
                           "of bundles to find it in; pass --bundle DIR (a bundle, or a directory of bundles)")
    for candidate in sorted(p for p in root.iterdir() if (p / MANIFEST).is_file()):
        try:
            if read_manifest(candidate).get("bundle_id") == bundle_id:
                return candidate
        except BundleError as e:
            log.warning("skipping %s while looking for bundle %s: %s", candidate, bundle_id, e)
    raise ServiceError(f"index {index_dir} holds vectors of bundle {bundle_id}, which no bundle under {root} is; "
                       "export it there, or pass --bundle DIR")


def bundle_source(config: ServiceConfig, index_dir: Path) -> Path:
    """Where an index's bundle is looked for: config.bundle (one bundle, or a directory of bundles), else
    WORKDIR/bundles beside WORKDIR/indexes/<catalog>/<version>."""
    return config.bundle if config.bundle is not None else index_dir.parent.parent.parent / "bundles"


def load_stamp(config: ServiceConfig, index_dir: Path) -> tuple[tuple[Any, ...], ...]:
    """What a load of `index_dir` reads, as seen from the directory entries alone (nothing is read or hashed):
    (path, inode, size, mtime) of each entry of the version directory and of the bundle source. A copy that
    finishes, a file replaced or repaired, or a bundle exported into place changes it."""
    entries: list[tuple[Any, ...]] = []
    for directory in (index_dir, bundle_source(config, index_dir)):
        try:
            with os.scandir(directory) as scan:
                for entry in scan:
                    stat = entry.stat()
                    entries.append((entry.path, stat.st_ino, stat.st_size, stat.st_mtime_ns))
        except OSError as e:  # missing or unreadable: that too is a state, which changes when it is fixed
            entries.append((str(directory), type(e).__name__))
    return tuple(sorted(entries, key=lambda entry: entry[0]))


# index version directory -> the index that answers for it: load_index in this process, or a sharded front's
# remote shards (service/ray_shards.py)
OpenIndex = Callable[[Path], Any]


def load_version(config: ServiceConfig, index_dir: Path, previous: Version | None = None,
                 open_index: OpenIndex | None = None) -> Version:
    """Load an index version and its bundle; the previous version's bundle is reused when it is the same one."""
    index = (open_index or (lambda path: load_index(path, use_gpu="auto", verify=config.verify)))(index_dir)
    if previous is not None and previous.bundle_id == index.bundle_id:
        runtime = previous.searcher.runtime
    else:
        bundle_dir = find_bundle(config, index.index_dir, index.bundle_id)
        runtime = BundleRuntime.load(bundle_dir, providers=config.providers, intra_op_threads=config.ort_threads)
    return Version(Searcher(index, runtime), time.time())


class Published:
    """The version being served, and the watcher that swaps in a new one when the catalog's CURRENT moves."""

    def __init__(self, config: ServiceConfig, open_index: OpenIndex | None = None) -> None:
        self.config = config
        self.open_index = open_index  # None: load_index in this process
        self.version: Version | None = None  # read once per request; replaced whole, never modified
        self.reloads = {"ok": 0, "failed": 0}
        self.last_error: str | None = None  # of the last failed reload
        self.load_error: str | None = None  # of the first load, which left nothing to serve
        self._failed_target: Path | None = None
        self._failed_stamp: tuple | None = None  # load_stamp of _failed_target when its load failed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def watching(self) -> bool:
        """Whether the index path is a catalog directory with a CURRENT pointer (one version is never reloaded)."""
        return (Path(self.config.index) / store.CURRENT).is_file()

    def load(self) -> Version:
        """The first load: any error propagates (the service must not start without a version)."""
        index_dir = store.resolve_index_dir(Path(self.config.index))
        self.version = load_version(self.config, index_dir, open_index=self.open_index)
        log.info("serving index %s (catalog %s, %d vectors) with bundle %s", self.version.index_id,
                 self.version.catalog, self.version.index.ntotal, self.version.bundle_id)
        return self.version

    def check(self) -> bool:
        """Swap in the version CURRENT names if it is not the one served; True when a new version was swapped in.
        A failure is logged once per target and counted; the served version stays."""
        current = self.version
        try:
            target = store.resolve_index_dir(Path(self.config.index))
        except Exception as e:  # a pointer being replaced or damaged: keep serving, look again next poll
            self._failed(None, f"cannot resolve {self.config.index}: {e}")
            return False
        if current is not None and target.resolve() == current.index.index_dir.resolve():
            self._failed_target = self._failed_stamp = None  # CURRENT came back: moving it again tries again
            return False
        stamp = load_stamp(self.config, target)
        if target == self._failed_target and stamp == self._failed_stamp:
            return False  # it failed as it is now: hashing every file again would fail again
        try:
            version = load_version(self.config, target, current, self.open_index)
        except Exception as e:  # any load failure keeps the old version serving
            # The stamp was taken before the load: a change made while it ran is tried again.
            self._failed(target, f"cannot load index version {target}: {e}", stamp)
            return False
        self.version = version  # the swap: one reference assignment
        self.reloads["ok"] += 1
        self._failed_target, self._failed_stamp, self.last_error = None, None, None
        log.info("hot reload: now serving index %s (bundle %s, %d vectors); was %s", version.index_id,
                 version.bundle_id, version.index.ntotal, current.index_id if current else None)
        return True

    def _failed(self, target: Path | None, message: str, stamp: tuple | None = None) -> None:
        """Count and log a failed reload: an error once per target; a target tried again because its files
        changed, and failing again, is a warning."""
        self.reloads["failed"] += 1
        self.last_error = message
        serving = self.version.index_id if self.version else None
        if target is None:
            log.error("hot reload: %s; still serving index %s", message, serving)
        elif target != self._failed_target:
            log.error("hot reload: %s; still serving index %s (tried again once CURRENT moves or this version's "
                      "files change)", message, serving)
        else:
            log.warning("hot reload: %s (tried again: its files changed); still serving index %s", message, serving)
        self._failed_target, self._failed_stamp = target, stamp

    def start_watching(self) -> None:
        if self.config.reload_seconds == 0:
            log.info("hot reload off (reload_seconds=0)")
            return
        if not self.watching:
            log.info("hot reload off: %s is one index version, not a catalog directory with %s", self.config.index,
                     store.CURRENT)
            return
        self._thread = threading.Thread(target=self._watch, name="cirflow-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _watch(self) -> None:
        while not self._stop.wait(self.config.reload_seconds):
            self.check()

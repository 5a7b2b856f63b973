"""The worker side of the embedding job: a worker builds whole shards (ShardBuilder, one Ray actor per model
copy, or the job's own process for a small delta) and writes them itself.

For each shard it reads the shard's catalog rows from the snapshot's catalog.parquet, carries over the vectors
and errors rows of entries unchanged since the previous snapshot, reads, decodes and embeds the others, and
writes the shard's files. A row whose image cannot be read gets its reason in the shard's errors file; every
catalog entry of the shard ends up in one of the two. An embedded row records the format its bytes decoded as and
their sha256 (carried over with the vector), which the search service checks before it serves the image.

Every image is read and decoded through the image gate (models/images.py) under the job's ImageLimits
(EmbedConfig.images): what is not a regular file (a FIFO, a device, a directory) or is over max_bytes is refused
before it is read, a format outside `formats` or a picture over max_pixels before it is decoded, and anything a
decoder raises becomes an ImageError.

A failure is either a property of the input (permanent) or of the moment (transient), and only the first may be
recorded as the image's fate:
- permanent: the file is missing (a dangling symlink too), a directory, not a directory on the path, a symlink
  loop, a name too long, unreadable for its permissions, a uri no filesystem understands (ValueError), empty, or
  refused by the gate (ImageError: not a regular file, too many bytes or pixels, a format not allowed, corrupt,
  truncated, not an image). Reading it again gives the same answer until the entry changes, and a refresh carries
  the errors row over unread.
- transient: every other failure to get the bytes: any other OSError (EIO, ESTALE, a timeout, a lost
  connection), ImportError or CatalogError (fsspec or the scheme's package missing on this node), and any
  unexpected exception from the filesystem (botocore, aiohttp, ...). A batch's transient failures are read again
  after `retry_backoff_seconds`, twice that, ... up to `read_retries` times; those still failing are errors rows
  marked transient, which a refresh never carries over: the next run reads them again (indexing/embedding/job.py).
A worker whose whole batch failed transiently (an outage, not one flaky read) reads the following batches once,
without waiting between retries, until a read succeeds again: an outage is not waited out image by image.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from cirflow.core.config import to_dict
from cirflow.core.files import location
from cirflow.indexing.embedding import shards
from cirflow.indexing.embedding.catalog import SOURCE_COLUMNS, CatalogError, read_bytes
from cirflow.models.images import ImageLimits, decode
from cirflow.models.preprocess import ImageError, PreprocessConfig, normalize_uint8, resize_uint8

if TYPE_CHECKING:
    from cirflow.core.files import Location

log = logging.getLogger(__name__)


# OSErrors that describe the input, whatever the filesystem: reading again gives the same answer.
PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
PERMANENT_ERRNOS = frozenset({errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG,
                              errno.EACCES, errno.EPERM})


class TransientReadError(ImageError):
    """The bytes could not be read for a reason of the moment (storage, network, this node), not of the input."""


@dataclass(frozen=True)
class EntryImage:
    """A catalog entry's image as the job embeds and records it."""

    pixels: np.ndarray  # (H, W, 3) uint8 at the bundle's size
    format: str  # what its bytes decoded as (PIL's name: "PNG", "JPEG", ...)
    sha256: str  # hex digest of exactly the bytes read


def read_entry(uri: str, preprocess: PreprocessConfig, limits: ImageLimits) -> EntryImage:
    """Read and decode one entry through the image gate; raises ImageError with a one-line reason,
    TransientReadError when reading the bytes failed for a reason that may pass (module docstring)."""
    try:
        data = read_bytes(uri, limits)
    except ImageError:  # the gate's refusal (not a regular file, too large): before ValueError, of which it is one
        raise
    except FileNotFoundError as e:  # also a dangling symlink
        raise ImageError("file not found") from e
    except (ConnectionError, TimeoutError) as e:  # OSErrors too, but never the input's
        raise TransientReadError(f"cannot read: {type(e).__name__}: {e}") from e
    except OSError as e:  # the reason alone, the row has the uri
        reason = f"cannot read ({e.strerror or e})"
        if isinstance(e, PERMANENT_OS_ERRORS) or e.errno in PERMANENT_ERRNOS:
            raise ImageError(reason) from e  # a directory, a symlink loop, permissions
        raise TransientReadError(reason) from e
    except CatalogError as e:  # fsspec missing on this node: before ValueError, of which it is one
        raise TransientReadError(f"cannot read: {e}") from e
    except ValueError as e:  # an unknown scheme, a malformed uri: the uri's own
        raise ImageError(f"cannot read: {type(e).__name__}: {e}") from e
    except Exception as e:  # a missing scheme package (ImportError), any filesystem's own failure
        raise TransientReadError(f"cannot read: {type(e).__name__}: {e}") from e
    if not data:
        raise ImageError("empty file (0 bytes)")
    decoded = decode(data, limits, uri)
    return EntryImage(resize_uint8(decoded.image, preprocess), decoded.format, hashlib.sha256(data).hexdigest())


def read_image(uri: str, preprocess: PreprocessConfig, limits: ImageLimits | None = None) -> np.ndarray:
    """read_entry's pixels alone, under the default limits unless given (benchmarks time the job's reading with
    it)."""
    return read_entry(uri, preprocess, limits or ImageLimits()).pixels


def decode_batch(batch: dict[str, np.ndarray], preprocess: PreprocessConfig, retries: int = 0,
                 backoff_seconds: float = 0.0, limits: ImageLimits | None = None) -> dict[str, np.ndarray]:
    """Rows (id, uri) -> + pixels (B, H, W, 3) uint8, format and sha256 (str, None where not decoded), error
    (str, "" when decoded) and transient (bool: the error is of the moment), read under `limits` (None: the
    defaults). The rows that failed transiently are read again, together, after backoff_seconds, then twice
    that, ..., `retries` times at most."""
    n, size = len(batch["id"]), preprocess.size
    limits = limits or ImageLimits()
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    formats = np.full(n, None, dtype=object)
    sha256s = np.full(n, None, dtype=object)
    errors = np.full(n, "", dtype=object)
    transient = np.zeros(n, dtype=bool)
    todo = list(range(n))
    for attempt in range(retries + 1):
        if attempt:
            delay = backoff_seconds * 2 ** (attempt - 1)
            log.info("%d transient read failure(s); reading them again in %.2f s (retry %d of %d)", len(todo), delay,
                     attempt, retries)
            time.sleep(delay)
        failed = []
        for i in todo:
            try:
                entry = read_entry(str(batch["uri"][i]), preprocess, limits)
                pixels[i], formats[i], sha256s[i] = entry.pixels, entry.format, entry.sha256
                errors[i], transient[i] = "", False
            except TransientReadError as e:
                errors[i], transient[i] = f"{e}; transient, {attempt + 1} attempt(s)", True
                failed.append(i)
            except ImageError as e:
                errors[i], transient[i] = str(e), False
        todo = failed
        if not todo:
            break
    return {**batch, "pixels": pixels, "format": formats, "sha256": sha256s, "error": errors, "transient": transient}


class ImageEmbedder:
    """Holds one bundle runtime (loaded once per actor) and embeds the decoded rows of each batch."""

    def __init__(self, bundle_dir: str, providers: str, require_gpu: bool, threads: int) -> None:
        from cirflow.export.runtime import BundleRuntime  # onnxruntime loads in the actor, not in the driver

        self.runtime = BundleRuntime.load(Path(bundle_dir), providers=providers, require_gpu=require_gpu,
                                          intra_op_threads=threads)
        self.preprocess = self.runtime.preprocess

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        vectors = np.zeros((len(ok), self.runtime.embed_dim), dtype=np.float32)
        if ok.any():
            vectors[ok] = self.runtime.encode_images(normalize_uint8(batch["pixels"][ok], self.preprocess))
        return {"id": batch["id"], "uri": batch["uri"], "embedding": vectors, "format": batch["format"],
                "sha256": batch["sha256"], "error": batch["error"], "transient": batch["transient"]}


def compare_rows(new: pa.Table, old: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `new` (id, uri, version; sorted by id) against `old` (the same columns, sorted by id):
    (present: its id is in old, same: and with the same uri and version)."""
    new_ids, old_ids = new.column("id").to_numpy(), old.column("id").to_numpy()
    if not len(old_ids):
        nothing = np.zeros(len(new_ids), bool)
        return nothing, nothing.copy()
    pos = np.searchsorted(old_ids, new_ids).clip(max=len(old_ids) - 1)
    present = old_ids[pos] == new_ids
    same = present.copy()
    for column in ("uri", "version"):
        ours = np.array(new.column(column).to_pylist(), dtype=object)
        theirs = np.array(old.column(column).to_pylist(), dtype=object)
        same &= ours == theirs[pos]
    return present, same


@dataclass(frozen=True)
class ShardJob:
    """What every shard of one embedding snapshot shares: where to read and write, and the encoder to load."""

    snapshot_dir: str  # the snapshot directory: its catalog.parquet lists the entries, the shards are written there
    previous_dir: str | None  # the snapshot whose unchanged entries' vectors and errors rows carry over
    bundle_dir: str
    bundle_id: str
    dim: int
    batch_size: int
    providers: str = "cpu"
    require_gpu: bool = False
    threads: int = 1
    read_retries: int = 0  # transient read failures of a batch are read again this many times ...
    retry_backoff_seconds: float = 0.0  # ... after this long, doubling each time (EmbedConfig has the defaults)
    images: ImageLimits = field(default_factory=ImageLimits)  # what the image gate lets through (EmbedConfig.images)


class ShardBuilder:
    """A worker: builds whole shards of a snapshot from the catalog file, the previous snapshot and its own
    encoder, writes each shard's files in place (temp name, rename) and returns only their description, so
    no pixel or vector travels to the driver. The encoder loads on the first shard that has images to embed
    (a refresh whose shards are all reused never loads it)."""

    def __init__(self, job: ShardJob) -> None:
        self.job = job
        self.snapshot_dir = location(job.snapshot_dir)
        self.embedder: ImageEmbedder | None = None
        self.previous = PreviousSnapshot(location(job.previous_dir), job.images) if job.previous_dir else None
        self.outage = False  # the last batch read failed transiently for every row: retry no more until one works

    def __call__(self, k: int, lo: int, hi: int) -> dict[str, Any]:
        """Build shard k (catalog rows lo..hi-1 in id order); its description for the manifest."""
        rows = shards.read_rows(self.snapshot_dir / shards.CATALOG, lo, hi, ["id", "uri", "version"])
        ids = rows.column("id").to_numpy()
        uris = np.array(rows.column("uri").to_pylist(), dtype=object)
        vectors = np.zeros((len(ids), self.job.dim), np.float32)
        formats = np.full(len(ids), None, dtype=object)
        sha256s = np.full(len(ids), None, dtype=object)
        errors = np.full(len(ids), "", dtype=object)
        transient = np.zeros(len(ids), bool)
        reused = np.zeros(len(ids), bool)
        if self.previous is not None and len(ids):
            reused, errors = self.previous.carry_over(rows, vectors, formats, sha256s)
        todo = np.flatnonzero(~reused)
        for start in range(0, len(todo), self.job.batch_size):
            at = todo[start:start + self.job.batch_size]
            batch = self._embed({"id": ids[at], "uri": uris[at]})
            vectors[at], formats[at], sha256s[at] = batch["embedding"], batch["format"], batch["sha256"]
            errors[at], transient[at] = batch["error"], batch["transient"]
        return write_shard(self.snapshot_dir, k, ids, uris, vectors, errors, transient, self.job.bundle_id,
                           formats, sha256s) | {"embedded": len(todo)}

    def node(self) -> str:
        """The Ray node this worker runs on (an actor's method: the job records how many nodes took part)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def _embed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.embedder is None:
            self.embedder = ImageEmbedder(self.job.bundle_dir, self.job.providers, self.job.require_gpu,
                                          self.job.threads)
        retries = 0 if self.outage else self.job.read_retries
        decoded = decode_batch(batch, self.embedder.preprocess, retries, self.job.retry_backoff_seconds,
                               self.job.images)
        outage = bool(decoded["transient"].all())
        if outage and not self.outage:
            # %r: a reason may hold a uri, and a file name may hold a newline (a forged log line)
            log.warning("every read of a batch of %d failed transiently after %d retries (%r); reading without "
                        "retries until one succeeds", len(batch["id"]), retries, decoded["error"][0])
        self.outage = outage
        return self.embedder(decoded)


def limits_changed(manifest: dict[str, Any], images: ImageLimits) -> bool:
    """Whether a snapshot (its manifest) was read through other image gate limits than `images`: then its errors
    rows are no verdict on today's limits. A snapshot from before the limits were recorded read with the defaults."""
    return manifest.get("images", to_dict(ImageLimits())) != to_dict(images)


class PreviousSnapshot:
    """The unchanged entries' vectors (with their format and sha256) and errors rows of the previous snapshot, read
    for one id range at a
    time: both snapshots are id-sorted, so a new shard needs one or two old ones (the last two read stay in
    memory), found from the old shards' id statistics without reading them."""

    def __init__(self, snapshot_dir: Location, images: ImageLimits) -> None:
        self.run = shards.open_snapshot(snapshot_dir, verify=False)  # the driver verified it when it planned the reuse
        self.retry_errors = limits_changed(self.run.manifest, images)
        self.ranges = [(lo, hi, path) for path in self.run.shard_files for lo, hi in [shards.id_range(path)]
                       if lo is not None]
        self.cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}

    def carry_over(self, rows: pa.Table, vectors: np.ndarray, formats: np.ndarray,
                   sha256s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fill `vectors`, `formats` and `sha256s` (None where the previous snapshot recorded none) for the rows
        (id, uri, version) that are unchanged since the previous snapshot; returns (reused mask, errors: the
        previous reason of unchanged rows that failed permanently, "" elsewhere). An unchanged row whose previous
        failure was transient is not reused: it is read again; nor is any failed row when the image gate's limits
        changed since the previous snapshot (a file refused as too large may pass a raised cap)."""
        ids = rows.column("id").to_numpy()
        id_filter = [("id", ">=", int(ids[0])), ("id", "<=", int(ids[-1]))]
        old = shards.read_table(self.run.snapshot_dir / shards.CATALOG, columns=["id", "uri", "version"],
                                filters=id_filter).sort_by("id")
        _, same = compare_rows(rows, old)
        failed = shards.read_errors(self.run.snapshot_dir / shards.ERRORS, filters=id_filter)
        reasons = dict(zip(failed.column("id").to_pylist(), failed.column("reason").to_pylist()))
        retried = failed if self.retry_errors else failed.filter(failed.column("transient"))
        retry = set(retried.column("id").to_pylist())
        reused = same & ~np.isin(ids, np.fromiter(retry, np.int64, len(retry)))
        errors = np.array([reasons.get(i, "") if r else "" for i, r in zip(ids.tolist(), reused)], dtype=object)
        good = reused & (errors == "")
        if good.any():
            vectors[good], formats[good], sha256s[good] = self._take(ids[good])
        return reused, errors

    def _take(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(vectors, formats, sha256s) of these sorted ids, from the old shards that hold them."""
        out = np.zeros((len(ids), self.run.dim), np.float32)
        formats = np.full(len(ids), None, dtype=object)
        sha256s = np.full(len(ids), None, dtype=object)
        found = np.zeros(len(ids), bool)
        for lo, hi, path in self.ranges:
            if hi < ids[0] or lo > ids[-1]:
                continue
            old_ids, vectors, old_formats, old_sha256s = self._read(path)
            pos = np.searchsorted(old_ids, ids).clip(max=len(old_ids) - 1)
            hit = old_ids[pos] == ids
            out[hit], formats[hit], sha256s[hit] = vectors[pos[hit]], old_formats[pos[hit]], old_sha256s[pos[hit]]
            found |= hit
        if not found.all():
            raise shards.EmbeddingsError(
                f"previous snapshot {self.run.snapshot_dir} lacks the vectors of ids {ids[~found][:5].tolist()} that "
                "its catalog lists; delete it to embed everything")
        return out, formats, sha256s

    def _read(self, path: Location) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if str(path) not in self.cache:
            if len(self.cache) >= 2:
                self.cache.pop(next(iter(self.cache)))
            table = shards.read_columns(path, ["id", "embedding", *SOURCE_COLUMNS])
            self.cache[str(path)] = (table.column("id").to_numpy(), shards.shard_vectors(table, self.run.dim, path),
                                     *(np.array(table.column(c).to_pylist(), dtype=object) for c in SOURCE_COLUMNS))
        return self.cache[str(path)]


def write_shard(snapshot_dir: Location, k: int, ids: np.ndarray, uris: np.ndarray, vectors: np.ndarray, errors: np.ndarray,
                transient: np.ndarray, bundle_id: str, formats: np.ndarray, sha256s: np.ndarray) -> dict[str, Any]:
    """Write shard k's Parquet file (with each embedded row's format and sha256; None: unknown) and, when some
    entries failed, its errors file (`transient` marks the failures of the moment; each temp name, then rename;
    a stale errors file of a killed attempt is removed); returns what the manifest records of them and the first
    failures, for the driver's log."""
    failed = np.array([bool(e) for e in errors], dtype=bool)
    ok = ~failed
    name = shards.shard_name(k)
    table = shards.embedding_table(ids[ok], [str(u) for u in uris[ok]], vectors[ok], bundle_id, list(formats[ok]),
                                   list(sha256s[ok]))
    info = shards.write_parquet_atomic(table, snapshot_dir / name)
    errors_path = snapshot_dir / shards.SHARD_ERRORS_DIR / name
    errors_info = None
    if failed.any():
        table = shards.error_table(ids[failed], [str(u) for u in uris[failed]], [str(e) for e in errors[failed]],
                                   transient[failed])
        errors_info = shards.write_parquet_atomic(table, errors_path)
    else:
        errors_path.unlink(missing_ok=True)
    first = list(zip([str(u) for u in uris[failed][:5]], [str(e) for e in errors[failed][:5]]))
    return {"name": name, "info": info, "errors_info": errors_info, "transient": int(transient[failed].sum()),
            "first_errors": first}

"""Transient read failures (a 503, a timeout, a node without s3fs) are retried with backoff and, still failing,
recorded as such and read again by the next run, even of an unchanged catalog; permanent ones (a corrupt file)
are recorded once and carried over unread. The reader is the job's own, wrapped to inject faults (the job runs
in-process here: a delta this small does not start Ray)."""

from __future__ import annotations

import errno
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import pytest

from cirflow.indexing.embedding import embed_stages, shards
from cirflow.indexing.embedding.catalog import CatalogConfig, CatalogError, load_catalog
from cirflow.indexing.embedding.embed_stages import TransientReadError, read_image
from cirflow.indexing.embedding.job import EmbedConfig, run_embed, snapshot_location
from cirflow.indexing.index.build import build_index
from cirflow.indexing.index.plan import IndexConfig
from cirflow.indexing.index.queries import Queries
from cirflow.indexing.index.refresh import refresh_index
from cirflow.indexing.search import VectorIndex
from cirflow.models.images import ImageLimits
from cirflow.models.preprocess import ImageError, PreprocessConfig
from tests.indexing.conftest import unit
from tests.indexing.test_embed import write_images

REAL_READ = embed_stages.read_bytes


class Faults:
    """Wraps the job's reader: counts the reads of each uri and raises `error` for the uris in `failing`
    (each its given number of times; None: every time)."""

    def __init__(self, error: Callable[[], Exception]) -> None:
        self.error = error
        self.failing: dict[str, int | None] = {}
        self.reads: Counter[str] = Counter()

    def __call__(self, uri: str, limits: ImageLimits | None = None) -> bytes:
        self.reads[uri] += 1
        left = self.failing.get(uri, 0)
        if left is None or left > 0:
            if left is not None:
                self.failing[uri] = left - 1
            raise self.error()
        return REAL_READ(uri, limits)


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    injected = Faults(lambda: OSError(errno.EIO, "Input/output error"))
    monkeypatch.setattr(embed_stages, "read_bytes", injected)
    return injected


def job(bundle: Path, folder: Path, workdir: Path) -> EmbedConfig:
    return replace(EmbedConfig(catalog=CatalogConfig(name="shop", folder=str(folder)), bundle=str(bundle),
                               workdir=str(workdir), rows_per_shard=8, batch_size=4),
                   read_retries=3, retry_backoff_seconds=0.01)


def uris_of(config: EmbedConfig) -> list[str]:
    return load_catalog(config.catalog).sort_by("id").column("uri").to_pylist()


def errors(snapshot_dir: Path) -> list[dict]:
    return pq.read_table(snapshot_dir / shards.ERRORS).to_pylist()


@pytest.mark.parametrize("error, transient, reason", [
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), False, "file not found"),
    (IsADirectoryError(errno.EISDIR, "Is a directory"), False, "cannot read (Is a directory)"),
    (OSError(errno.ELOOP, "Too many levels of symbolic links"), False, "cannot read (Too many levels"),
    (PermissionError("Access Denied"), False, "cannot read (Access Denied)"),  # s3fs: no errno
    (ValueError("Protocol not known: nosuchfs"), False, "cannot read: ValueError: Protocol not known"),
    (OSError(errno.EIO, "Input/output error"), True, "cannot read (Input/output error)"),
    (OSError(errno.ETIMEDOUT, "Connection timed out"), True, "cannot read: TimeoutError"),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), True, "cannot read: ConnectionResetError"),
    (TimeoutError(), True, "cannot read: TimeoutError"),
    (ImportError("Install s3fs to access S3"), True, "cannot read: ImportError: Install s3fs"),
    (CatalogError("uri s3://b/x.png: scheme 's3' needs fsspec"), True, "cannot read: uri s3://b/x.png"),
    (RuntimeError("botocore: SlowDown (503)"), True, "cannot read: RuntimeError: botocore: SlowDown"),
])
def test_a_read_failure_is_permanent_only_when_it_is_the_inputs(monkeypatch: pytest.MonkeyPatch,
                                                                error: Exception, transient: bool,
                                                                reason: str) -> None:
    def fail(uri: str, limits: ImageLimits | None = None) -> bytes:
        raise error

    monkeypatch.setattr(embed_stages, "read_bytes", fail)
    with pytest.raises(ImageError, match=f"^{reason}".replace("(", r"\(").replace(")", r"\)")) as raised:
        read_image("s3://bucket/x.png", PreprocessConfig())
    assert isinstance(raised.value, TransientReadError) == transient


def test_a_transient_failure_is_retried_with_backoff_within_the_run(tiny_bundle: Path, tmp_path: Path,
                                                                    faults: Faults) -> None:
    write_images(tmp_path / "shop", 10, seed=21)
    config = job(tiny_bundle, tmp_path / "shop", tmp_path / "work")
    flaky = uris_of(config)[5]
    faults.failing[flaky] = 2  # a throttled store: two 503s, then the bytes

    run = shards.open_snapshot(run_embed(config))

    assert faults.reads[flaky] == 3
    assert run.rows == 10 and run.manifest["errors"] == 0 and shards.transient_errors(run.manifest) == 0
    assert errors(run.snapshot_dir) == []


def test_a_persistent_transient_failure_is_read_again_by_the_next_run_of_the_same_catalog(
        tiny_bundle: Path, tmp_path: Path, faults: Faults) -> None:
    write_images(tmp_path / "shop", 12, seed=22)
    (tmp_path / "shop" / "corrupt.png").write_bytes(b"\x89PNG not really")
    config = job(tiny_bundle, tmp_path / "shop", tmp_path / "work")
    uris = uris_of(config)
    corrupt = next(u for u in uris if u.endswith("corrupt.png"))
    down = next(u for u in uris if u != corrupt)
    faults.failing[down] = None  # its store is down for the whole run

    first = run_embed(config)
    manifest = shards.read_manifest(first)
    assert faults.reads[down] == 4  # the first read and read_retries=3
    assert manifest["complete"] and manifest["rows"] == 11 and manifest["errors"] == 2
    assert shards.transient_errors(manifest) == 1
    rows = {e["uri"]: e for e in errors(first)}
    assert rows[down]["transient"] and rows[down]["reason"] == ("cannot read (Input/output error); transient, "
                                                                "4 attempt(s)")
    assert not rows[corrupt]["transient"] and "cannot decode" in rows[corrupt]["reason"]
    first_ids, first_vectors, _ = shards.open_snapshot(first).read_all()
    # An index of this snapshot, as the catalog flow builds and then refreshes it.
    queries = Queries.unreferenced(unit(np.random.default_rng(0).standard_normal((20, shards.open_snapshot(first).dim))))
    index = build_index(shards.open_snapshot(first), queries, tmp_path / "indexes", IndexConfig(index_type="flat"))

    # The same catalog, the store still down: not "nothing to do", a retry snapshot that reads only that entry.
    base = first.parent
    assert snapshot_location(base, load_catalog(config.catalog), config.rows_per_shard) == base / f"{first.name}-r1"
    faults.reads.clear()
    still = run_embed(config)
    assert still == base / f"{first.name}-r1" and faults.reads == Counter({down: 4})
    assert shards.transient_errors(shards.read_manifest(still)) == 1
    assert shards.open_snapshot(base).snapshot_dir == still and shards.read_manifest(still)["delta"]["retried"] == 1
    assert pq.read_table(still / shards.CHANGES).num_rows == 0  # failed again: no vector before or now
    index = refresh_index(shards.open_snapshot(still), queries, index, IndexConfig(index_type="flat"), max_fraction=0.5)
    assert index is not None and VectorIndex.load(index).ntotal == 11

    # The store is back: the next run reads it again (and nothing else: the corrupt file's row carries over).
    faults.failing.clear()
    faults.reads.clear()
    retried = run_embed(config)
    assert retried == base / f"{first.name}-r2" and faults.reads == Counter({down: 1})
    run = shards.open_snapshot(base)  # CURRENT moved to it
    assert run.snapshot_dir == retried
    assert run.rows == 12 and run.manifest["errors"] == 1 and shards.transient_errors(run.manifest) == 0
    assert [e["uri"] for e in errors(retried)] == [corrupt] and errors(retried)[0] == rows[corrupt]
    catalog = load_catalog(config.catalog)
    down_id = dict(zip(catalog.column("uri").to_pylist(), catalog.column("id").to_pylist()))[down]
    ids, vectors, _ = run.read_all()
    assert down_id in ids.tolist()
    kept = np.isin(ids, first_ids)
    assert vectors[kept].tobytes() == first_vectors.tobytes()  # the others carried over, byte for byte
    changes = pq.read_table(retried / shards.CHANGES).to_pylist()
    assert changes == [{"id": down_id, "change": "changed"}]
    delta = run.manifest["delta"]
    assert delta == {"previous": still.name, "added": 0, "changed": 0, "removed": 0, "unchanged": 13,
                     "reused_vectors": 11, "reused_errors": 1, "retried": 1}
    assert run.manifest["last_run"]["entries"] == 1
    assert shards.read_manifest(still)["rows"] == 11  # complete snapshots are never modified

    # Done: the next run of the unchanged catalog has nothing to do and writes nothing.
    stamp = (retried / shards.MANIFEST).read_bytes()
    faults.reads.clear()
    assert run_embed(config) == retried and not faults.reads
    assert (retried / shards.MANIFEST).read_bytes() == stamp
    assert snapshot_location(base, load_catalog(config.catalog), config.rows_per_shard) == retried

    # An overlay of the previous snapshot's index takes the retried image in.
    overlay = refresh_index(run, queries, index, IndexConfig(index_type="flat"), max_fraction=0.5)
    assert overlay is not None and VectorIndex.load(overlay).ntotal == 12


def test_a_refresh_of_a_changed_catalog_reads_transient_failures_again(tiny_bundle: Path, tmp_path: Path,
                                                                      faults: Faults) -> None:
    write_images(tmp_path / "shop", 9, seed=23)
    config = job(tiny_bundle, tmp_path / "shop", tmp_path / "work")
    down = uris_of(config)[2]
    faults.failing[down] = None
    first = run_embed(config)
    assert shards.transient_errors(shards.read_manifest(first)) == 1

    faults.failing.clear()
    faults.reads.clear()
    write_images(tmp_path / "shop" / "more", 1, seed=24)
    second = run_embed(config)
    assert second.name == shards.read_manifest(second)["catalog"]["snapshot"] and "-r" not in second.name
    assert set(faults.reads) == {down, next(u for u in uris_of(config) if "/more/" in u)}  # nothing else read
    run = shards.open_snapshot(second)
    assert run.rows == 10 and run.manifest["errors"] == 0
    assert run.manifest["delta"]["retried"] == 1 and run.manifest["delta"]["added"] == 1


def test_a_batch_that_fails_entirely_stops_the_waiting_until_a_read_succeeds(tiny_bundle: Path, tmp_path: Path,
                                                                            faults: Faults) -> None:
    """An outage is not waited out image by image: after a batch whose every read failed, the next batches are
    read once, without retries, until one read succeeds."""
    write_images(tmp_path / "shop", 12, seed=25)
    config = job(tiny_bundle, tmp_path / "shop", tmp_path / "work")
    uris = uris_of(config)
    for uri in uris[:8]:  # the first shard (8 rows): two batches of 4, all down
        faults.failing[uri] = None

    run = shards.open_snapshot(run_embed(config))

    # Batch 1: 4 reads x 4 attempts; batch 2: 4 single reads; the second shard's reads succeed.
    assert [faults.reads[u] for u in uris[:8]] == [4] * 4 + [1] * 4
    assert run.rows == 4 and shards.transient_errors(run.manifest) == 8

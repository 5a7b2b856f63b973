"""A catalog is hostile input: parsers that raise anything, a 2 GiB file, a FIFO, a directory, a symlink out of the
catalog, an HTML polyglot, control characters in names. The embedding job reads everything through the image gate
(models/images.py), records what it embedded (format, sha256) for the service, and completes, rerun or not."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import resource
import shutil
import struct
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cirflow.indexing.embedding import embed_stages, shards
from cirflow.indexing.embedding.catalog import CatalogConfig, CatalogError, folder_entries, load_catalog
from cirflow.indexing.embedding.embed_stages import decode_batch
from cirflow.indexing.embedding.job import EmbedConfig, run_embed
from cirflow.indexing.index.build import build_index
from cirflow.indexing.index.plan import IndexConfig
from cirflow.indexing.index.queries import Queries
from cirflow.indexing.search import ImageSource, UnknownIdError, VectorIndex, index_store
from cirflow.models.images import DEFAULT_FORMATS, ImageLimits
from cirflow.models.preprocess import PreprocessConfig
from tests.export.conftest import random_images
from tests.indexing.conftest import unit
from tests.indexing.test_embed import png_bytes

HUGE = 2 * 2**30
FORGED = "forged\nERROR cirflow: all is lost.png"  # a name that would write a log line of its own


def dds_pixel_format_0() -> bytes:
    """~300 bytes of DDS whose pixel format has no flags: PIL raises NotImplementedError."""
    header = struct.pack("<7I", 124, 0x1007, 4, 4, 0, 0, 0) + b"\0" * 44  # size, flags, height, width, ...
    pixel_format = struct.pack("<8I", 32, 0, 0, 0, 0, 0, 0, 0)  # size 32, flags 0, fourcc 0, bit count 0, masks 0
    data = b"DDS " + header + pixel_format + struct.pack("<5I", 0x1000, 0, 0, 0, 0)
    return data.ljust(300, b"\0")


def im_type_error() -> bytes:
    """An IM header whose size has three numbers: PIL raises TypeError."""
    return b"Image type: L image\r\nImage size (x*y): 4*4*4\r\n\x1a" + b"\0" * 64


def gray16_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)).save(buffer, format="PNG")
    return buffer.getvalue()


def hostile_folder(folder: Path) -> tuple[set[str], set[str]]:
    """Good images and every malformed entry of the issue in `folder`; (good names, bad names)."""
    folder.mkdir(parents=True)
    good = {f"img-{i}.png": png_bytes(p) for i, p in enumerate(random_images(4, 64, seed=11))}
    good["gray16.png"] = gray16_png()  # 16-bit grey: embedded, not clipped to white or refused
    good["x.html"] = png_bytes(random_images(1, 64, seed=12)[0]) + b"<script>alert(document.cookie)</script>"
    good["new\nline.png"] = png_bytes(random_images(1, 64, seed=13)[0])
    bad = {"x.dds": dds_pixel_format_0(), "x.png": dds_pixel_format_0(), "x.im": im_type_error(),
           FORGED: b"not an image"}
    for name, data in {**good, **bad}.items():
        (folder / name).write_bytes(data)
    with open(folder / "huge.png", "wb") as f:
        f.truncate(HUGE)  # sparse: 2 GiB that take no disk
    os.symlink("/etc/hostname", folder / "y.png")
    os.mkfifo(folder / "fifo.png")
    (folder / "dir.png").mkdir()
    return set(good), set(bad) | {"huge.png", "y.png", "fifo.png", "dir.png"}


def manifest_of(folder: Path, path: Path) -> Path:
    """A Parquet manifest listing every entry of `folder` (the FIFO and the directory too, which a folder catalog
    leaves out or walks), ids as a folder catalog gives them."""
    pq.write_table(folder_entries(folder, [folder / name for name in os.listdir(folder)]), path)
    return path


def job(bundle: Path, workdir: Path, manifest: Path) -> EmbedConfig:
    return EmbedConfig(catalog=CatalogConfig(name="hostile", manifest=str(manifest)), bundle=str(bundle),
                       workdir=str(workdir), rows_per_shard=4, batch_size=3)


def rss_bytes() -> int:
    """This process's resident memory now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def named(table: pa.Table, column: str) -> dict[str, object]:
    """File name -> the column's value, for each row."""
    return dict(zip((Path(u).name for u in table.column("uri").to_pylist()), table.column(column).to_pylist()))


def sources(snapshot_dir: Path) -> pa.Table:
    return shards.open_snapshot(snapshot_dir).read_sources()


def test_a_hostile_catalog_is_embedded_recorded_and_refreshed(combiner_bundle: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "catalog"
    good, bad = hostile_folder(folder)
    config = job(combiner_bundle, tmp_path / "work", manifest_of(folder, tmp_path / "catalog.parquet"))

    rss, peak, started = rss_bytes(), peak_rss_bytes(), time.monotonic()
    with caplog.at_level(logging.WARNING):
        snapshot_dir = run_embed(config)
    # Reading the 2 GiB file would have raised the peak to 2 GiB over what this process holds now (unless an
    # earlier test's peak was higher still: then this check cannot tell).
    assert peak_rss_bytes() <= max(peak, rss + HUGE // 4), "the 2 GiB file was read"
    assert time.monotonic() - started < 120

    run = shards.open_snapshot(snapshot_dir)
    assert run.manifest["complete"] and run.rows == len(good) and run.manifest["errors"] == len(bad)
    assert pq.read_table(run.shard_files[0]).schema == shards.embedding_schema(run.dim)
    reasons = named(pq.read_table(snapshot_dir / shards.ERRORS), "reason")
    assert set(reasons) == bad
    assert "format DDS is not allowed" in reasons["x.dds"] and "format DDS is not allowed" in reasons["x.png"]
    assert "cannot decode" in reasons["x.im"]
    assert "cannot decode" in reasons["y.png"] or reasons["y.png"] == "file not found"  # a host without the file
    assert reasons["huge.png"].endswith(f"huge.png: {HUGE} bytes, over the limit of {ImageLimits().max_bytes}")
    assert reasons["fifo.png"].endswith("fifo.png: not a regular file (a fifo)")
    assert reasons["dir.png"].endswith("dir.png: not a regular file (a directory)")
    # The reason shows the forged name escaped: one line in errors.parquet, one line in the log.
    assert "forged\\nERROR cirflow" in reasons[FORGED] and "\n" not in reasons[FORGED]
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("cirflow")]
    assert any("forged\\nERROR" in m for m in logged) and not any("\n" in m for m in logged)

    # Each embedded row records what its bytes decoded as and their sha256.
    recorded = sources(snapshot_dir)
    assert set(named(recorded, "format").values()) == {"PNG"}  # x.html too: its content type is image/png
    digests = named(recorded, "sha256")
    assert digests == {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in good}

    # A rerun of the unchanged catalog completes and does nothing.
    assert run_embed(config) == snapshot_dir

    # A refresh: one image changed, one added. Only those two are read; the errors rows carry over unread.
    (folder / "img-0.png").write_bytes(png_bytes(random_images(1, 64, seed=14)[0]))
    (folder / "img-9.png").write_bytes(png_bytes(random_images(1, 64, seed=15)[0]))
    manifest_of(folder, Path(config.catalog.manifest or ""))
    read: list[str] = []
    real = embed_stages.read_bytes

    def counted(uri: str, limits: ImageLimits | None = None) -> bytes:
        read.append(Path(uri).name)
        return real(uri, limits)

    monkeypatch.setattr(embed_stages, "read_bytes", counted)
    refreshed = run_embed(config)
    monkeypatch.undo()
    assert refreshed != snapshot_dir and sorted(read) == ["img-0.png", "img-9.png"]
    delta = shards.read_manifest(refreshed)["delta"]
    assert (delta["added"], delta["changed"], delta["reused_errors"]) == (1, 1, len(bad))
    assert pq.read_table(refreshed / shards.ERRORS).equals(pq.read_table(snapshot_dir / shards.ERRORS))
    after = named(sources(refreshed), "sha256")
    assert {n: after[n] for n in good - {"img-0.png"}} == {n: digests[n] for n in good - {"img-0.png"}}
    for name in ("img-0.png", "img-9.png"):
        assert after[name] == hashlib.sha256((folder / name).read_bytes()).hexdigest() != digests.get(name)
    assert set(named(sources(refreshed), "format").values()) == {"PNG"}

    # Other gate limits (DDS allowed): another snapshot, whose errors rows are read again, not carried over.
    allowing = replace(config, images=ImageLimits(formats=(*DEFAULT_FORMATS, "DDS")))
    read.clear()
    monkeypatch.setattr(embed_stages, "read_bytes", counted)
    widened = run_embed(allowing)
    monkeypatch.undo()
    assert widened.parent == refreshed.parent and widened.name not in (snapshot_dir.name, refreshed.name)
    assert sorted(read) == sorted(bad)
    assert shards.read_manifest(widened)["delta"]["reused_errors"] == 0
    now = named(pq.read_table(widened / shards.ERRORS), "reason")
    assert "NotImplementedError" in now["x.dds"] and "not allowed" not in now["x.dds"]
    assert now["huge.png"] == reasons["huge.png"]
    assert run_embed(allowing) == widened  # and a rerun with the same limits does nothing
    assert run_embed(config) == refreshed  # the default limits' snapshot is still there, complete

    # With every snapshot deleted, the job embeds the catalog again, to the same rows and errors.
    errors = pq.read_table(refreshed / shards.ERRORS)
    shutil.rmtree(refreshed.parent)
    again = run_embed(config)
    assert shards.read_manifest(again)["delta"]["previous"] is None
    assert pq.read_table(again / shards.ERRORS).equals(errors)
    assert named(sources(again), "sha256") == after

    # The index carries them to the service: VectorIndex.source(id); not metadata, not in item().
    run = shards.open_snapshot(again)
    queries = Queries.unreferenced(unit(np.random.default_rng(0).standard_normal((8, run.dim))))
    index = VectorIndex.load(build_index(run, queries, tmp_path / "indexes", IndexConfig(index_type="flat")))
    table = sources(again)
    for id_, uri, fmt, digest in zip(*(table.column(c).to_pylist() for c in ("id", "uri", "format", "sha256"))):
        assert index.entries.source(id_) == ImageSource(uri, fmt, digest)
        assert index.entries.item(id_) == {"id": id_, "uri": uri}
    assert index.entries.fields == {}
    with pytest.raises(UnknownIdError, match="catalog id 1 is not in index"):
        index.entries.source(1)


def test_a_folder_catalog_of_hostile_files_completes(combiner_bundle: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The folder listing leaves the FIFO out (with a warning) and walks the directory; the rest is embedded or an
    errors row."""
    folder = tmp_path / "catalog"
    good, bad = hostile_folder(folder)
    config = EmbedConfig(catalog=CatalogConfig(name="hostile", folder=str(folder)), bundle=str(combiner_bundle),
                         workdir=str(tmp_path / "work"), rows_per_shard=4, batch_size=3)
    with caplog.at_level(logging.WARNING):
        snapshot_dir = run_embed(config)
    assert "left out" in caplog.text and "fifo.png" in caplog.text
    assert set(named(sources(snapshot_dir), "uri")) == good
    assert set(named(pq.read_table(snapshot_dir / shards.ERRORS), "reason")) == bad - {"fifo.png", "dir.png"}


@pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")
def test_a_decoder_that_raises_anything_gives_an_errors_row(tmp_path: Path) -> None:
    """Formats allowed on purpose whose parsers raise NotImplementedError (DDS) and TypeError (IM): errors rows,
    never an exception out of the batch."""
    (tmp_path / "x.dds").write_bytes(dds_pixel_format_0())
    (tmp_path / "x.im").write_bytes(im_type_error())
    uris = np.array([str(tmp_path / "x.dds"), str(tmp_path / "x.im")], dtype=object)
    batch = decode_batch({"id": np.arange(2), "uri": uris}, PreprocessConfig(),
                         limits=ImageLimits(formats=(*DEFAULT_FORMATS, "DDS", "IM")))
    assert "x.dds: cannot decode (NotImplementedError" in batch["error"][0]
    assert "x.im: " in batch["error"][1]  # the gate refuses its header's size before PIL's TypeError
    assert not batch["transient"].any() and list(batch["format"]) == [None, None]


@pytest.mark.parametrize("column", ["image", "index_id", "format", "sha256"])
def test_metadata_columns_with_reserved_names_are_refused(tmp_path: Path, column: str) -> None:
    """The service's item JSON has an `image` and an `index_id` field, the index a `format` and a `sha256`: a
    metadata column of such a name would be listed in /api/info and overwritten in /items."""
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [1], "uri": ["a.png"], "category": ["x"], column: ["y"]}), manifest)
    with pytest.raises(CatalogError) as raised:
        load_catalog(CatalogConfig(name="c", manifest=str(manifest)))
    message = str(raised.value)
    assert str(manifest) in message and repr(column) in message and "'image', 'index_id'" in message
    assert "rename" in message


def test_the_sha256_change_key_hashes_in_chunks_and_never_waits_on_a_fifo(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"pixels")
    os.mkfifo(tmp_path / "fifo.png")
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [1, 2], "uri": ["a.png", "fifo.png"]}), manifest)
    found: dict[str, pa.Table] = {}
    loading = threading.Thread(target=lambda: found.update(table=load_catalog(
        CatalogConfig(name="c", manifest=str(manifest), change_key="sha256"))), daemon=True)
    loading.start()
    loading.join(timeout=30)
    assert "table" in found, "listing the catalog waits for a writer of the FIFO"
    assert found["table"].column("version").to_pylist() == [f"sha256-{hashlib.sha256(b'pixels').hexdigest()}",
                                                            "unreadable"]


def test_snapshots_and_indexes_from_before_formats_were_recorded_still_read(combiner_bundle: Path,
                                                                            tmp_path: Path) -> None:
    """Shards and uris.parquet without format and sha256 (an older cirflow's) read as nulls; a refresh carries the
    nulls over for unchanged rows and records the changed ones."""
    folder = tmp_path / "catalog"
    folder.mkdir()
    for i, pixels in enumerate(random_images(3, 64, seed=21)):
        (folder / f"img-{i}.png").write_bytes(png_bytes(pixels))
    config = job(combiner_bundle, tmp_path / "work", manifest_of(folder, tmp_path / "catalog.parquet"))
    snapshot_dir = run_embed(config)
    manifest = shards.read_manifest(snapshot_dir)
    for name in manifest["shards"]:  # as an older cirflow wrote them, the manifest's checksums to match
        old = pq.read_table(snapshot_dir / name).drop_columns(["format", "sha256"])
        manifest["shards"][name].update(shards.write_parquet_atomic(old, snapshot_dir / name))
    shards.write_manifest(snapshot_dir, manifest)
    assert sources(snapshot_dir).column("sha256").null_count == 3

    (folder / "img-0.png").write_bytes(png_bytes(random_images(1, 64, seed=22)[0]))
    manifest_of(folder, Path(config.catalog.manifest or ""))
    refreshed = run_embed(config)
    digests = named(sources(refreshed), "sha256")
    assert digests == {"img-0.png": hashlib.sha256((folder / "img-0.png").read_bytes()).hexdigest(),
                       "img-1.png": None, "img-2.png": None}

    run = shards.open_snapshot(refreshed)
    queries = Queries.unreferenced(unit(np.random.default_rng(0).standard_normal((4, run.dim))))
    index_dir = build_index(run, queries, tmp_path / "indexes", IndexConfig(index_type="flat"))
    uris = pq.read_table(index_dir / index_store.URIS)
    assert uris.schema.names == ["id", "uri", "format", "sha256"]
    pq.write_table(uris.select(["id", "uri"]), index_dir / index_store.URIS)  # an older cirflow's uris.parquet
    index = VectorIndex.open(index_dir, index_store.read_manifest(index_dir), mmap=True, on_gpu=False)
    first = int(uris.column("id")[0].as_py())
    assert index.entries.source(first) == ImageSource(uris.column("uri")[0].as_py(), None, None)
    assert index.entries.fields == {}

"""The Ray embedding job end to end on a real local Ray cluster (num_cpus=2) and a tiny real bundle."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from cirflow.core.config import ConfigError, load_config
from cirflow.core.ray_local import connect_ray
from cirflow.export.manifest import register_bundle
from cirflow.export.runtime import BundleRuntime
from cirflow.flows.cli import main
from cirflow.indexing.embedding import shards
from cirflow.indexing.embedding.catalog import CatalogConfig, folder_entries, load_catalog, read_bytes
from cirflow.indexing.embedding.job import EmbedConfig, EmbedError, actor_providers, run_embed
from cirflow.indexing.index.build import build_index
from cirflow.indexing.index.plan import IndexConfig
from cirflow.indexing.index.queries import Queries
from cirflow.indexing.search import load_index
from tests.export.conftest import random_images
from tests.indexing.held_store import held_entry
from tests.models.test_tokenizer_preprocess import decompression_bomb_png

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster() -> str:
    connect_ray(None, num_cpus=2)  # the job's own way: a local instance on 127.0.0.1 only
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def bundle(combiner_bundle: Path) -> Path:
    return combiner_bundle


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(folder: Path, n: int, seed: int) -> list[Path]:
    paths = []
    for i, pixels in enumerate(random_images(n, 64, seed)):
        path = folder / ("nested" if i % 3 == 0 else "") / f"img-{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(pixels))
        paths.append(path)
    return paths


def config(name: str, bundle: Path, workdir: Path, **catalog: str) -> EmbedConfig:
    """local_below=0: these tests run the Ray pipeline however few images there are."""
    return EmbedConfig(catalog=CatalogConfig(name=name, **catalog), bundle=str(bundle), workdir=str(workdir),
                       rows_per_shard=4, batch_size=3, local_below=0)


def test_folder_catalog_embeds_good_images_and_records_bad_ones(cluster: str, bundle: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "catalog"
    good = write_images(folder, 9, seed=1)
    truncated = png_bytes(random_images(1, 64, seed=2)[0])
    bad = {"corrupt.png": os.urandom(300), "truncated.png": truncated[: len(truncated) // 2], "empty.jpg": b"",
           "notes.txt": b"not an image"}
    for name, data in bad.items():
        (folder / name).write_bytes(data)

    snapshot_dir = run_embed(config("shop", bundle, tmp_path / "work", folder=str(folder)))

    run = shards.open_snapshot(snapshot_dir)
    assert run.manifest["complete"] and run.rows == 9 and run.manifest["errors"] == 4
    assert run.manifest["num_shards"] == 4 and len(run.shard_files) == 4  # 13 entries, 4 per shard
    assert run.bundle_id == BundleRuntime.load(bundle).bundle_id
    table = pq.read_table(run.shard_files[0])
    assert table.schema == shards.embedding_schema(run.dim)  # portable fixed-size lists, not a Ray extension type
    ids, vectors, uris = run.read_all()
    expected = folder_entries(folder, good).sort_by("id")
    np.testing.assert_array_equal(np.sort(ids), expected.column("id").to_numpy())
    # The same vectors as embedding the files directly through the bundle runtime.
    runtime = BundleRuntime.load(bundle)
    direct = runtime.embed_images([Path(u) for u in uris])
    np.testing.assert_allclose(vectors, direct, atol=1e-5)
    errors = pq.read_table(snapshot_dir / shards.ERRORS).to_pylist()
    reasons = {Path(e["uri"]).name: e["reason"] for e in errors}
    assert set(reasons) == set(bad)
    assert "empty file" in reasons["empty.jpg"]
    assert all("cannot decode" in reasons[n] for n in ("corrupt.png", "truncated.png", "notes.txt"))
    assert not [p for p in snapshot_dir.rglob("*") if ".tmp" in p.name]

    # A rerun of a complete run changes nothing.
    before = (snapshot_dir / shards.MANIFEST).read_bytes()
    assert run_embed(config("shop", bundle, tmp_path / "work", folder=str(folder))) == snapshot_dir
    assert (snapshot_dir / shards.MANIFEST).read_bytes() == before

    # Files deleted or changed since are found on the next start: a lost errors.parquet is merged again ...
    errors_table = pq.read_table(snapshot_dir / shards.ERRORS)
    (snapshot_dir / shards.ERRORS).unlink()
    with caplog.at_level(logging.WARNING, logger="cirflow.indexing.embedding.job"):
        run_embed(config("shop", bundle, tmp_path / "work", folder=str(folder)))
    assert "file errors.parquet listed in the manifest is missing" in caplog.text
    assert shards.read_manifest(snapshot_dir)["last_run"]["shards"] == 0
    assert pq.read_table(snapshot_dir / shards.ERRORS).equals(errors_table)
    # ... and the shards of a lost shard file or a changed errors file are redone, to the same rows.
    recorded = shards.read_manifest(snapshot_dir)["shards"]
    with_errors = next(name for name, info in sorted(recorded.items()) if info["errors"])
    lost = next(name for name in sorted(recorded) if name != with_errors)
    (snapshot_dir / lost).unlink()
    with open(snapshot_dir / shards.SHARD_ERRORS_DIR / with_errors, "ab") as f:
        f.write(b"\0")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cirflow.indexing.embedding.job"):
        run_embed(config("shop", bundle, tmp_path / "work", folder=str(folder)))
    assert f"file {lost} listed in the manifest is missing; redoing shard {lost}" in caplog.text
    assert f"file {shards.SHARD_ERRORS_DIR}/{with_errors} has" in caplog.text
    redone = shards.open_snapshot(snapshot_dir)
    assert redone.manifest["last_run"]["shards"] == 2 and redone.manifest["errors"] == 4
    redone_ids, redone_vectors, _ = redone.read_all()
    np.testing.assert_array_equal(redone_ids, ids)
    np.testing.assert_allclose(redone_vectors, vectors, atol=1e-6)
    assert pq.read_table(snapshot_dir / shards.ERRORS).equals(errors_table)

    # The catalog grows: a new snapshot, through Ray, embeds the one new image and reuses every other row.
    write_images(folder / "more", 1, seed=3)
    grown = run_embed(config("shop", bundle, tmp_path / "work", folder=str(folder)))
    assert grown != snapshot_dir and grown.parent == snapshot_dir.parent
    assert shards.open_snapshot(grown.parent).snapshot_dir == grown  # CURRENT moved to it
    after = shards.read_manifest(grown)
    assert after["last_run"]["entries"] == 1 and after["last_run"]["embedded_by"] == "ray"
    assert after["delta"] == {"previous": snapshot_dir.name, "added": 1, "changed": 0, "removed": 0, "unchanged": 13,
                              "reused_vectors": 9, "reused_errors": 4, "retried": 0}
    grown_ids, grown_vectors, _ = shards.open_snapshot(grown).read_all()
    keep = np.isin(grown_ids, ids)
    assert keep.sum() == len(ids) and after["errors"] == 4
    np.testing.assert_array_equal(grown_ids[keep], ids)  # both id-sorted
    assert grown_vectors[keep].tobytes() == vectors.tobytes()  # copied, not recomputed


def test_resume_after_kill_gives_the_same_rows(cluster: str, bundle: Path, tmp_path: Path) -> None:
    """A driver killed mid-run resumes to exactly a clean run's rows. The last catalog entry is read from a store
    that holds the read, so the kill lands after two or three of four shards and never after the fourth."""
    folder = tmp_path / "images"
    paths = write_images(folder, 14, seed=4)
    table = folder_entries(folder, paths).sort_by("id")
    store, table = held_entry(table, 13)  # in the last batch (rows 12-13: shard 3)
    manifest = tmp_path / "catalog.csv"
    pacsv.write_csv(table.append_column("version", pa.array(["v1"] * table.num_rows)), manifest)
    job = config("resumed", bundle, tmp_path / "work", manifest=str(manifest))
    args = [f"catalog.name={job.catalog.name}", f"catalog.manifest={manifest}", f"bundle={bundle}",
            f"workdir={job.workdir}", "rows_per_shard=4", "batch_size=2",
            f"ray.address={cluster}"]
    command = [sys.executable, "-m", "cirflow.flows.cli", "--log-level", "WARNING", "embed", *args]
    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    snapshot_dir = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((tmp_path / "work" / "embeddings" / "resumed").glob("*/*/manifest.json"))
        if found and len(shards.read_manifest(found[0].parent)["shards"]) >= 2:
            snapshot_dir = found[0].parent
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0].decode(errors="replace")
    store.release()  # an actor of the killed job still waiting finishes, freeing its CPU for the next job
    assert snapshot_dir is not None, f"the job never finished two shards:\n{output[-3000:]}"
    done = sorted(shards.read_manifest(snapshot_dir)["shards"])
    assert not shards.read_manifest(snapshot_dir)["complete"]
    # Two actors take shards 0 and 1 together, so any two or three of the first three may be done (a loaded
    # machine finishes them in any order); never shard 3, whose read blocks.
    assert len(done) in (2, 3) and shards.shard_name(3) not in done

    (snapshot_dir / done[0]).unlink()  # a finished shard lost as well: found on resume and redone
    assert run_embed(job) == snapshot_dir
    run = shards.open_snapshot(snapshot_dir)
    assert run.manifest["last_run"]["shards"] == 4 - len(done) + 1  # only unfinished and lost shards were redone
    ids, vectors, _ = run.read_all()

    clean = run_embed(config("clean", bundle, tmp_path / "work", manifest=str(manifest)))
    clean_ids, clean_vectors, _ = shards.open_snapshot(clean).read_all()
    assert len(ids) == len(set(ids.tolist())) == 14
    np.testing.assert_array_equal(ids, clean_ids)
    np.testing.assert_allclose(vectors, clean_vectors, atol=1e-6)
    store.close()


def test_careless_inputs_each_end_up_embedded_or_in_the_errors_table(cluster: str, bundle: Path,
                                                                       tmp_path: Path) -> None:
    """Odd names, links, a decompression bomb, empty and unreadable files: every listed entry is embedded or an
    errors row (never both, never neither), and two runs write the same errors table."""
    folder = tmp_path / "catalog"
    images = [png_bytes(p) for p in random_images(5, 64, seed=7)]
    odd_names = ["with space é.png", "new\nline.png", "image.png/inside.png", os.fsdecode(b"latin-\xe9.png"),
                 "locked.png"]
    for name, data in zip(odd_names, images):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "locked.png").chmod(0)  # unreadable (for anyone but root, who runs the tests here)
    bad = {"bomb.png": decompression_bomb_png(), "zero.png": b"", "noise.png": os.urandom(300)}
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    links = {"loop.png": "loop.png", "dangling.png": "gone.png", "alias.png": "with space é.png",
             "linked-dir": "image.png"}
    for name, target in links.items():
        os.symlink(target, folder / name)
    register_bundle(bundle)  # the job gets the bundles directory and follows its CURRENT once
    job = EmbedConfig(catalog=CatalogConfig(name="careless", folder=str(folder)), bundle=str(bundle.parent),
                      workdir=str(tmp_path / "a"), rows_per_shard=4, batch_size=3)

    run = shards.open_snapshot(run_embed(job))

    assert run.manifest["last_run"]["bundle_dir"] == str(bundle.resolve())
    ids, vectors, uris = run.read_all()
    errors = pq.read_table(run.snapshot_dir / shards.ERRORS)
    embedded, failed = set(ids.tolist()), set(errors.column("id").to_pylist())
    assert not embedded & failed
    assert embedded | failed == set(load_catalog(job.catalog).column("id").to_pylist())
    reasons = dict(zip((u.rsplit("/", 1)[1] for u in errors.column("uri").to_pylist()),
                       errors.column("reason").to_pylist()))
    assert "too large to decode" in reasons["bomb.png"]
    assert reasons["zero.png"] == "empty file (0 bytes)"
    assert reasons["noise.png"].endswith("noise.png: cannot decode (not a recognised image format)")
    assert reasons["loop.png"] == "cannot read (Too many levels of symbolic links)"
    assert reasons["dangling.png"] == "file not found"
    assert reasons["linked-dir"].endswith("linked-dir: not a regular file (a directory)")
    names = {u.rsplit("/", 1)[1] for u in uris}
    assert {"with space é.png", "new\nline.png", "inside.png", "latin-%E9.png", "alias.png"} <= names
    assert ("locked.png" in names) == (os.geteuid() == 0) == ("locked.png" not in reasons)
    # Each uri reads back (the file:// one of the name that is not UTF-8 too) to the bytes that were embedded.
    runtime = BundleRuntime.load(bundle)
    np.testing.assert_allclose(vectors, runtime.embed_images([read_bytes(u) for u in uris]), atol=1e-5)

    again = shards.open_snapshot(run_embed(replace(job, workdir=str(tmp_path / "b"))))
    assert pq.read_table(again.snapshot_dir / shards.ERRORS).equals(errors)


@pytest.mark.parametrize("override, message", [
    ("batch_size=0", "batch_size must be positive, got 0"),
    ("rows_per_shard=-8", "rows_per_shard must be positive, got -8"),
    ("cpus_per_actor=0", "cpus_per_actor must be positive, got 0"),
    ("num_actors=-1", "num_actors must not be negative, got -1"),
    ("num_gpus=-0.5", "num_gpus must not be negative, got -0.5"),
    ("providers=cpu", "providers='cpu' is not one of ['auto', 'cuda', 'tensorrt']"),
    ("providers=tensorrt", "providers='tensorrt' needs num_gpus > 0"),
])
def test_bad_settings_are_config_errors_before_anything_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                             override: str, message: str) -> None:
    args = [f"workdir={tmp_path / 'work'}", f"bundle={tmp_path / 'bundle'}", "catalog.name=c",
            f"catalog.folder={tmp_path}", override]
    assert main(["embed", *args]) == 2
    assert message in caplog.text
    assert not (tmp_path / "work").exists()
    with pytest.raises(ConfigError, match=re.escape(message)):  # a config error, not a failed run
        load_config(EmbedConfig, None, args)


def test_actors_use_a_gpu_only_when_ray_gives_them_one() -> None:
    # num_gpus == 0: CPU even on a GPU host, where the runtime's "auto" would open CUDA sessions outside Ray's
    # GPU accounting; num_gpus > 0: `providers` picks the GPU provider, and no GPU is an error, not a fallback.
    assert actor_providers(EmbedConfig()) == ("cpu", False)
    assert actor_providers(EmbedConfig(num_gpus=1)) == ("auto", True)
    assert actor_providers(EmbedConfig(num_gpus=0.5, providers="tensorrt")) == ("tensorrt", True)
    assert actor_providers(EmbedConfig(num_gpus=1, providers="cuda")) == ("cuda", True)


def test_gpu_request_on_a_cpu_cluster_fails_fast(cluster: str, bundle: Path, tmp_path: Path) -> None:
    write_images(tmp_path / "images", 2, seed=5)
    job = EmbedConfig(catalog=CatalogConfig(name="gpu", folder=str(tmp_path / "images")), bundle=str(bundle),
                      workdir=str(tmp_path / "work"), num_gpus=1)
    started = time.monotonic()
    with pytest.raises(EmbedError, match="needs 1 GPUs, but the Ray cluster has 0"):
        run_embed(job)
    assert time.monotonic() - started < 30  # a clear error, not Ray waiting for a GPU forever


def test_too_many_actors_fail_fast(cluster: str, bundle: Path, tmp_path: Path) -> None:
    write_images(tmp_path / "images", 2, seed=6)
    job = EmbedConfig(catalog=CatalogConfig(name="cpu", folder=str(tmp_path / "images")), bundle=str(bundle),
                      workdir=str(tmp_path / "work"), num_actors=3, local_below=0)
    with pytest.raises(EmbedError, match="needs 3 CPUs, but the Ray cluster has 2"):
        run_embed(job)


def test_shipped_configs_load_strictly() -> None:
    """The example config and the RayJob entrypoint's overrides are valid EmbedConfig keys."""
    import shlex

    import yaml

    from cirflow.core.config import load_config

    example = load_config(EmbedConfig, REPO / "configs" / "embed_catalog.yaml")
    assert example.catalog.name == "shapes-test" and example.num_gpus == 0
    rayjob = yaml.safe_load((REPO / "deploy" / "ray" / "rayjob-embed.yaml").read_text())
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["cirflow", "embed"]  # the job's one command line
    overrides = [a for a in argv[2:] if "=" in a]
    job = load_config(EmbedConfig, REPO / "configs" / "embed_catalog.yaml", overrides)
    assert job.catalog.folder == "/data/catalog" and job.workdir == "/data/workdir"


def test_a_pretrained_backbone_bundle_embeds_through_the_ray_job(cluster: str, tmp_path: Path,
                                                                 effnet_minilm_bundle: tuple[Path, Path]) -> None:
    """effnet-minilm (EfficientNet-Lite0 at its own preprocessing, MiniLM tokenizer in the bundle) goes through
    the same Ray pipeline as the built-in model: the vectors are the bundle runtime's."""
    _, bundle = effnet_minilm_bundle
    folder = tmp_path / "catalog"
    write_images(folder, 7, seed=5)
    run = shards.open_snapshot(run_embed(config("pretrained", bundle, tmp_path / "work", folder=str(folder))))
    assert run.manifest["complete"] and run.rows == 7 and run.manifest["last_run"]["embedded_by"] == "ray"
    ids, vectors, uris = run.read_all()
    np.testing.assert_allclose(vectors, BundleRuntime.load(bundle).embed_images([Path(u) for u in uris]), atol=1e-5)


def test_a_snapshot_of_a_bundle_with_a_reranker_says_so_and_its_index_keeps_the_vectors(
        tiny_artemis: Path, bundle: Path, tmp_path: Path) -> None:
    """The embedding job records that its bundle re-ranks (in process here: local_below above the catalog), and
    only then: a bundle without a re-ranker writes the manifest it always wrote."""
    folder = tmp_path / "catalog"
    write_images(folder, 5, seed=6)
    job = replace(config("rerank", tiny_artemis, tmp_path / "work", folder=str(folder)), local_below=100)
    run = shards.open_snapshot(run_embed(job))
    assert run.reranks and run.manifest["reranks"] is True
    plain = shards.open_snapshot(run_embed(replace(job, bundle=str(bundle), workdir=str(tmp_path / "plain"))))
    assert not plain.reranks and "reranks" not in plain.manifest
    queries = Queries.unreferenced(BundleRuntime.load(tiny_artemis).embed_queries(
        [Path(u) for u in run.read_all()[2][:2]], ["make it red", "add a square"]))
    index_dir = build_index(run, queries, tmp_path / "indexes", IndexConfig(index_type="flat"))
    ids, vectors, _ = run.read_all()
    np.testing.assert_array_equal(load_index(index_dir).vectors_of(ids), vectors)

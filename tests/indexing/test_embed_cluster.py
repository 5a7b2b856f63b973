"""The embedding job on a simulated two-node Ray cluster (ray.cluster_utils.Cluster, one CPU per node, both on
127.0.0.1): the workers on both nodes write their shards themselves, the rows are exactly those of a
single-process run, and the job survives kill -9 of a worker node."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import ray
from ray.cluster_utils import Cluster

from cirflow.core.ray_local import _single_machine_mode
from cirflow.indexing.embedding import shards
from cirflow.indexing.embedding.catalog import CatalogConfig, folder_entries
from cirflow.indexing.embedding.job import EmbedConfig, run_embed
from tests.export.conftest import random_images
from tests.indexing.held_store import HeldStore
from tests.indexing.test_embed import png_bytes

IMAGES, ROWS_PER_SHARD = 40, 4  # 10 shards: enough for both workers to take several


@pytest.fixture(scope="module")
def two_nodes() -> tuple[Cluster, object]:
    """A head and a worker node of one CPU each; the driver (this process) joins the head."""
    with _single_machine_mode():
        # Fast failure detection: a killed node is declared dead within ~2 s instead of ~30.
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
        worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray.init(address=cluster.address)
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def bundle(combiner_bundle: Path) -> Path:
    return combiner_bundle


def catalog(folder: Path, manifest: Path, store: HeldStore | None = None, rows: tuple[int, ...] = ()) -> None:
    """IMAGES images in `folder`, listed in id order with a fixed version in a manifest CSV; the entries of `rows`
    (positions in id order) are served by `store` instead, under their file names."""
    folder.mkdir(parents=True)
    for i, pixels in enumerate(random_images(IMAGES, 64, seed=7)):
        (folder / f"item-{i:03d}.png").write_bytes(png_bytes(pixels))
    table = folder_entries(folder, sorted(folder.iterdir())).sort_by("id")
    uris = table.column("uri").to_pylist()
    for row in rows:
        path = Path(uris[row])
        store.files[path.name] = path.read_bytes()
        uris[row] = store.uri(path.name)
    table = table.set_column(1, "uri", pa.array(uris, pa.string()))
    pacsv.write_csv(table.append_column("version", pa.array(["v1"] * table.num_rows)), manifest)


def job(name: str, bundle: Path, workdir: Path | str, manifest: Path, **settings: object) -> EmbedConfig:
    return EmbedConfig(catalog=CatalogConfig(name=name, manifest=str(manifest)), bundle=str(bundle),
                       workdir=str(workdir), rows_per_shard=ROWS_PER_SHARD, batch_size=2, **settings)


def rows(snapshot_dir: object) -> tuple[np.ndarray, np.ndarray, list[str]]:
    return shards.open_snapshot(snapshot_dir).read_all()


def test_two_workers_on_two_nodes_write_exactly_the_single_process_rows(two_nodes: tuple[Cluster, object],
                                                                        bundle: Path, tmp_path: Path) -> None:
    cluster, _ = two_nodes
    manifest = tmp_path / "catalog.csv"
    catalog(tmp_path / "images", manifest)
    # The reference: the same code in this process, no Ray (local_below above the catalog's size).
    single = run_embed(job("single", bundle, tmp_path / "work", manifest, local_below=10**6))
    assert shards.read_manifest(single)["last_run"]["embedded_by"] == "in-process"

    spread = run_embed(job("spread", bundle, tmp_path / "work", manifest, local_below=0))
    last = shards.read_manifest(spread)["last_run"]
    assert last["embedded_by"] == "ray" and last["actors"] == 2 and last["nodes"] == 2
    ids, vectors, uris = rows(spread)
    single_ids, single_vectors, single_uris = rows(single)
    np.testing.assert_array_equal(ids, single_ids)
    assert uris == single_uris and len(set(ids.tolist())) == IMAGES
    # An untrained tower: the images' vectors differ by ~1e-4, the two runs' by rounding (1 ORT thread vs 2).
    assert np.abs(vectors - vectors.mean(0)).max() > 1e-4
    np.testing.assert_allclose(vectors, single_vectors, atol=1e-6)
    assert not [p for p in spread.rglob("*") if ".tmp" in p.name]

    # The same job writing to a URI (file://: fsspec's code path, on a filesystem both nodes see).
    at_uri = run_embed(job("spread", bundle, f"file://{tmp_path / 'store'}", manifest, local_below=0))
    assert str(at_uri).startswith("file://") and shards.read_manifest(at_uri)["last_run"]["nodes"] == 2
    uri_ids, uri_vectors, uri_uris = rows(at_uri)
    np.testing.assert_array_equal(uri_ids, single_ids)
    assert uri_uris == single_uris and uri_vectors.tobytes() == vectors.tobytes()


def test_kill_9_of_a_worker_node_mid_job_still_ends_complete(two_nodes: tuple[Cluster, object], bundle: Path,
                                                             tmp_path: Path) -> None:
    """Both workers block reading from a store that holds the read, in their first shard; the worker node is
    killed (SIGKILL to all its processes, as a lost machine); then the store answers. The surviving worker takes
    over the lost shard, and a rerun finds nothing left to do: the rows are exactly a single-process run's."""
    cluster, worker = two_nodes
    manifest = tmp_path / "catalog.csv"
    store = HeldStore({})
    catalog(tmp_path / "images", manifest, store, rows=(0, ROWS_PER_SHARD))  # the first entries of shards 0 and 1
    single = run_embed(job("single", bundle, tmp_path / "work", manifest, local_below=10**6))
    store.hold(*store.files)

    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["snapshot_dir"] = run_embed(job("killed", bundle, tmp_path / "work", manifest, local_below=0))
        except Exception as e:  # noqa: BLE001 - a failed first run is allowed: the rerun must complete it
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and store.waiting < 2:
        time.sleep(0.2)
    assert store.waiting == 2, "the two workers never reached their shards"
    cluster.remove_node(worker, allow_graceful=False)  # SIGKILL to the node's raylet, workers and agents
    store.release()
    thread.join(timeout=180)
    assert not thread.is_alive(), "the job hung after the node was lost"

    snapshot_dir = run_embed(job("killed", bundle, tmp_path / "work", manifest, local_below=0))
    # The surviving worker took over the lost shard: the first run completed, the rerun had nothing to do.
    assert outcome.get("snapshot_dir") == snapshot_dir, outcome
    assert shards.read_manifest(snapshot_dir)["last_run"]["actors"] == 2
    ids, vectors, uris_after = rows(snapshot_dir)
    single_ids, single_vectors, single_uris = rows(single)
    np.testing.assert_array_equal(ids, single_ids)
    assert uris_after == single_uris
    np.testing.assert_allclose(vectors, single_vectors, atol=1e-6)
    assert shards.read_manifest(snapshot_dir)["errors"] == 0
    store.close()

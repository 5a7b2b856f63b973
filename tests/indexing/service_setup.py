"""A real shop for the search service's tests: catalog images with a metadata column, exported tiny bundles,
embedding snapshots and published flat indexes in a WORKDIR layout, and uvicorn on 127.0.0.1 in a thread."""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import uvicorn
from PIL import Image

from cirflow.export.runtime import BundleRuntime
from cirflow.indexing.embedding.catalog import CatalogConfig
from cirflow.indexing.embedding.job import EmbedConfig, run_embed
from cirflow.indexing.embedding.shards import open_snapshot
from cirflow.indexing.index.build import build_index
from cirflow.indexing.index.plan import IndexConfig
from cirflow.indexing.index.queries import Queries
from cirflow.indexing.index.versions import publish
from cirflow.indexing.search import Searcher, VectorIndex

CATALOG = "toys"
CATEGORIES = ("hat", "shoe", "bag")
TEXTS = ("make it red", "a bigger one on the left", "same but blue and small")


@dataclass
class Shop:
    workdir: Path
    catalog_file: Path  # the catalog manifest (id, uri, category)
    images: dict[int, bytes]  # catalog id -> PNG bytes
    categories: dict[int, str]

    @property
    def indexes(self) -> Path:
        return self.workdir / "indexes" / CATALOG

    def searcher(self) -> Searcher:
        """The search library over the published version, as an in-process user loads it."""
        index = VectorIndex.load(self.indexes)
        bundle = next(p for p in (self.workdir / "bundles").iterdir()
                      if BundleRuntime.load(p, providers="cpu").bundle_id == index.bundle_id)
        return Searcher(index, BundleRuntime.load(bundle, providers="cpu"))


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def make_shop(root: Path, images: Path, bundle: Path, count: int | None = None) -> Shop:
    """A shop under `root`: the first `count` images of the folder `images` (copied under names with spaces),
    a Parquet manifest with ids 1000 + i and a category column, and `bundle` copied into root/bundles (where
    the service finds it by bundle_id); nothing embedded yet."""
    images_dir = root / "shop"
    images_dir.mkdir(parents=True)
    sources = sorted(images.glob("*.png"))[:count]
    ids = [1000 + i for i in range(len(sources))]
    pictures, categories, uris = {}, {}, []
    for i, (catalog_id, source) in enumerate(zip(ids, sources)):
        path = images_dir / f"item {i:03d}.png"  # a space: uris are paths, not URLs
        path.write_bytes(source.read_bytes())
        pictures[catalog_id], categories[catalog_id] = path.read_bytes(), CATEGORIES[i % len(CATEGORIES)]
        uris.append(str(path))
    catalog_file = root / "catalog.parquet"
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "uri": uris,
                             "category": [categories[i] for i in ids]}), catalog_file)
    add_bundle(root, bundle)
    return Shop(root, catalog_file, pictures, categories)


def rename_item(shop: Shop, catalog_id: int, name: str, data: bytes) -> Path:
    """Item `catalog_id`'s image becomes `data` under the file name `name` (the manifest's uri follows)."""
    table = pq.read_table(shop.catalog_file)
    uris = table.column("uri").to_pylist()
    row = table.column("id").to_pylist().index(catalog_id)
    Path(uris[row]).unlink()
    path = Path(uris[row]).with_name(name)
    path.write_bytes(data)
    uris[row] = str(path)
    pq.write_table(table.set_column(table.schema.get_field_index("uri"), "uri", pa.array(uris)), shop.catalog_file)
    shop.images[catalog_id] = data
    return path


def add_bundle(workdir: Path, bundle: Path) -> Path:
    """A copy of `bundle` in workdir/bundles (what an export into the workdir leaves)."""
    return Path(shutil.copytree(bundle, workdir / "bundles" / bundle.name))


def index_version(shop: Shop, bundle: Path, publish_it: bool = True) -> Path:
    """Embed the catalog manifest with `bundle`, build a flat index, and publish it (the catalog flow's steps)."""
    catalog = CatalogConfig(name=CATALOG, manifest=str(shop.catalog_file))
    snapshot_dir = run_embed(EmbedConfig(catalog=catalog, bundle=str(bundle), workdir=str(shop.workdir)))
    run = open_snapshot(snapshot_dir)
    runtime = BundleRuntime.load(bundle, providers="cpu")
    some = list(shop.images.values())[:12]
    vectors = runtime.embed_queries(some, [TEXTS[i % len(TEXTS)] for i in range(len(some))])
    index_dir = build_index(run, Queries.unreferenced(vectors), shop.workdir / "indexes", IndexConfig(index_type="flat"))
    if publish_it:
        publish(index_dir)
    return index_dir


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def wait_ready(url: str, timeout: float, ready: bool = True) -> bool:
    """Poll GET url/readyz until it answers 200 (ready) or answers at all (not ready); False at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200 or not ready:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return False


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 in a thread; entering waits until /readyz says ready (wait_ready) or
    until the port answers at all."""

    def __init__(self, app: Any, ready_timeout: float = 120.0, wait_ready: bool = True) -> None:
        self.app = app
        self.ready_timeout = ready_timeout
        self.wait_ready = wait_ready
        self.sock = free_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        if wait_ready(self.url, self.ready_timeout, self.wait_ready):
            return self
        self.__exit__()
        raise TimeoutError(f"the service at {self.url} was not ready within {self.ready_timeout} s")

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

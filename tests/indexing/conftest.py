"""Embedding snapshots with neighbour structure, written through the real snapshot format (indexing/embedding/shards.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from cirflow.export.bundle import export_bundle
from cirflow.export.runtime import BundleRuntime
from cirflow.indexing.embedding import shards
from cirflow.indexing.embedding.shards import EmbeddingSnapshot
from cirflow.indexing.index.build import build_index
from cirflow.indexing.index.plan import IndexConfig
from cirflow.indexing.index.queries import Queries
from cirflow.models.tiny import TINY_MODEL

BUNDLE_ID = "0123456789abcdef"


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, seed: int, clusters: int = 64, spread: float = 0.35) -> np.ndarray:
    """(n, dim) unit vectors around `clusters` random centres: each has true near neighbours, as embeddings do
    (random Gaussians in high dimension are all nearly orthogonal, so recall on them means nothing)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, dim)))
    noise = rng.standard_normal((n, dim)) * spread / np.sqrt(dim)
    return unit(centres[rng.integers(0, clusters, n)] + noise)


def query_like(catalog_seed: int, count: int, dim: int, clusters: int = 64, spread: float = 0.35) -> np.ndarray:
    """Stand-ins for composed queries: fresh points from the catalog's distribution (same centres), never
    catalog vectors, so that no query finds itself at rank 1."""
    centres = unit(np.random.default_rng(catalog_seed).standard_normal((clusters, dim)))
    rng = np.random.default_rng(catalog_seed + 1000)
    return unit(centres[rng.integers(0, clusters, count)] + rng.standard_normal((count, dim)) * spread / np.sqrt(dim))


def write_snapshot(snapshot_dir: Path, vectors: np.ndarray, rows_per_shard: int, ids: np.ndarray | None = None,
              uris: list[str] | None = None, bundle_id: str = BUNDLE_ID, catalog: str = "toys",
              reranks: bool = False) -> EmbeddingSnapshot:
    """A complete embedding snapshot of `vectors` (ids default to 10*row + 3: sparse, not row numbers)."""
    n = len(vectors)
    ids = np.arange(n, dtype=np.int64) * 10 + 3 if ids is None else ids
    uris = [f"mem://{catalog}/{i}.png" for i in ids] if uris is None else uris
    starts = range(0, max(n, 1), rows_per_shard)  # an empty catalog still gets its one (empty) shard
    parts = ((ids[i:i + rows_per_shard], vectors[i:i + rows_per_shard], uris[i:i + rows_per_shard]) for i in starts)
    catalog_info = {"name": catalog, "source": "test", "entries": n, "fingerprint": "test"}
    return shards.write_snapshot(snapshot_dir, parts, bundle_id, catalog_info, rows_per_shard, reranks)


@pytest.fixture(scope="session")
def combiner_bundle(tiny_combiner: tuple[Path, Path]) -> Path:
    """An untrained tiny combiner bundle (its images' vectors differ by ~1e-4): the embedding job's tests."""
    return tiny_combiner[1]


@pytest.fixture(scope="session")
def toy_snapshot(tmp_path_factory: pytest.TempPathFactory) -> EmbeddingSnapshot:
    """6000 clustered 32-d vectors in 3 shards: big enough for IVF (>= 39 points per list) and PQ codebooks."""
    return write_snapshot(tmp_path_factory.mktemp("run"), clustered(6000, 32, seed=0), rows_per_shard=2000)


@pytest.fixture(scope="session")
def toy_queries() -> np.ndarray:
    return query_like(0, 400, 32)


@pytest.fixture(scope="session")
def tiny_runtime(tiny_bundle: Path) -> BundleRuntime:
    """The session's untrained tiny bundle (parity tests need real graphs, not a good model)."""
    return BundleRuntime.load(tiny_bundle, providers="cpu")


# One configuration per index type, sized for the toy catalog. IVF-PQ's codes (16 x 6 bits for 32 dims) cap
# its recall near 0.6 at every nprobe, so its target is set below that; its sweep still has to reach it. The
# re-ranked IVF-PQ has 4-bit codes (32 x 4 bits) and no cap: its default target is met by more candidates.
# HNSW-SQ8's 8-bit codes cap the toy's recall near 0.95 (its tight clusters put neighbours within a code step).
TYPE_CONFIGS = {
    "flat": IndexConfig(index_type="flat"),
    "hnsw": IndexConfig(index_type="hnsw", hnsw_m=16),
    "ivf_flat": IndexConfig(index_type="ivf_flat"),
    "ivf_pq": IndexConfig(index_type="ivf_pq", pq_m=16, pq_nbits=6, train_sample=3000, recall_target=0.5),
    "hnsw_sq": IndexConfig(index_type="hnsw_sq", hnsw_m=16, recall_target=0.9),
    "ivf_pq_rerank": IndexConfig(index_type="ivf_pq_rerank"),
}


@pytest.fixture(scope="session")
def built(toy_snapshot: EmbeddingSnapshot, toy_queries: np.ndarray, tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, Path]:
    """index type -> its index directory, built once from the toy run (merge=True)."""
    root = tmp_path_factory.mktemp("indexes")
    queries = Queries.unreferenced(toy_queries)
    return {name: build_index(toy_snapshot, queries, root, config) for name, config in TYPE_CONFIGS.items()}


@pytest.fixture(scope="session")
def service_bundles(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """seed -> an exported tiny bundle trained 60 steps on the tiny shapes (enough to tell images apart: an
    untrained tower maps every image to nearly the same vector), made once per session and seed."""
    from cirflow.models.train_job import train_run

    root = tmp_path_factory.mktemp("service-bundles")
    made: dict[int, Path] = {}

    def bundle(seed: int) -> Path:
        if seed not in made:
            checkpoint = train_run(None, [f"data.root={tiny_shapes}", *TINY_MODEL, "optim.max_steps=60",
                                          "optim.lr=3e-3", f"seed={seed}"], root / "work", run_id=f"seed-{seed}")
            made[seed] = export_bundle(checkpoint, root / f"tiny-{seed}")
        return made[seed]

    return bundle


@pytest.fixture(scope="session")
def new_shop(tiny_shapes: Path, service_bundles: Callable[[int], Path]) -> Callable[..., tuple[Any, Path]]:
    """(root, count=None) -> (a search-service shop of the tiny shapes' test images with the seed-0 service
    bundle, its first index version, embedded, built and published)."""
    from tests.indexing.service_setup import index_version, make_shop

    def build(root: Path, count: int | None = None) -> tuple[Any, Path]:
        shop = make_shop(root, tiny_shapes / "images" / "test", service_bundles(0), count=count)
        return shop, index_version(shop, shop.workdir / "bundles" / "tiny-0")

    return build


# A valid PNG with an HTML page appended: it decodes, so the catalog embeds it; named x.html, a service that
# took the content type from the file name would serve a page that runs this script on its origin.
XSS_ID = 1003
XSS_PAYLOAD = b"<html><body><script>document.title = 'pwned'; fetch('/pwned-' + document.cookie)</script></body></html>"


@pytest.fixture(scope="session")
def hostile_shop(tiny_shapes: Path, service_bundles: Callable[[int], Path],
                 tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A published shop of 36 tiny shapes whose item XSS_ID is a PNG with a script appended, named `x.html`
    (the search page's tests browse it too: one shop built instead of two)."""
    from tests.indexing.service_setup import index_version, make_shop, rename_item

    shop = make_shop(tmp_path_factory.mktemp("hostile"), tiny_shapes / "images" / "test", service_bundles(0),
                     count=36)
    rename_item(shop, XSS_ID, "x.html", shop.images[XSS_ID] + XSS_PAYLOAD)
    index_version(shop, shop.workdir / "bundles" / "tiny-0")
    return shop

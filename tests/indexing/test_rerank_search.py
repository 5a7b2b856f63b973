"""Two-stage search with a bundle's re-ranker (an ARTEMIS bundle): the index's top N by the folded query vector,
re-scored exactly from the catalog vectors the index keeps. With N covering the catalog the answer is the brute-
force exact ranking, in the library, through an overlay refresh and in the service, which answers as the library
does and times the stage; rerank_n=0 is the index's own ranking."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from faiss.contrib.evaluation import check_ref_knn_with_draws

from cirflow.export.evaluate_bundle import evaluate_bundle
from cirflow.export.runtime import BundleRuntime
from cirflow.indexing.index.build import build_index
from cirflow.indexing.index.plan import IndexConfig
from cirflow.indexing.index.queries import Queries
from cirflow.indexing.index.refresh import refresh_index
from cirflow.indexing.index.sharded import build_sharded_index
from cirflow.indexing.index.versions import publish
from cirflow.indexing.search import Searcher, load_index
from cirflow.indexing.search.entries import SearchError
from cirflow.indexing.search.searcher import IndexMismatchError
from cirflow.indexing.search.sharded import FanoutStats, shard_vector_store
from cirflow.indexing.service.app import create_app
from cirflow.indexing.service.ray_shards import RemoteShards, ShardServer
from cirflow.indexing.service.state import Published, ServiceConfig
from cirflow.models.checkpoint import load_checkpoint
from cirflow.models.data.loaders import load_split
from cirflow.models.evaluation import TorchEncoders, build_eval_set, embed_eval_set, score_embeddings
from tests.export.conftest import random_images
from tests.indexing.conftest import clustered, write_snapshot
from tests.indexing.service_setup import LiveServer
from tests.indexing.test_overlay_search import snapshot as next_snapshot
from tests.indexing.test_sharded_serve import FakeShard

N, K = 600, 8
TEXTS = ["make it red", "add a small green square", "remove the large triangle", "same but blue"]


@pytest.fixture(scope="module")
def setup(tiny_artemis: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The ARTEMIS runtime, a re-ranking snapshot of clustered catalog vectors, its flat index and queries."""
    root = tmp_path_factory.mktemp("rerank")
    runtime = BundleRuntime.load(tiny_artemis, providers="cpu")
    assert runtime.reranks and runtime.rerank_n == 100
    vectors = clustered(N, runtime.embed_dim, seed=3)
    run = write_snapshot(root / "snapshot-1", vectors, 250, bundle_id=runtime.bundle_id, reranks=True)
    images = [image for image in random_images(len(TEXTS), runtime.preprocess.size, seed=7)]
    queries, features = runtime.embed_queries_with_features(images, TEXTS)
    index_dir = build_index(run, Queries.unreferenced(queries), root / "indexes", IndexConfig(index_type="flat"))
    return {"runtime": runtime, "run": run, "index_dir": index_dir, "images": images, "queries": queries,
            "features": features, "root": root}


def exact(runtime: BundleRuntime, features: np.ndarray, ids: np.ndarray, vectors: np.ndarray,
          k: int) -> tuple[np.ndarray, np.ndarray]:
    """The brute-force exact ranking: every catalog vector scored by the re-ranker."""
    scores = runtime.rescore(features, np.broadcast_to(vectors[None], (len(features), *vectors.shape)))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, 1)


def test_rerank_over_the_whole_catalog_is_the_exact_ranking(setup: dict[str, Any]) -> None:
    runtime, run = setup["runtime"], setup["run"]
    searcher = Searcher(load_index(setup["index_dir"]), runtime)
    assert searcher.index.manifest["vectors"] == {"file": "vectors.npy", "dtype": "float32"}
    assert "the re-ranker's float32 vector store" in searcher.index.manifest["reason"]  # planned within the budget
    ids, vectors, _ = run.read_all()
    np.testing.assert_array_equal(searcher.index.vectors_of(ids[::7]), vectors[::7])
    want_ids, want_scores = exact(runtime, setup["features"], ids, vectors, K)
    found = searcher.search_batch(setup["images"], TEXTS, k=K, rerank_n=N)
    check_ref_knn_with_draws(want_scores, want_ids, np.stack([r.scores for r in found]),
                             np.stack([r.ids for r in found]))
    # rerank_n=0: the folded vector's own ranking, as the index gives it.
    plain = searcher.search_batch(setup["images"], TEXTS, k=K, rerank_n=0)
    index_ids, index_scores = searcher.index.search(setup["queries"], K)
    np.testing.assert_array_equal(np.stack([r.ids for r in plain]), index_ids)
    np.testing.assert_allclose(np.stack([r.scores for r in plain]), index_scores, rtol=0, atol=1e-6)
    # The default N: the exact order of the index's top 100.
    top = searcher.index.search(setup["queries"], 100)[0]
    default = searcher.search_batch(setup["images"], TEXTS, k=K)
    for row, result in enumerate(default):
        assert set(result.ids) <= set(top[row])
        rescored = runtime.rescore(setup["features"][row:row + 1], searcher.index.vectors_of(result.ids[None]))[0]
        np.testing.assert_allclose(result.scores, rescored, rtol=0, atol=1e-6)
        assert list(result.scores) == sorted(result.scores, reverse=True)
    # Excluded and allowed ids hold in the re-ranked answer as in any other.
    allowed = ids[::3]
    kept = searcher.search_batch(setup["images"][:1], TEXTS[:1], k=K, exclude_ids=[want_ids[0, 0]],
                                 allow_ids=allowed, rerank_n=N)[0]
    inside = np.isin(ids, allowed) & (ids != want_ids[0, 0])
    sub_ids, sub_scores = exact(runtime, setup["features"][:1], ids[inside], vectors[inside], K)
    check_ref_knn_with_draws(sub_scores, sub_ids, kept.scores[None], kept.ids[None])
    with pytest.raises(SearchError, match="rerank_n must be a non-negative integer"):
        searcher.search(setup["images"][0], TEXTS[0], rerank_n=-1)


def test_an_overlay_refresh_reranks_from_the_changed_vectors(setup: dict[str, Any]) -> None:
    runtime, run, root = setup["runtime"], setup["run"], setup["root"]
    ids, vectors, _ = run.read_all()
    rng = np.random.default_rng(11)
    changed = {int(i): v for i, v in zip(ids[:20], clustered(20, runtime.embed_dim, seed=99))}
    added = {int(ids.max()) + 10 * j + 1: v for j, v in enumerate(clustered(15, runtime.embed_dim, seed=98))}
    removed = rng.choice(ids[20:], 10, replace=False)
    new_run = next_snapshot(run, root / "snapshot-2", removed, changed, added, bundle_id=runtime.bundle_id,
                            reranks=True)
    overlay = refresh_index(new_run, Queries.unreferenced(setup["queries"]), setup["index_dir"],
                            IndexConfig(index_type="flat"), max_fraction=0.5)
    assert overlay is not None and (overlay / "delta-vectors.npy").is_file()
    searcher = Searcher(load_index(overlay), runtime)
    new_ids, new_vectors, _ = new_run.read_all()
    np.testing.assert_array_equal(searcher.index.vectors_of(new_ids), new_vectors)  # changed ones: the new rows
    want_ids, want_scores = exact(runtime, setup["features"], new_ids, new_vectors, K)
    found = searcher.search_batch(setup["images"], TEXTS, k=K, rerank_n=N + 100)
    check_ref_knn_with_draws(want_scores, want_ids, np.stack([r.scores for r in found]),
                             np.stack([r.ids for r in found]))


def test_a_sharded_version_reranks_from_its_shards_vectors(setup: dict[str, Any]) -> None:
    runtime, run = setup["runtime"], setup["run"]
    sharded = build_sharded_index(run, Queries.unreferenced(setup["queries"]), setup["root"] / "sharded",
                                  IndexConfig(index_type="flat"), shards=3)
    searcher = Searcher(load_index(sharded), runtime)
    ids, vectors, _ = run.read_all()
    np.testing.assert_array_equal(searcher.index.vectors_of(ids), vectors)
    assert shard_vector_store(sharded, searcher.index.manifest).vectors_of(ids[:5]).shape == (5, runtime.embed_dim)
    want_ids, want_scores = exact(runtime, setup["features"], ids, vectors, K)
    found = searcher.search_batch(setup["images"], TEXTS, k=K, rerank_n=N)
    check_ref_knn_with_draws(want_scores, want_ids, np.stack([r.scores for r in found]),
                             np.stack([r.ids for r in found]))


def test_the_sharded_front_reranks_as_the_library(setup: dict[str, Any], tiny_artemis: Path) -> None:
    """The Ray front's path (service/ray_shards.py, its shard calls answered in process): the candidates come
    from the remote shards, their vectors from the shards' stores on the shared directory."""
    sharded = build_sharded_index(setup["run"], Queries.unreferenced(setup["queries"]), setup["root"] / "front",
                                  IndexConfig(index_type="flat"), shards=2)
    publish(sharded)
    library = Searcher(load_index(sharded), setup["runtime"])
    handles = [FakeShard(ShardServer(sharded.parent, part, verify="size"), []) for part in (0, 1)]
    config = ServiceConfig(index=sharded.parent, bundle=tiny_artemis, reload_seconds=0, providers="cpu")
    app = create_app(config, Published(config, lambda path: RemoteShards(path, handles, 5.0, FanoutStats())))
    png = _png(setup["images"][0])
    with LiveServer(app) as live:
        for rerank_n in (None, 0, N):
            body = {"image_base64": base64.b64encode(png).decode(), "text": TEXTS[0], "k": K,
                    **({} if rerank_n is None else {"rerank_n": rerank_n})}
            answer = httpx.post(f"{live.url}/search", json=body, timeout=60).json()
            expected = library.search(png, TEXTS[0], k=K, rerank_n=rerank_n)
            assert [int(hit["id"]) for hit in answer["results"]] == expected.ids.tolist()
            np.testing.assert_allclose([hit["score"] for hit in answer["results"]], expected.scores, atol=1e-5)
            assert ("rerank" in answer["took_ms"]) == (rerank_n != 0)


def test_the_service_reranks_as_the_library_and_times_the_stage(setup: dict[str, Any], tiny_artemis: Path,
                                                                tmp_path: Path) -> None:
    runtime = setup["runtime"]
    library = Searcher(load_index(setup["index_dir"]), runtime)
    config = ServiceConfig(index=setup["index_dir"], bundle=tiny_artemis, reload_seconds=0, providers="cpu",
                           max_rerank_n=N)
    encoded = [(image := _png(setup["images"][row]), base64.b64encode(image).decode()) for row in range(2)]
    with LiveServer(create_app(config, Published(config))) as live:
        for row, (png, b64) in enumerate(encoded):
            for rerank_n in (None, 0, 5, N):
                body = {"image_base64": b64, "text": TEXTS[row], "k": K,
                        **({} if rerank_n is None else {"rerank_n": rerank_n})}
                answer = httpx.post(f"{live.url}/search", json=body, timeout=60).json()
                expected = library.search(png, TEXTS[row], k=K, rerank_n=rerank_n)
                assert [int(hit["id"]) for hit in answer["results"]] == expected.ids.tolist()
                np.testing.assert_allclose([hit["score"] for hit in answer["results"]], expected.scores, atol=1e-5)
                if rerank_n == 0:
                    assert "rerank_n" not in answer and "rerank" not in answer["took_ms"]
                else:
                    assert answer["rerank_n"] == (100 if rerank_n is None else max(K, rerank_n))
                    assert answer["took_ms"]["rerank"] >= 0
        too_many = httpx.post(f"{live.url}/search", json={"image_base64": encoded[0][1], "text": TEXTS[0],
                                                          "rerank_n": N + 1}, timeout=60)
        assert too_many.status_code == 422 and f"rerank_n: must be between 0 and {N}" in too_many.text
        for careless in (-1, True, 2.5, "ten"):
            bad = httpx.post(f"{live.url}/search", json={"image_base64": encoded[0][1], "text": TEXTS[0],
                                                         "rerank_n": careless}, timeout=60)
            assert bad.status_code == 422 and "rerank_n" in bad.text, (careless, bad.text)
        metrics = httpx.get(f"{live.url}/metrics", timeout=30).text
    assert 'cirflow_search_stage_seconds_count{stage="rerank"}' in metrics


def test_a_reranking_bundle_refuses_an_index_without_vectors(setup: dict[str, Any], tmp_path: Path) -> None:
    runtime = setup["runtime"]
    ids, vectors, _ = setup["run"].read_all()
    run = write_snapshot(tmp_path / "snapshot", vectors, 300, ids, bundle_id=runtime.bundle_id)  # reranks unset
    index_dir = build_index(run, Queries.unreferenced(setup["queries"]), tmp_path / "indexes",
                            IndexConfig(index_type="flat"))
    assert "vectors" not in load_index(index_dir).manifest
    with pytest.raises(IndexMismatchError, match="re-ranks from the catalog vectors, but index"):
        Searcher(load_index(index_dir), runtime)


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_the_bundle_evaluator_reranks_as_the_pytorch_model_does(tiny_artemis: Path, tiny_shapes: Path) -> None:
    """The bundle's evaluation (ONNX Runtime: the query graph's features, reranker.onnx) ranks in the same two
    stages as the PyTorch model's (models/rerank.py at the default N): the same metrics."""
    ckpt = load_checkpoint(tiny_artemis.parent / "model.pt")
    data = build_eval_set(load_split("shapes", tiny_shapes, "test"), ckpt.config.preprocess)
    encoders = TorchEncoders(ckpt.model)
    assert encoders.reranks
    emb = embed_eval_set(encoders, data, ckpt.tokenizer, ckpt.config.preprocess, ("composed",))
    ours = score_embeddings(emb, data, ("composed",)).metrics["composed"]
    theirs = evaluate_bundle(tiny_artemis, "shapes", tiny_shapes, ("test",), providers="cpu")["shapes/test"]
    assert theirs["composed"] == pytest.approx(ours, abs=1e-9)

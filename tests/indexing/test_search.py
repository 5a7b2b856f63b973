"""The search library: exclusion, uris, memory mapping, verification, refusals, and the one query path
reproducing the evaluator's recall through a real bundle."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from cirflow.export.evaluate_bundle import evaluate_bundle
from cirflow.export.runtime import BundleRuntime
from cirflow.flows.cli import main
from cirflow.indexing.embedding.shards import EmbeddingSnapshot
from cirflow.indexing.index.build import build_index
from cirflow.indexing.index.evaluate import recall_through_search
from cirflow.indexing.index.plan import IndexConfig
from cirflow.indexing.index.queries import Queries, encode_query_split
from cirflow.indexing.index.versions import publish
from cirflow.indexing.search import IndexMismatchError, Searcher, SearchError, VectorIndex
from cirflow.indexing.search.index_store import IndexFormatError
from cirflow.indexing.search.placement import FaissGpuUnavailableError, gpu_count
from cirflow.indexing.search.topk import PAD_SCORE
from cirflow.models.data.loaders import load_split
from cirflow.models.evaluation import build_eval_set, embed_eval_set
from cirflow.models.metrics import target_ranks
from tests.indexing.conftest import write_snapshot
from tests.models.test_fashioniq import write_fiq


def test_exclusion_drops_the_reference_and_still_returns_k(built: dict[str, Path], toy_queries: np.ndarray) -> None:
    index = VectorIndex.load(built["flat"])
    ids, scores = index.search(toy_queries, 11)
    exclude: list[int | None] = [int(i) for i in ids[:, 0]]
    exclude[1] = None  # a query without a reference in the catalog
    exclude[2] = int(ids[2, 7])  # the reference ranked further down
    kept, kept_scores = index.search(toy_queries, 10, exclude_ids=exclude)
    assert kept.shape == (400, 10) and (kept >= 0).all()
    np.testing.assert_array_equal(kept[0], ids[0, 1:])
    np.testing.assert_array_equal(kept[1], ids[1, :10])
    np.testing.assert_array_equal(kept[2], np.delete(ids[2], 7))
    np.testing.assert_allclose(kept_scores[0], scores[0, 1:])
    assert not (kept == np.array([-1 if e is None else e for e in exclude])[:, None]).any()


def test_results_carry_uris_and_drop_padding(built: dict[str, Path], toy_queries: np.ndarray,
                                             tmp_path: Path) -> None:
    index = VectorIndex.load(built["hnsw"])
    (result,) = index.results(*index.search(toy_queries[:1], 3))
    assert result.uris == [f"mem://toys/{i}.png" for i in result.ids] and len(result.scores) == 3
    small = write_snapshot(tmp_path / "run", toy_queries[:4], rows_per_shard=4)  # four vectors: k=6 gives 4
    tiny = VectorIndex.load(build_index(small, Queries.unreferenced(toy_queries[4:40]), tmp_path / "indexes"))
    (padded,) = tiny.results(*tiny.search(toy_queries[:1], 6))
    assert len(padded.ids) == len(padded.uris) == 4


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf_flat", "ivf_pq", "hnsw_sq", "ivf_pq_rerank"])
def test_memory_mapped_load_gives_the_same_results(built: dict[str, Path], toy_queries: np.ndarray,
                                                   index_type: str) -> None:
    mapped = VectorIndex.load(built[index_type], mmap=True)
    # Memory-mapped files show up in the process's mappings (Linux): IO_FLAG_MMAP_IFC for flat, HNSW storage;
    # the merged IVF lists (index.ivfdata) are mapped whatever the flag; a re-rank's float16 store always.
    mapped_file = {"ivf_flat": "index.ivfdata", "ivf_pq": "index.ivfdata", "ivf_pq_rerank": "rerank.npy"}.get(
        index_type, "index.faiss")
    assert str(built[index_type] / mapped_file) in Path("/proc/self/maps").read_text()
    loaded = VectorIndex.load(built[index_type], mmap=False)
    for a, b in zip(mapped.search(toy_queries, 10), loaded.search(toy_queries, 10)):
        np.testing.assert_array_equal(a, b)


def test_truncated_or_altered_index_files_are_refused(built: dict[str, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(built["ivf_flat"], tmp_path / "index"))
    data = copy / "index.ivfdata"
    original = data.read_bytes()
    data.write_bytes(original[:-64])
    with pytest.raises(IndexFormatError, match=r"index\.ivfdata has \d+ bytes, the manifest records \d+ \(trunc"):
        VectorIndex.load(copy, verify="size")
    data.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(IndexFormatError, match=r"file index\.ivfdata does not match its sha256"):
        VectorIndex.load(copy)
    with pytest.raises(IndexFormatError, match="neither an index directory"):
        VectorIndex.load(tmp_path)


def test_k_is_capped_at_the_index_size(built: dict[str, Path], toy_queries: np.ndarray) -> None:
    # A billion results per query would be a 12 GB allocation: the index holds 6000 and returns at most those
    # (HNSW returns what its graph walk reached, padded to 6000).
    hnsw = VectorIndex.load(built["hnsw"], verify="size")
    started = time.perf_counter()
    ids, scores = hnsw.search(toy_queries[:3], 10**9)
    assert time.perf_counter() - started < 10
    assert ids.shape == scores.shape == (3, 6000)
    assert all(len(set(row.tolist()) - {-1}) == (row >= 0).sum() >= 10 for row in ids)
    flat = VectorIndex.load(built["flat"], verify="size")
    assert (flat.search(toy_queries[:3], 10**9)[0] >= 0).all()  # the exact scan: the whole catalog
    exclude = [int(flat.search(toy_queries[:1], 1)[0][0, 0]), None, 12345]  # in the catalog, none, not in it
    ids, scores = flat.search(toy_queries[:3], 10**9, exclude_ids=exclude)
    assert ids.shape == (3, 6000)
    assert exclude[0] not in ids[0] and list(ids[0, -1:]) == [-1] and scores[0, -1] == PAD_SCORE
    assert (ids[1:] >= 0).all()  # nothing of theirs to drop: the whole catalog
    np.testing.assert_array_equal(ids[0, :5999], flat.search(toy_queries[:1], 6000)[0][0, 1:])


def test_bad_requests_name_the_argument(built: dict[str, Path], toy_queries: np.ndarray) -> None:
    index = VectorIndex.load(built["flat"], verify="size")
    with pytest.raises(SearchError, match="k must be a positive integer, got 0"):
        index.search(toy_queries, 0)
    with pytest.raises(SearchError, match=r"queries must be \(Q, 32\) .* got shape \(400, 16\)"):
        index.search(toy_queries[:, :16], 5)
    with pytest.raises(SearchError, match="exclude_ids has 1 entries for 400 queries"):
        index.search(toy_queries, 5, exclude_ids=[3])
    with pytest.raises(ValueError, match=r"verify='md5' is not one of \['sha256', 'size'\]"):
        VectorIndex.load(built["flat"], verify="md5")
    if gpu_count() == 0:
        with pytest.raises(FaissGpuUnavailableError, match="use_gpu='require'"):
            VectorIndex.load(built["flat"], use_gpu="require")


def test_an_index_from_another_bundle_is_refused(built: dict[str, Path], tiny_runtime: BundleRuntime) -> None:
    index = VectorIndex.load(built["flat"], verify="size")
    with pytest.raises(IndexMismatchError, match=f"bundle {index.bundle_id}, but bundle .* is "
                                                 f"{tiny_runtime.bundle_id}"):
        Searcher(index, tiny_runtime)


def embed_gallery(runtime: BundleRuntime, names: list[str], paths: list[Path], snapshot_dir: Path) -> EmbeddingSnapshot:
    """The split's gallery as an embedding snapshot (ids = gallery rows, uris = image names), by the bundle's image
    encoder: what the Ray embedding job writes, made in-process."""
    vectors = runtime.embed_images(paths)
    return write_snapshot(snapshot_dir, vectors, rows_per_shard=20, ids=np.arange(len(names), dtype=np.int64), uris=names,
                     bundle_id=runtime.bundle_id, catalog="shapes-test")


def test_search_reproduces_the_evaluator_recall(tiny_runtime: BundleRuntime, tiny_shapes: Path,
                                                tmp_path: Path) -> None:
    split = load_split("shapes", tiny_shapes, "test")
    names = list(split.images)  # the evaluator's gallery order
    run = embed_gallery(tiny_runtime, names, [split.images[n] for n in names], tmp_path / "run")
    queries = encode_query_split(tiny_runtime, "shapes", tiny_shapes, "test")
    references, targets = [q.reference for q in split.queries], [q.target for q in split.queries]
    index_dir = build_index(run, queries, tmp_path / "indexes", IndexConfig())
    publish(index_dir)
    searcher = Searcher(VectorIndex.load(index_dir.parent), tiny_runtime)  # through CURRENT
    assert searcher.index.manifest["type"] == "flat"  # 54 images: exact scan

    row = {n: i for i, n in enumerate(names)}
    results = searcher.search_batch([split.images[q.reference] for q in split.queries],
                                    [q.caption for q in split.queries], k=10,
                                    exclude_ids=[row[r] for r in references])  # CIRR removes the reference
    ranks = np.array([list(r.ids).index(row[t]) if row[t] in r.ids else 10 for r, t in zip(results, targets)])
    ours = {f"R@{k}": float(np.mean(ranks < k)) for k in (1, 5, 10)}
    theirs = evaluate_bundle(tiny_runtime.bundle_dir, "shapes", tiny_shapes, ("test",), providers="cpu")
    assert ours == {m: theirs["shapes/test"]["composed"][m] for m in ours}
    assert all(r.uris == [names[i] for i in r.ids] for r in results)

    one = searcher.search(split.images[split.queries[0].reference], split.queries[0].caption, k=10,
                          exclude_id=row[references[0]])
    np.testing.assert_array_equal(one.ids, results[0].ids)


def test_cli_search_with_a_huge_k_lists_the_catalog(tiny_runtime: BundleRuntime, tiny_shapes: Path,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    split = load_split("shapes", tiny_shapes, "test")
    names = list(split.images)
    run = embed_gallery(tiny_runtime, names, [split.images[n] for n in names], tmp_path / "run")
    index_dir = build_index(run, encode_query_split(tiny_runtime, "shapes", tiny_shapes, "test"), tmp_path / "ix")
    query = split.queries[0]
    assert main(["index", "search", "--index", str(index_dir), "--bundle", str(tiny_runtime.bundle_dir), "--image",
                 str(split.images[query.reference]), "--text", query.caption, "-k", "1000000000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(names) and lines[0].startswith("1\t") and lines[-1].startswith(f"{len(names)}\t")


def test_search_follows_fashioniqs_protocol_and_keeps_the_reference(tiny_runtime: BundleRuntime,
                                                                   tmp_path: Path) -> None:
    # Every image is a reference and a target: in FashionIQ's ranking the reference stays in (CIRR removes it).
    entries = [{"candidate": a, "target": b, "captions": ["is darker", "has a stripe"]}
               for a, b in [("B001", "B002"), ("B002", "B003"), ("B003", "B004"), ("B004", "B001"),
                            ("B002", "B001"), ("B004", "B002")]]
    root = write_fiq(tmp_path / "fiq", entries=entries)
    split = load_split("fashioniq/dress", root, "val")
    assert not split.remove_reference
    names = list(split.images)
    run = write_snapshot(tmp_path / "run", tiny_runtime.embed_images([split.images[n] for n in names]), rows_per_shard=4,
                    ids=np.arange(len(names), dtype=np.int64) * 10 + 3,
                    uris=[str(split.images[n]) for n in names], bundle_id=tiny_runtime.bundle_id, catalog="fiq")
    searcher = Searcher(VectorIndex.load(build_index(run, encode_query_split(tiny_runtime, "fashioniq/dress", root,
                                                                             "val"), tmp_path / "ix")), tiny_runtime)
    ks = (1, 2, 3, 4)
    ours = recall_through_search(searcher, "fashioniq/dress", root, "val", ks=ks)

    # The evaluator's ranks, the reference kept in.
    data = build_eval_set(split, tiny_runtime.preprocess)
    emb = embed_eval_set(tiny_runtime, data, tiny_runtime.tokenizer, tiny_runtime.preprocess, ("composed",))
    scores = emb.queries["composed"] @ emb.gallery.T
    targets = np.array([names.index(q.target) for q in split.queries])
    ranks = target_ranks(scores, targets, None)
    assert ours == pytest.approx({f"R@{k}": float(np.mean(ranks < k)) for k in ks}, abs=1e-6)
    # The reference outranks the target for some query, so removing it (the CIRR rule) would change the numbers.
    assert (target_ranks(scores, targets, data.ref_rows) < ranks).any()

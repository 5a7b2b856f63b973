"""Catalog metadata carried from a manifest into each index version (refreshes and overlays included), and search
restricted to allowed ids, against exact search over the allowed subset for every index type."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from cirflow.export.runtime import BundleRuntime
from cirflow.indexing.embedding import shards
from cirflow.indexing.embedding.catalog import CatalogConfig, CatalogError, fingerprint, folder_entries, load_catalog
from cirflow.indexing.embedding.job import EmbedConfig, run_embed
from cirflow.indexing.embedding.shards import EmbeddingSnapshot
from cirflow.indexing.index.build import build_index
from cirflow.indexing.index.plan import IndexConfig
from cirflow.indexing.index.queries import Queries
from cirflow.indexing.index.refresh import refresh_index
from cirflow.indexing.search import (
    Searcher,
    SearchError,
    UnknownFieldError,
    UnknownIdError,
    VectorIndex,
    index_store,
    vector_index,
)
from cirflow.indexing.search.filtered import overfetch_allowed
from cirflow.indexing.search.placement import set_search_param
from cirflow.indexing.search.topk import PAD_SCORE
from tests.export.conftest import random_images
from tests.indexing.conftest import TYPE_CONFIGS, unit
from tests.indexing.test_embed import png_bytes, write_images


def exact_allowed(ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, allowed: Any,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of the exact top-k over the allowed catalog rows, padded with -1 as search pads."""
    rows = np.isin(ids, np.asarray(allowed, np.int64))
    scores = queries @ vectors[rows].T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    found_ids = np.full((len(queries), k), -1, np.int64)
    found_scores = np.full((len(queries), k), PAD_SCORE, np.float32)
    found_ids[:, :order.shape[1]] = ids[rows][order]
    found_scores[:, :order.shape[1]] = np.take_along_axis(scores, order, axis=1)
    return found_ids, found_scores


def assert_exact(found: tuple[np.ndarray, np.ndarray], truth: tuple[np.ndarray, np.ndarray]) -> None:
    np.testing.assert_allclose(found[1], truth[1], atol=1e-5)
    assert [set(row) for row in found[0].tolist()] == [set(row) for row in truth[0].tolist()]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b) - {-1}) / max(1, len(set(b) - {-1}))
                          for a, b in zip(found.tolist(), truth.tolist())]))


# Catalog: metadata columns -------------------------------------------------------------------------------------

def test_manifest_metadata_is_kept_in_four_types(tmp_path: Path) -> None:
    frame = pd.DataFrame({"id": [9, 4, 6], "uri": ["a.png", "b.png", "c.png"],
                          "category": pd.Categorical(["shoe", None, "hat"]),  # dictionary-encoded, a null
                          "stock": pd.array([3, None, 0], dtype="Int32"), "price": np.float32([1.5, 2.0, 0.25]),
                          "sale": [True, False, True]}).set_index("uri", drop=False)  # an index column too
    frame.index.name = "pandas_index"
    frame.to_parquet(tmp_path / "m.parquet")
    table = load_catalog(CatalogConfig(name="c", manifest=str(tmp_path / "m.parquet")))
    assert table.column_names == ["id", "uri", "version", "category", "stock", "price", "sale"]
    assert [str(t) for t in table.schema.types[3:]] == ["string", "int64", "double", "bool"]
    assert table.select(["id", "category", "stock", "price", "sale"]).to_pylist() == [
        {"id": 4, "category": None, "stock": None, "price": 2.0, "sale": False},
        {"id": 6, "category": "hat", "stock": 0, "price": 0.25, "sale": True},
        {"id": 9, "category": "shoe", "stock": 3, "price": 1.5, "sale": True}]
    # The metadata is part of the catalog's state; without any, the state hashes as it always did.
    renamed = table.set_column(3, "category", pa.array(["boot", "hat", "shoe"]))
    assert fingerprint(renamed) != fingerprint(table) != fingerprint(table.select(["id", "uri", "version"]))
    assert fingerprint(table) == fingerprint(load_catalog(CatalogConfig(name="c", manifest=str(tmp_path /
                                                                                                "m.parquet"))))

    # CSV has no types: integers, floats and booleans are inferred, the rest (dates too) is the text as written.
    (tmp_path / "m.csv").write_text("id,uri,category,stock,added,sale,note\n2,a.png,shoe,,2024-05-01,true,\n"
                                    "1,b.png,,7,2024-06-02,false,\n")
    csv = load_catalog(CatalogConfig(name="c", manifest=str(tmp_path / "m.csv")))
    assert csv.drop_columns(["uri", "version"]).to_pylist() == [
        {"id": 1, "category": "", "stock": 7, "added": "2024-06-02", "sale": False, "note": None},
        {"id": 2, "category": "shoe", "stock": None, "added": "2024-05-01", "sale": True, "note": None}]
    # A version column is read as before metadata existed: an updated-at stamp as Arrow reads a timestamp.
    (tmp_path / "v.csv").write_text("id,uri,version,added\n1,a.png,2024-05-01T10:00:00,2024-05-01T10:00:00\n")
    stamped = load_catalog(CatalogConfig(name="c", manifest=str(tmp_path / "v.csv")))
    assert stamped.select(["version", "added"]).to_pylist() == [{"version": "2024-05-01 10:00:00",
                                                                 "added": "2024-05-01T10:00:00"}]


@pytest.mark.parametrize("column, message", [
    (pa.array([["a"], ["b"]]), r"metadata column 'bad' is list<element: string>; metadata columns must be strings"),
    (pa.array([{"x": 1}, {"x": 2}]), r"metadata column 'bad' is struct<x: int64>"),
    (pa.array([b"a", b"b"]), r"metadata column 'bad' is binary"),
    (pa.array([1, 2], pa.timestamp("s")), r"metadata column 'bad' is timestamp\["),
])
def test_metadata_columns_that_are_not_scalars_are_refused(tmp_path: Path, column: pa.Array, message: str) -> None:
    pq.write_table(pa.table({"id": [1, 2], "uri": ["a.png", "b.png"], "bad": column}), tmp_path / "m.parquet")
    with pytest.raises(CatalogError, match=message):
        load_catalog(CatalogConfig(name="c", manifest=str(tmp_path / "m.parquet")))


@pytest.mark.parametrize("name", ["_hidden", ""])
def test_metadata_column_names_must_be_plain(tmp_path: Path, name: str) -> None:
    pq.write_table(pa.table({"id": [1], "uri": ["a.png"], name: ["x"]}), tmp_path / "m.parquet")
    with pytest.raises(CatalogError, match=f"column {name!r}: metadata column names must be non-empty and must "
                                           "not start with '_'"):
        load_catalog(CatalogConfig(name="c", manifest=str(tmp_path / "m.parquet")))


# Metadata through snapshots and index versions -------------------------------------------------------------------

def write_manifest(path: Path, folder: Path, images: list[Path], category: dict[str, str]) -> None:
    """A shop manifest of these images: category by file name, stock = the image's number (null for every
    fifth), price."""
    table = folder_entries(folder, images)
    names = [Path(u).name for u in table.column("uri").to_pylist()]
    stock = [None if int(n[4:7]) % 5 == 0 else int(n[4:7]) for n in names]
    table = table.append_column("category", pa.array([category[n] for n in names]))
    table = table.append_column("stock", pa.array(stock, pa.int64()))
    table = table.append_column("price", pa.array([float(len(n)) / 4 for n in names]))
    if path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)


@pytest.fixture(scope="module")
def shop(tiny_runtime: BundleRuntime, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One shop through three catalog states, each embedded and indexed as the catalog flow does it:
    A (Parquet manifest) -> v1 (full build); B = A with categories renamed -> v2 (overlay on v1) and a full build;
    C (a CSV manifest) = B with 2 images added, 1 removed, 1 overwritten -> v3 (overlay on v2)."""
    root = tmp_path_factory.mktemp("shop")
    folder = root / "images"
    images = write_images(folder, 16, seed=21)
    category = {p.name: ("shoe" if i % 2 else "hat") for i, p in enumerate(images)}
    job = EmbedConfig(catalog=CatalogConfig(name="shop", manifest=str(root / "a.parquet")),
                      bundle=str(tiny_runtime.bundle_dir), workdir=str(root / "work"), rows_per_shard=8, batch_size=8)
    config = IndexConfig(index_type="flat")
    write_manifest(root / "a.parquet", folder, images, category)
    run_a = shards.open_snapshot(run_embed(job))
    queries = Queries.unreferenced(unit(np.random.default_rng(4).standard_normal((30, run_a.dim))))
    v1 = build_index(run_a, queries, root / "indexes", config)

    renamed = {name: {"hat": "cap"}.get(c, c) for name, c in category.items()}
    write_manifest(root / "b.parquet", folder, images, renamed)
    run_b = shards.open_snapshot(run_embed(replace(job, catalog=replace(job.catalog, manifest=str(root / "b.parquet")))))
    v2 = refresh_index(run_b, queries, v1, config, max_fraction=0.5)
    v2_full = build_index(run_b, queries, root / "indexes", config)

    added = [folder / f"img-{100 + i}.png" for i in range(2)]
    for path, pixels in zip(added, random_images(2, 64, seed=22)):
        path.write_bytes(png_bytes(pixels))
    removed, changed = images[0], images[1]
    removed.unlink()
    changed.write_bytes(png_bytes(random_images(1, 64, seed=23)[0]))
    kept = images[1:] + added
    write_manifest(root / "c.csv", folder, kept, {**renamed, **{p.name: "sock" for p in added}})
    run_c = shards.open_snapshot(run_embed(replace(job, catalog=replace(job.catalog, manifest=str(root / "c.csv")))))
    v3 = refresh_index(run_c, queries, v2, config, max_fraction=0.5)
    ids_of = {Path(u).name: i for i, u in zip(*(folder_entries(folder, images + added).column(c).to_pylist()
                                                for c in ("id", "uri")))}
    return {"runs": (run_a, run_b, run_c), "versions": (v1, v2, v2_full, v3), "queries": queries, "ids_of": ids_of,
            "folder": folder,
            "removed": ids_of[removed.name], "changed": ids_of[changed.name],
            "added": [ids_of[p.name] for p in added]}


def test_manifest_metadata_reaches_item_and_page(shop: dict[str, Any]) -> None:
    index = VectorIndex.load(shop["versions"][0])
    assert index.entries.fields == {"category": "string", "stock": "int", "price": "float"}
    assert index_store.read_manifest(index.index_dir)["metadata_fields"] == index.entries.fields
    first = shop["ids_of"]["img-001.png"]
    assert index.entries.item(first) == {"id": first, "uri": os.path.realpath(shop["folder"] / "img-001.png"),
                                 "category": "shoe", "stock": 1, "price": 11 / 4}
    assert index.entries.item(shop["ids_of"]["img-005.png"])["stock"] is None  # a null is None
    items = index.entries.page(0, 100)
    assert [i["id"] for i in items] == sorted(shop["ids_of"][f"img-{n:03d}.png"] for n in range(16))
    assert index.entries.page(3, 2) == items[3:5] and index.entries.page(16, 5) == [] and index.entries.page(15, 5) == items[15:]
    with pytest.raises(UnknownIdError, match="catalog id 12345 is not in index"):
        index.entries.item(12345)
    assert index.entries.unknown_ids([12345, items[0]["id"], 7, 12345]).tolist() == [7, 12345]
    assert index.entries.unknown_ids(np.array([], np.int64)).size == 0
    with pytest.raises(SearchError, match="id must be an integer catalog id, got '7'"):
        index.entries.item("7")  # type: ignore[arg-type]
    for offset, limit, message in ((-1, 5, "offset must be an integer >= 0"), (0, 0, "limit must be an integer "
                                   ">= 1"), (17, 1, "offset 17 is past the end of the catalog \\(16 items\\)")):
        with pytest.raises(SearchError, match=message):
            index.entries.page(offset, limit)


def test_a_metadata_only_change_reuses_every_vector_and_makes_a_new_index_version(shop: dict[str, Any]) -> None:
    run_a, run_b, _ = shop["runs"]
    v1, v2, v2_full, _ = shop["versions"]
    assert run_b.snapshot_dir != run_a.snapshot_dir and run_b.snapshot_dir.parent == run_a.snapshot_dir.parent
    delta = run_b.manifest["delta"]
    assert (delta["added"], delta["changed"], delta["removed"], delta["reused_vectors"]) == (0, 0, 0, 16)
    assert run_b.manifest["last_run"]["entries"] == 0  # nothing embedded
    assert {n: i["sha256"] for n, i in run_b.manifest["shards"].items()} == {
        n: i["sha256"] for n, i in run_a.manifest["shards"].items()}  # the very same vectors
    assert run_b.manifest["catalog"]["metadata_fields"] == {"category": "string", "stock": "int", "price": "float"}
    hat = shop["ids_of"]["img-000.png"]
    assert VectorIndex.load(v1).entries.item(hat)["category"] == "hat"
    # The overlay on v1 (no dead ids, no delta) and a full build of the same snapshot: new versions, new metadata.
    assert v2 is not None and len({v1, v2, v2_full}) == 3
    overlay = index_store.read_manifest(v2)["overlay"]
    assert (overlay["dead"], overlay["delta"]) == (0, 0)
    for version in (v2, v2_full):
        index = VectorIndex.load(version)
        assert index.entries.item(hat)["category"] == "cap" and index.entries.matching_ids({"category": "hat"}).size == 0
        np.testing.assert_array_equal(index.search(shop["queries"].vectors, 5)[0],
                                      VectorIndex.load(v1).search(shop["queries"].vectors, 5)[0])


def test_matching_ids_filters_by_value_list_null_and_all_fields(shop: dict[str, Any]) -> None:
    index = VectorIndex.load(shop["versions"][3])  # state C: from a CSV manifest, through an overlay
    ids_of = shop["ids_of"]
    table = pa.Table.from_pylist(index.entries.page(0, 100))
    assert index.entries.fields == {"category": "string", "stock": "int", "price": "float"}

    def where(mask: Any) -> list[int]:
        return sorted(table.filter(mask).column("id").to_pylist())

    cat = table.column("category")
    assert index.entries.matching_ids({"category": "sock"}).tolist() == sorted(shop["added"])
    assert index.entries.matching_ids({"category": ["cap", "sock"]}).tolist() == where(
        pc.is_in(cat, pa.array(["cap", "sock"])))
    assert index.entries.matching_ids({"category": "shoe", "stock": [3, 7, None]}).tolist() == sorted(
        ids_of[f"img-{n:03d}.png"] for n in (3, 5, 7, 15))  # stock is null for every fifth image
    assert index.entries.matching_ids({"stock": np.int64(9), "price": 11 / 4}).tolist() == [ids_of["img-009.png"]]
    assert index.entries.matching_ids({"price": 2}).size == 0 and index.entries.matching_ids({"category": []}).size == 0
    assert len(index.entries.matching_ids({})) == index.ntotal == 17
    assert index.entries.item(shop["added"][0])["category"] == "sock"
    with pytest.raises(UnknownFieldError, match=r"unknown metadata field 'colour'; fields: category, price, stock"):
        index.entries.matching_ids({"colour": "red"})
    with pytest.raises(SearchError, match=r"metadata field 'stock' holds int values; 'many' \(str\) cannot match"):
        index.entries.matching_ids({"stock": ["many"]})
    with pytest.raises(SearchError, match=r"metadata field 'category' holds string values; 3 \(int\)"):
        index.entries.matching_ids({"category": 3})
    with pytest.raises(SearchError, match="'stock' holds int values; True"):
        index.entries.matching_ids({"stock": True})


def test_allow_ids_on_an_overlay_equal_exact_search_over_the_subset(shop: dict[str, Any],
                                                                    tiny_runtime: BundleRuntime) -> None:
    run_c = shop["runs"][2]
    index = VectorIndex.load(shop["versions"][3])
    overlay = index.manifest["overlay"]
    assert (overlay["dead"], overlay["delta"]) == (2, 3)  # removed + changed; changed + 2 added
    ids, vectors, _ = run_c.read_all()
    queries = shop["queries"].vectors
    caps = index.entries.matching_ids({"category": "cap"})
    for allowed in (caps, [*shop["added"], shop["changed"], shop["removed"], 999], ids[::3]):
        found = index.search(queries, 6, allow_ids=allowed)
        assert_exact(found, exact_allowed(ids, vectors, queries, allowed, 6))
    found_ids = index.search(queries, 6, allow_ids=[shop["removed"], shop["changed"]])[0]
    assert (found_ids[:, 0] == shop["changed"]).all() and (found_ids[:, 1:] == -1).all()  # removed: never
    # The Searcher passes allow_ids through.
    searcher = Searcher(index, tiny_runtime)
    image = random_images(1, 64, seed=5)[0]
    (result,) = searcher.search_batch([image], ["make it red"], k=4, allow_ids=shop["added"])
    assert sorted(result.ids.tolist()) == sorted(shop["added"]) and len(result.uris) == 2
    assert set(searcher.search(image, "make it red", k=3, allow_ids=caps).ids.tolist()) <= set(caps.tolist())


# allow_ids on every index type -----------------------------------------------------------------------------------

@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf_flat", "ivf_pq", "hnsw_sq", "ivf_pq_rerank"])
def test_allow_ids_equal_exact_search_over_the_subset(built: dict[str, Path], toy_snapshot: EmbeddingSnapshot,
                                                      toy_queries: np.ndarray, index_type: str) -> None:
    ids, vectors, _ = toy_snapshot.read_all()
    rng = np.random.default_rng(7)
    queries = toy_queries[:100]
    index = VectorIndex.load(built[index_type])
    for allowed in (rng.choice(ids, 900, replace=False), np.append(rng.choice(ids, 15, replace=False), [1, 2])):
        truth = exact_allowed(ids, vectors, queries, allowed, 10)
        found = index.search(queries, 10, allow_ids=allowed)
        assert np.isin(found[0], allowed).all()  # only allowed ids, and always k of them (rows short at the
        # tuned setting are searched again with a wider one)
        if index_type == "ivf_pq":  # approximate codes: the right candidates, in roughly the right order
            assert recall(found[0], truth[0]) > 0.5
        else:
            assert recall(found[0], truth[0]) > 0.9
        if index_type in ("flat", "hnsw"):  # HNSW: a small allowed set is scanned exactly
            assert_exact(found, truth)
    if index_type == "ivf_flat":  # every list probed: exact
        set_search_param(index.index, "nprobe", index.manifest["params"]["nlist"], False)
        allowed = rng.choice(ids, 900, replace=False)
        assert_exact(index.search(queries, 10, allow_ids=allowed), exact_allowed(ids, vectors, queries, allowed, 10))


def test_hnsw_graph_walk_with_a_filter_and_unmerged_shards(built: dict[str, Path], toy_snapshot: EmbeddingSnapshot,
                                                          toy_queries: np.ndarray, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ids, vectors, _ = toy_snapshot.read_all()
    queries = toy_queries[:100]
    allowed = np.random.default_rng(8).choice(ids, 1500, replace=False)
    truth = exact_allowed(ids, vectors, queries, allowed, 10)
    merged = VectorIndex.load(built["hnsw"])
    # A per-shard HNSW (merge=False: a faiss.IndexShards) answers a small allowed set by the same exact scan.
    config = replace(TYPE_CONFIGS["hnsw"], merge=False)
    sharded = VectorIndex.load(build_index(toy_snapshot, Queries.unreferenced(toy_queries), tmp_path, config))
    assert len(sharded.manifest["index_files"]) == 3
    for index in (merged, sharded):
        assert_exact(index.search(queries, 10, allow_ids=allowed), truth)
    # Past EXACT_SUBSET_BYTES the graph is walked with the selector at the tuned efSearch.
    monkeypatch.setattr(vector_index, "EXACT_SUBSET_BYTES", 0)
    for index in (merged, sharded):
        found = index.search(queries, 10, allow_ids=allowed)
        assert np.isin(found[0], allowed).all() and recall(found[0], truth[0]) > 0.9


def test_allow_ids_with_exclusion_padding_and_bad_lists(built: dict[str, Path], toy_snapshot: EmbeddingSnapshot,
                                                       toy_queries: np.ndarray) -> None:
    index = VectorIndex.load(built["flat"], verify="size")
    ids, vectors, _ = toy_snapshot.read_all()
    queries = toy_queries[:20]
    allowed = ids[::50]  # 120 ids
    best = index.search(queries, 11, allow_ids=allowed)
    kept = index.search(queries, 10, exclude_ids=best[0][:, 0], allow_ids=allowed)
    np.testing.assert_array_equal(kept[0], best[0][:, 1:])  # the excluded one dropped, still k allowed ones
    few = [int(ids[3]), int(ids[4]), 77]  # two in the catalog
    found_ids, found_scores = index.search(queries, 5, exclude_ids=[int(ids[3])] + [None] * 19, allow_ids=few)
    assert found_ids.shape == (20, 5)
    assert found_ids[0].tolist() == [int(ids[4]), -1, -1, -1, -1] and found_scores[0, 1] == PAD_SCORE
    assert all(sorted(row[:2]) == sorted(few[:2]) and row[2:] == [-1] * 3 for row in found_ids[1:].tolist())
    for nothing in ([], np.array([], np.int64), [77, 88]):  # empty, or no id of the catalog: no results
        found_ids, _ = index.search(queries, 5, allow_ids=nothing)
        assert found_ids.shape == (20, 5) and (found_ids == -1).all()
        assert all(len(r.ids) == 0 for r in index.results(*index.search(queries, 5, allow_ids=nothing)))
    assert set(index.search(queries, 5, allow_ids=set(few))[0].ravel().tolist()) == {int(ids[3]), int(ids[4]), -1}
    for bad, message in (([[1, 2]], r"allow_ids must be a 1-D sequence of catalog ids, got shape \(1, 2\)"),
                         ([1.5], "allow_ids must hold integer catalog ids, got float64"),
                         (["3"], "allow_ids must hold integer catalog ids, got <U1")):
        with pytest.raises(SearchError, match=message):
            index.search(queries, 5, allow_ids=bad)


def test_overfetch_fallback_keeps_only_allowed_ids(built: dict[str, Path], toy_snapshot: EmbeddingSnapshot,
                                                   toy_queries: np.ndarray) -> None:
    """The path of faiss GPU indexes (no selectors), run on the CPU flat index."""
    index = VectorIndex.load(built["flat"], verify="size")
    ids, vectors, _ = toy_snapshot.read_all()
    queries = toy_queries[:50]
    allowed = np.sort(np.random.default_rng(9).choice(ids, 300, replace=False))
    scores, found = overfetch_allowed(index.index.search, queries, 10, allowed, index.ntotal)
    assert_exact((found, scores), exact_allowed(ids, vectors, queries, allowed, 10))
    # Capped below what a row needs (a GPU's 2048): fewer results, never a disallowed one.
    scores, found = overfetch_allowed(index.index.search, queries, 10, allowed[:3], 64)
    assert np.isin(found, np.append(allowed[:3], -1)).all() and (found == -1).any()


def test_an_index_without_metadata_has_no_fields(built: dict[str, Path]) -> None:
    index = VectorIndex.load(built["ivf_flat"], verify="size")
    assert index.entries.fields == {} and "metadata_fields" not in index.manifest
    first = index.entries.page(0, 1)[0]
    assert first == {"id": first["id"], "uri": f"mem://toys/{first['id']}.png"} == index.entries.item(first["id"])
    with pytest.raises(UnknownFieldError, match="fields: none: the index has no metadata"):
        index.entries.matching_ids({"category": "shoe"})
    assert len(index.entries.matching_ids({})) == index.ntotal

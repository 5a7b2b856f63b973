"""The search service over real HTTP (uvicorn on 127.0.0.1): the same answers as the search library, the item,
health and metrics endpoints, and bad requests that get a clear 4xx without hurting the worker."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from cirflow.indexing.search import Searcher
from cirflow.indexing.service.app import create_app
from cirflow.indexing.service.requests import SearchResponse
from cirflow.indexing.service.state import ServiceConfig, ServiceError
from cirflow.models.images import ImageLimits
from tests.indexing.service_setup import CATALOG, TEXTS, LiveServer, Shop, png
from tests.models.test_tokenizer_preprocess import decompression_bomb_png

K = 8
BODY_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, new_shop: Callable[..., tuple[Shop, Path]]) -> Shop:
    return new_shop(tmp_path_factory.mktemp("service"))[0]


@pytest.fixture(scope="module")
def server(shop: Shop) -> Iterator[LiveServer]:
    config = ServiceConfig(index=shop.indexes, reload_seconds=0, max_body_bytes=BODY_LIMIT,
                           images=ImageLimits(max_pixels=1_000_000), max_text_chars=200, max_ids=50, max_k=30)
    with LiveServer(create_app(config)) as live:
        yield live


@pytest.fixture(scope="module")
def library(shop: Shop) -> Searcher:
    return shop.searcher()


def post(server: LiveServer, body: dict[str, Any] | None = None, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/search", json=body, timeout=30, **kwargs) if body is not None else \
        httpx.post(f"{server.url}/search", timeout=30, **kwargs)


def ranked(response: httpx.Response) -> tuple[list[int], np.ndarray]:
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    return [int(r["id"]) for r in results], np.array([r["score"] for r in results], np.float32)


def assert_same(response: httpx.Response, ids: np.ndarray, scores: np.ndarray) -> None:
    got_ids, got_scores = ranked(response)
    assert got_ids == [int(i) for i in ids]
    np.testing.assert_allclose(got_scores, scores, atol=1e-6)


# --- the same answers as the search library ------------------------------------------------------------------

@pytest.mark.parametrize("how", ["base64", "upload"])
def test_composed_query_returns_what_the_search_library_returns(server: LiveServer, shop: Shop, library: Searcher,
                                                                how: str) -> None:
    image = shop.images[1004]
    for text in TEXTS:
        expected = library.search(image, text, k=K)
        if how == "base64":
            response = post(server, {"image_base64": base64.b64encode(image).decode(), "text": text, "k": K})
        else:
            response = post(server, files={"image": ("ref.png", image, "image/png")}, data={"text": text, "k": K})
        assert_same(response, expected.ids, expected.scores)
        body = response.json()
        assert body["mode"] == "composed" and "changed by the text" in body["answers"]
        index = library.index
        assert (body["bundle_id"], body["index_id"], body["catalog"]) == (index.bundle_id,
                                                                           index.manifest["index_id"], CATALOG)
        assert set(body["took_ms"]) == {"total", "decode", "encode", "search"} and body["took_ms"]["total"] > 0
        hit = body["results"][0]
        assert hit["uri"] == expected.uris[0] and hit["image"] == f"/items/{hit['id']}/image"


def test_the_search_answer_is_the_documented_model(server: LiveServer, shop: Shop) -> None:
    """POST /search hands FastAPI its JSON ready-made, which FastAPI sends as it is (no check against response_model):
    the body must still be a SearchResponse, sent as JSON, and the schema must still say so."""
    response = post(server, {"image_base64": base64.b64encode(shop.images[1004]).decode(), "text": TEXTS[0], "k": K})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    answer = SearchResponse.model_validate_json(response.content, strict=True)
    # Fields a request without a re-rank leaves out (rerank_n, took_ms.rerank) are absent, not null.
    assert answer.model_dump(mode="json", exclude_none=True) == response.json() and len(answer.results) == K
    assert "rerank_n" not in response.json() and "rerank" not in response.json()["took_ms"]
    schema = httpx.get(f"{server.url}/openapi.json").json()
    documented = schema["paths"]["/search"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert documented == {"$ref": "#/components/schemas/SearchResponse"}


def test_image_only_and_text_only_queries_return_what_the_library_returns(server: LiveServer, shop: Shop,
                                                                          library: Searcher) -> None:
    image, runtime = shop.images[1010], library.runtime
    expected = library.search_vectors(runtime.embed_images([image]), k=K)[0]
    response = post(server, {"image_base64": base64.b64encode(image).decode(), "k": K})
    assert_same(response, expected.ids, expected.scores)
    assert response.json()["mode"] == "image-only"
    assert int(response.json()["results"][0]["id"]) == 1010  # its own catalog vector is the nearest

    expected = library.search_vectors(runtime.embed_texts(["a red bag"]), k=K)[0]
    response = post(server, {"text": "a red bag", "k": K})
    assert_same(response, expected.ids, expected.scores)
    assert response.json()["mode"] == "text-only" and "baseline" in response.json()["answers"]


def test_reference_id_uses_the_catalog_image_and_leaves_it_out(server: LiveServer, shop: Shop,
                                                               library: Searcher) -> None:
    expected = library.search(shop.images[1007], "make it red", k=K, exclude_id=1007)
    response = post(server, {"reference_id": "1007", "text": "make it red", "k": K})
    assert_same(response, expected.ids, expected.scores)
    kept = post(server, {"reference_id": 1007, "k": 1, "exclude_reference": False})
    assert ranked(kept)[0] == [1007]


def test_exclude_allow_and_metadata_filter(server: LiveServer, shop: Shop, library: Searcher) -> None:
    image = base64.b64encode(shop.images[1001]).decode()
    vector = library.runtime.embed_queries([shop.images[1001]], ["make it red"])
    everything = library.search_vectors(vector, k=len(shop.images))[0]
    order = [int(i) for i in everything.ids]

    excluded = order[:3]
    response = post(server, {"image_base64": image, "text": "make it red", "k": K, "exclude_ids": excluded})
    assert ranked(response)[0] == order[3:3 + K]

    allowed = order[10:20:2]
    response = post(server, {"image_base64": image, "text": "make it red", "k": K, "allow_ids": allowed[::-1]})
    assert ranked(response)[0] == allowed  # fewer than k allowed: all of them, best first

    shoes = [i for i in order if shop.categories[i] == "shoe"]
    response = post(server, {"image_base64": image, "text": "make it red", "k": K, "filter": {"category": "shoe"}})
    assert ranked(response)[0] == shoes[:K]
    response = post(server, {"image_base64": image, "text": "make it red", "k": K,
                             "filter": {"category": ["shoe", "bag"]}, "exclude_ids": [shoes[0]]})
    assert ranked(response)[0] == [i for i in order if shop.categories[i] != "hat" and i != shoes[0]][:K]
    form = post(server, files={"image": ("r.png", shop.images[1001], "image/png")},
                data={"text": "make it red", "k": str(K), "filter": '{"category": "shoe"}',
                      "exclude_ids": f"{shoes[0]}, {shoes[1]}"})
    assert ranked(form)[0] == shoes[2:2 + K]


# --- items, health, metrics, schema ----------------------------------------------------------------------------

def test_items_and_their_images(server: LiveServer, shop: Shop) -> None:
    item = httpx.get(f"{server.url}/items/1005").json()
    assert item["id"] == "1005" and item["category"] == shop.categories[1005]
    assert item["uri"].endswith("item 005.png") and item["image"] == "/items/1005/image"
    image = httpx.get(f"{server.url}/items/1005/image")
    assert image.status_code == 200 and image.content == shop.images[1005]
    assert image.headers["content-type"] == "image/png"
    last = len(shop.images) - 4
    page = httpx.get(f"{server.url}/items", params={"offset": last, "limit": 10}).json()
    assert page["total"] == len(shop.images) and [i["id"] for i in page["items"]] == [str(1000 + last + i)
                                                                                      for i in range(4)]
    for path, status, message in [("/items/99", 404, "99"), ("/items/abc", 422, "'abc' is not an integer"),
                                  ("/items/99/image", 404, "99"), ("/items?limit=0", 422, "limit"),
                                  ("/items?offset=-1", 422, "offset")]:
        response = httpx.get(server.url + path)
        assert response.status_code == status and message in response.json()["detail"], (path, response.text)


def test_health_readiness_info_metrics_and_schema(server: LiveServer, shop: Shop, library: Searcher) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "alive"}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready == {"ready": True, "index_id": library.index.manifest["index_id"],
                     "bundle_id": library.index.bundle_id}
    info = httpx.get(f"{server.url}/api/info").json()
    assert info["vectors"] == len(shop.images) and info["metadata_fields"] == {"category": "string"}
    assert set(info["modes"]) == {"composed", "image-only", "text-only"} and info["limits"]["max_k"] == 30
    post(server, {"text": "a hat", "k": 3})
    post(server, {"k": 3})  # a 422
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'cirflow_requests_total{method="POST",outcome="ok",route="/search",status="200"}' in metrics
    assert 'outcome="client_error",route="/search",status="422"' in metrics
    assert f"cirflow_index_vectors {float(len(shop.images))}" in metrics
    assert f'cirflow_version_info{{bundle_id="{library.index.bundle_id}",catalog="{CATALOG}"' in metrics
    assert 'cirflow_request_seconds_bucket{le="0.1",route="/search"}' in metrics
    assert "cirflow_search_stage_seconds_count" in metrics and "cirflow_ready 1.0" in metrics
    schema = httpx.get(f"{server.url}/openapi.json").json()
    body = schema["paths"]["/search"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "image_base64" in body["application/json"]["schema"]["properties"]
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "cirflow" in page.text
    assert httpx.get(f"{server.url}/page/app.js").status_code == 200


# --- bad requests: a clear 4xx, and the worker keeps serving ---------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def huge_png() -> bytes:
    """A real 1100 x 1000 PNG: 1.1 MP, over the test service's 1 MP limit, small in bytes (one colour)."""
    return png(np.zeros((1000, 1100, 3), np.uint8))


BAD_JSON = [
    ({}, 422, "no query: give a reference image"),
    ({"image_base64": "not base64!!"}, 422, "image_base64: not valid base64"),
    ({"image_base64": _b64(b"these bytes are no image")}, 422, "image: cannot decode (not a recognised image format)"),
    ({"image_base64": _b64(b"")}, 422, "image: the uploaded image is empty"),
    ({"image_base64": _b64(decompression_bomb_png())}, 413, "image: too large to decode"),
    ({"text": ""}, 422, "text: empty"),
    ({"text": "   "}, 422, "text: empty"),
    ({"text": "x" * 201}, 422, "text: 201 characters, over this service's limit of 200"),
    ({"text": "a hat", "k": 0}, 422, "k: must be between 1 and 30, got 0"),
    ({"text": "a hat", "k": 31}, 422, "k: must be between 1 and 30, got 31"),
    ({"text": "a hat", "k": -5}, 422, "k: must be between 1 and 30, got -5"),
    ({"text": "a hat", "k": "ten"}, 422, "k: expected an integer, got 'ten'"),
    ({"text": "a hat", "reference_id": 5}, 404, "reference_id: 1 id(s) not in catalog toys"),
    ({"text": "a hat", "exclude_ids": [1001, 77, 78]}, 422, "exclude_ids: 2 id(s) not in catalog toys"),
    ({"text": "a hat", "allow_ids": [-1]}, 422, "allow_ids.0: catalog ids lie in 0..2**63-1, got -1"),
    ({"text": "a hat", "allow_ids": ["12abc"]}, 422, "allow_ids.0: a catalog id is an integer or a decimal string"),
    ({"text": "a hat", "allow_ids": list(range(1000, 1051))}, 422, "allow_ids: 51 ids, over this service's limit"),
    ({"text": "a hat", "filter": {"colour": "red"}}, 422, "filter: "),
    ({"text": "a hat", "filter": {"category": {"a": 1}}}, 422, "filter.category"),
    ({"text": "a hat", "klass": 3}, 422, "klass: Extra inputs are not permitted (not a field of this request)"),
    ({"image_base64": _b64(b"x"), "reference_id": 1001}, 422, "reference_id or an image, not both"),
]


@pytest.mark.parametrize("body, status, message", BAD_JSON, ids=[m for _, _, m in BAD_JSON])
def test_bad_json_requests_get_a_clear_4xx(server: LiveServer, body: dict[str, Any], status: int,
                                           message: str) -> None:
    response = post(server, body)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_unknown_filter_field_names_the_field_and_the_known_ones(server: LiveServer) -> None:
    detail = post(server, {"text": "a hat", "filter": {"colour": "red"}}).json()["detail"]
    assert "colour" in detail and "category" in detail


def test_bad_bodies_get_a_clear_4xx(server: LiveServer, shop: Shop) -> None:
    cases = [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (dict(content=b"", headers={"content-type": "application/json"}), 400, "the request body is empty"),
        (dict(content=b"text=hat", headers={"content-type": "text/plain"}), 415,
         "send application/json"),
        (dict(content=b"hat"), 415, "content type 'missing'"),
        (dict(json={"text": "a hat", "image_base64": _b64(huge_png())}), 413, "1100x1000 = 1100000 pixels, over the limit of 1000000"),
        (dict(files={"image": ("r.png", shop.images[1001], "image/png")},
              data={"image_base64": _b64(shop.images[1001])}), 422, "an uploaded file or image_base64, not both"),
        (dict(files={"photo": ("r.png", shop.images[1001], "image/png")}), 422, "photo: only one file, named `image`"),
        (dict(files={"image": ("r.png", b"", "image/png")}), 422, "the uploaded image is empty"),
        (dict(files={"image": ("r.png", shop.images[1001], "image/png")}, data={"filter": "{oops"}), 422,
         "filter: not valid JSON"),
        (dict(files={"image": ("r.png", shop.images[1001], "image/png")}, data={"exclude_ids": "1001,x"}), 422,
         "exclude_ids.1: a catalog id is an integer"),
        (dict(content=b"x" * (BODY_LIMIT + 1), headers={"content-type": "application/json"}), 413,
         f"over this service's limit of {BODY_LIMIT:,} bytes"),
        (dict(content=iter([b"x" * 100_000] * 4), headers={"content-type": "application/json"}), 413,
         "over this service's limit"),  # chunked: no Content-Length, counted as it arrives
        (dict(files={"image": ("big.png", b"\x89PNG" + b"0" * BODY_LIMIT, "image/png")}), 413,
         "over this service's limit"),
    ]
    for kwargs, status, message in cases:
        response = post(server, **kwargs)
        assert response.status_code == status, (message, response.text)
        assert message in response.json()["detail"], (message, response.text)
    metrics = httpx.get(f"{server.url}/metrics").text  # refused before routing, still counted under its route
    assert 'cirflow_requests_total{method="POST",outcome="client_error",route="/search",status="413"}' in metrics


def test_a_truncated_image_that_passes_the_header_check_is_a_422(server: LiveServer, shop: Shop) -> None:
    cut = shop.images[1001][: len(shop.images[1001]) // 2]
    response = post(server, {"image_base64": _b64(cut), "text": "make it red"})
    assert response.status_code == 422 and response.json()["detail"].startswith("image: cannot decode")
    # The upload is decoded with the other checks of the request, before its ids are looked up.
    response = post(server, {"image_base64": _b64(cut), "text": "make it red", "exclude_ids": [77]})
    assert response.status_code == 422 and response.json()["detail"].startswith("image: cannot decode")


def test_an_upload_is_opened_once(server: LiveServer, shop: Shop, monkeypatch: pytest.MonkeyPatch) -> None:
    """The image gate checks an upload's header and decodes it in one pass (each opening costs ~0.1 ms)."""
    opened = []
    real_open = Image.open

    def counted(*args: Any, **kwargs: Any) -> Image.Image:
        opened.append(args)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counted)
    response = post(server, {"image_base64": _b64(shop.images[1004]), "text": TEXTS[0], "k": K})
    assert response.status_code == 200 and len(opened) == 1


def test_the_worker_serves_on_after_every_bad_request(server: LiveServer, shop: Shop, library: Searcher) -> None:
    for body, _, _ in BAD_JSON:
        post(server, body)
    expected = library.search(shop.images[1002], "make it red", k=K)
    assert_same(post(server, {"image_base64": _b64(shop.images[1002]), "text": "make it red", "k": K}),
                expected.ids, expected.scores)
    assert httpx.get(f"{server.url}/healthz").status_code == 200


# --- start-up -------------------------------------------------------------------------------------------------

def test_a_missing_bundle_or_index_is_a_clear_error_before_serving(shop: Shop, tmp_path: Path) -> None:
    from cirflow.indexing.search.index_store import IndexFormatError
    from cirflow.indexing.service.app import serve

    with pytest.raises(IndexFormatError, match="neither an index directory"):
        serve(ServiceConfig(index=tmp_path / "nowhere"))
    with pytest.raises(ServiceError, match=r"which no bundle under .* is; export it there, or pass --bundle"):
        serve(ServiceConfig(index=shop.indexes, bundle=tmp_path))
    with pytest.raises(ServiceError, match="^max_k must be positive, got 0$"):
        ServiceConfig(index=shop.indexes, max_k=0)


def test_a_failed_first_load_is_reported_by_health_and_readiness(tmp_path: Path) -> None:
    """The port opens before the load (probes must answer); a load that fails says why, and liveness fails so
    that an orchestrator restarts the process."""
    broken = tmp_path / "indexes" / CATALOG
    broken.mkdir(parents=True)
    (broken / "CURRENT").write_text("gone\n")
    with LiveServer(create_app(ServiceConfig(index=broken, reload_seconds=0)), wait_ready=False) as live:
        deadline = time.monotonic() + 30
        while httpx.get(f"{live.url}/healthz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        health, ready = httpx.get(f"{live.url}/healthz"), httpx.get(f"{live.url}/readyz")
        assert health.status_code == 503 and "cannot load" in health.json()["detail"]
        assert ready.status_code == 503 and "gone" in ready.json()["detail"]
        response = post(live, {"text": "a hat"})
        assert response.status_code == 503 and "not ready: cannot load" in response.json()["detail"]


def test_openapi_lists_every_endpoint(server: LiveServer) -> None:
    paths = set(json.loads(httpx.get(f"{server.url}/openapi.json").text)["paths"])
    assert {"/search", "/items", "/items/{item_id}", "/items/{item_id}/image", "/api/info", "/healthz", "/readyz",
            "/metrics"} <= paths

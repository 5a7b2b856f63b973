"""The search service as a hardened origin (real HTTP on 127.0.0.1): images served as the format they decoded
as, security headers on every response, an item re-checked before it is served, the optional API key, the
offline docs, strict request fields, and a fuzz of malformed uploads that never gets a 500."""

from __future__ import annotations

import base64
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from cirflow.indexing.service.app import create_app
from cirflow.indexing.service.security import API_KEY_ENV, ApiKeyError, read_api_key
from cirflow.indexing.service.state import ServiceConfig, ServiceError
from cirflow.models.images import DEFAULT_FORMATS
from tests.bench.scripts import load_bench_script
from tests.indexing.conftest import XSS_ID
from tests.indexing.service_setup import LiveServer, Shop

KEY = "k3y-for-tests-0123456789abcdef"


@pytest.fixture(scope="module")
def server(hostile_shop: Shop) -> Iterator[LiveServer]:
    with LiveServer(create_app(ServiceConfig(index=hostile_shop.indexes, reload_seconds=0))) as live:
        yield live


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _assert_hardened(response: httpx.Response) -> None:
    assert response.headers["x-content-type-options"] == "nosniff"
    policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    assert policy["script-src"] == "'self'"  # no inline script, no eval, no other host
    assert policy["frame-ancestors"] == "'none'"


def test_an_image_is_served_as_the_format_it_decoded_as_never_by_its_file_name(server: LiveServer,
                                                                                 hostile_shop: Shop) -> None:
    item = httpx.get(f"{server.url}/items/{XSS_ID}", timeout=10).json()
    assert item["uri"].endswith("x.html")
    response = httpx.get(f"{server.url}/items/{XSS_ID}/image", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content == hostile_shop.images[XSS_ID]
    _assert_hardened(response)


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/", None), ("GET", "/healthz", None), ("GET", "/metrics", None), ("GET", "/docs", None),
    ("GET", "/items/12345/image", None), ("GET", "/items/abc", None), ("POST", "/search", b"{"),
    ("POST", "/search", b"x" * (17 * 2**20)), ("GET", "/page/app.js", None)])
def test_every_response_carries_the_security_headers(server: LiveServer, method: str, path: str,
                                                      body: bytes | None) -> None:
    response = httpx.request(method, server.url + path, content=body, timeout=30,
                             headers={"content-type": "application/json"} if body else None)
    _assert_hardened(response)


@pytest.fixture()
def swapped(hostile_shop: Shop) -> Iterator[Path]:
    """Item 1005's file, put back as it was after the test changes it."""
    path = Path(_uri(hostile_shop, 1005))
    saved = path.read_bytes()
    yield path
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    path.write_bytes(saved)


def _uri(shop: Shop, catalog_id: int) -> str:
    import pyarrow.parquet as pq

    table = pq.read_table(shop.catalog_file)
    return table.column("uri").to_pylist()[table.column("id").to_pylist().index(catalog_id)]


@pytest.mark.parametrize("change", ["symlink to /etc/hostname", "another valid png", "a fifo", "a directory",
                                    "removed"])
def test_an_item_whose_file_changed_since_it_was_embedded_is_not_served(server: LiveServer, hostile_shop: Shop,
                                                                        swapped: Path, change: str) -> None:
    swapped.unlink()
    if change == "symlink to /etc/hostname":
        swapped.symlink_to("/etc/hostname")
    elif change == "another valid png":
        swapped.write_bytes(hostile_shop.images[1006])
    elif change == "a fifo":
        os.mkfifo(swapped)
    elif change == "a directory":
        swapped.mkdir()
    start = time.monotonic()
    response = httpx.get(f"{server.url}/items/1005/image", timeout=10)
    assert time.monotonic() - start < 5  # a fifo must not block a request thread
    assert response.status_code == 404, response.text
    assert "item 1005" in response.json()["detail"]
    assert Path("/etc/hostname").read_bytes().strip() not in response.content  # nothing of the file leaks
    as_reference = httpx.post(f"{server.url}/search", json={"reference_id": 1005, "text": "make it red"}, timeout=30)
    assert as_reference.status_code == 422 and "reference_id 1005" in as_reference.json()["detail"]


def test_an_unchanged_item_is_served_again_after_its_file_is_put_back(server: LiveServer, hostile_shop: Shop) -> None:
    response = httpx.get(f"{server.url}/items/1005/image", timeout=10)
    assert response.status_code == 200 and response.content == hostile_shop.images[1005]


def test_the_api_key_guards_search_and_items_and_leaves_the_probes_open(hostile_shop: Shop) -> None:
    config = ServiceConfig(index=hostile_shop.indexes, reload_seconds=0, api_key=KEY)
    assert KEY not in repr(config)
    guarded = [("POST", "/search", {"text": "a red hat"}), ("GET", "/items", None), ("GET", "/items/1001", None),
               ("GET", "/items/1001/image", None), ("GET", "/api/info", None)]
    with LiveServer(create_app(config)) as live:
        for method, path, body in guarded:
            for headers in ({}, {"authorization": "Bearer wrong-key-0123456789"}, {"authorization": KEY},
                            {"authorization": f"Basic {KEY}"}):
                response = httpx.request(method, live.url + path, json=body, headers=headers, timeout=30)
                assert response.status_code == 401, (path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                assert "API key" in response.json()["detail"]
            response = httpx.request(method, live.url + path, json=body, timeout=30,
                                     headers={"authorization": f"Bearer {KEY}"})
            assert response.status_code == 200, (path, response.text)
        for path in ("/healthz", "/readyz", "/metrics", "/", "/docs", "/openapi.json", "/page/app.js"):
            assert httpx.get(live.url + path, timeout=30).status_code == 200, path
        schemes = httpx.get(f"{live.url}/openapi.json", timeout=30).json()["components"]["securitySchemes"]
        assert [s["scheme"] for s in schemes.values()] == ["bearer"]


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path: Path, hostile_shop: Shop) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    assert read_api_key(key_file, {API_KEY_ENV: "ignored-when-a-file-is-given"}) == KEY
    assert read_api_key(None, {API_KEY_ENV: KEY}) == KEY
    assert read_api_key(None, {}) is None
    with pytest.raises(ApiKeyError, match=f"API key file {tmp_path / 'missing'}: cannot read"):
        read_api_key(tmp_path / "missing", {})
    key_file.write_text("short\n")
    with pytest.raises(ApiKeyError, match="at least 16 printable characters"):
        read_api_key(key_file, {})
    with pytest.raises(ServiceError, match="api_key: an API key is at least 16"):
        ServiceConfig(index=hostile_shop.indexes, api_key="has a space in it, so no")


def test_the_api_docs_load_nothing_from_another_host(server: LiveServer) -> None:
    page = httpx.get(f"{server.url}/docs", timeout=10)
    assert page.status_code == 200
    assert "http://" not in page.text and "https://" not in page.text and "<script>" not in page.text
    for asset, kind in (("/docs-assets/swagger-ui-bundle.js", "javascript"), ("/docs-assets/swagger-ui.css", "css"),
                        ("/page/docs.js", "javascript")):
        response = httpx.get(server.url + asset, timeout=10)
        assert response.status_code == 200 and kind in response.headers["content-type"], asset
    assert httpx.get(f"{server.url}/docs-assets/index.html", timeout=10).status_code == 404
    assert httpx.get(f"{server.url}/redoc", timeout=10).status_code == 404


@pytest.mark.parametrize("body, field", [
    ({"text": "a hat", "k": True}, "k"), ({"text": "a hat", "k": 2.5}, "k"), ({"text": "a hat", "k": "ten"}, "k"),
    ({"reference_id": 1001, "exclude_reference": "yes"}, "exclude_reference"),
    ({"reference_id": 1001, "exclude_reference": 1}, "exclude_reference")])
def test_request_fields_are_not_coerced_from_other_types(server: LiveServer, body: dict[str, Any],
                                                        field: str) -> None:
    response = httpx.post(f"{server.url}/search", json=body, timeout=30)
    assert response.status_code == 422 and response.json()["detail"].startswith(field), response.text


def test_form_fields_take_their_words_and_refuse_others(server: LiveServer) -> None:
    ok = httpx.post(f"{server.url}/search", data={"reference_id": "1001", "exclude_reference": "false", "k": "3"},
                    timeout=30)
    assert ok.status_code == 200 and "1001" in [r["id"] for r in ok.json()["results"]]
    bad = httpx.post(f"{server.url}/search", data={"reference_id": "1001", "exclude_reference": "maybe"}, timeout=30)
    assert bad.status_code == 422 and "exclude_reference: expected true or false" in bad.json()["detail"]


def test_base64_wrapped_at_76_characters_is_the_same_image(server: LiveServer, hostile_shop: Shop) -> None:
    flat = _b64(hostile_shop.images[1002])
    wrapped = "\n".join(flat[i:i + 76] for i in range(0, len(flat), 76)) + "\n"
    answers = [httpx.post(f"{server.url}/search", json={"image_base64": b, "text": "make it red", "k": 5},
                          timeout=30) for b in (flat, wrapped, wrapped.replace("\n", "\r\n"))]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert len({tuple(r["id"] for r in a.json()["results"]) for a in answers}) == 1


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL on the mutants' broken TIFF and EXIF tags
def test_fuzzed_uploads_get_an_answer_or_a_4xx_never_a_500(server: LiveServer) -> None:
    """Seeded mutations of small images in every allowed format, as multipart uploads and as base64, within
    about 10 s: each is a 200, a 413 or a 422, and the service stays healthy."""
    fuzz = load_bench_script("fuzz_images")
    deadline = time.monotonic() + 10
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for n, (name, data) in enumerate(fuzz.mutations(11, fuzz.seeds(DEFAULT_FORMATS))):
            if n >= 400 or time.monotonic() > deadline:
                break
            if n % 2:
                response = client.post("/search", files={"image": (name, data)}, data={"text": "make it red"})
            else:
                response = client.post("/search", json={"image_base64": _b64(data), "k": 3})
            assert response.status_code in (200, 413, 422), (name, response.status_code, response.text)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert client.get("/healthz").status_code == 200
    assert sum(statuses.values()) >= 50 and statuses.get(200) and statuses.get(422), statuses

"""Hot reload under a stream of requests: the catalog's CURRENT moves to an index built with another bundle
and a changed catalog; no request fails and every response is wholly one version's answer."""

from __future__ import annotations

import base64
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import httpx
import pyarrow.parquet as pq
import pytest

from cirflow.core.files import publish_current
from cirflow.indexing.service import state as service_state
from cirflow.indexing.service.app import create_app
from cirflow.indexing.service.state import Published, ServiceConfig
from tests.indexing.service_setup import LiveServer, Shop, add_bundle, index_version

TEXT = "make it red"
K = 6
CLIENTS = 4


def _answer(response: httpx.Response) -> tuple[str, str, tuple[str, ...], tuple[float, ...]]:
    body = response.json()
    return (body["index_id"], body["bundle_id"], tuple(r["id"] for r in body["results"]),
            tuple(round(r["score"], 5) for r in body["results"]))


def test_hot_reload_under_load_loses_no_request_and_mixes_no_versions(
        tmp_path: Path, new_shop: Callable[..., tuple[Shop, Path]], service_bundles: Callable[[int], Path]) -> None:
    shop, first = new_shop(tmp_path)
    reference = shop.images[1003]
    query = {"image_base64": base64.b64encode(reference).decode(), "text": TEXT, "k": K}

    # Version 2: another bundle (other weights, other bundle_id) over a catalog that lost its first 6 items.
    catalog = pq.read_table(shop.catalog_file)
    pq.write_table(catalog.slice(6), shop.catalog_file)
    second = index_version(shop, add_bundle(shop.workdir, service_bundles(1)), publish_it=False)
    publish_current(first)  # serve version 1 first

    expected = {}
    for version in (first, second):
        publish_current(version)
        expected_searcher = shop.searcher()
        result = expected_searcher.search(reference, TEXT, k=K)
        expected[version.name] = (version.name, expected_searcher.index.bundle_id,
                                  tuple(str(i) for i in result.ids), tuple(round(float(s), 5) for s in result.scores))
    publish_current(first)
    assert expected[first.name][1] != expected[second.name][1]  # the bundle changes with the index
    assert expected[first.name][2] != expected[second.name][2]

    config = ServiceConfig(index=shop.indexes, reload_seconds=0.05, workers=4)
    app = create_app(config)
    stop = threading.Event()
    answers: list[tuple[int, tuple | str]] = []

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                response = http.post(f"{live.url}/search", json=query)
                answers.append((response.status_code, _answer(response) if response.status_code == 200
                                else response.text))

    with LiveServer(app) as live:
        with ThreadPoolExecutor(CLIENTS) as pool:
            for _ in range(CLIENTS):
                pool.submit(client)
            time.sleep(1.0)
            before = len(answers)
            publish_current(second)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and app.state.published.version.index_id != second.name:
                time.sleep(0.02)
            time.sleep(1.0)
            stop.set()
        metrics = httpx.get(f"{live.url}/metrics").text

    assert before > 0 and len(answers) > before
    failures = [a for a in answers if a[0] != 200]
    assert failures == []
    seen = {a[1][0] for a in answers}
    assert seen == {first.name, second.name}
    for _, answer in answers:
        assert answer == expected[answer[0]]  # ids, scores and bundle all of the version that answered
    switch = [a[1][0] for a in answers]
    assert switch.index(second.name) > 0 and switch[-1] == second.name
    assert 'cirflow_reloads_total{outcome="ok"} 1.0' in metrics


def test_a_version_that_fails_to_load_keeps_the_old_one_serving(
        tmp_path: Path, new_shop: Callable[..., tuple[Shop, Path]]) -> None:
    shop, first = new_shop(tmp_path, count=24)
    broken = first.parent / "broken-version"
    shutil.copytree(first, broken)
    (broken / "index.faiss").write_bytes(b"damaged")
    app = create_app(ServiceConfig(index=shop.indexes, reload_seconds=0.05))
    with LiveServer(app) as live:
        publish_current(broken)
        deadline = time.monotonic() + 30
        while app.state.published.reloads["failed"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        response = httpx.post(f"{live.url}/search", json={"text": TEXT, "k": 3})
        assert response.status_code == 200 and response.json()["index_id"] == first.name
        assert "index.faiss" in app.state.published.last_error
        assert httpx.get(f"{live.url}/readyz").status_code == 200
        metrics = httpx.get(f"{live.url}/metrics").text
        assert 'cirflow_reloads_total{outcome="failed"}' in metrics


def test_a_failed_version_is_loaded_once_until_current_moves_or_its_files_change(
        tmp_path: Path, new_shop: Callable[..., tuple[Shop, Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    shop, first = new_shop(tmp_path, count=24)
    broken = first.parent / "broken-version"
    shutil.copytree(first, broken)
    (broken / "index.faiss").write_bytes(b"damaged")  # the manifest still lists the good file's size and sha256
    published = Published(ServiceConfig(index=shop.indexes, reload_seconds=0.05))
    published.load()
    loads: list[Path] = []
    load_version = service_state.load_version

    def counted(config: ServiceConfig, index_dir: Path, previous: service_state.Version | None = None,
                open_index: service_state.OpenIndex | None = None) -> service_state.Version:
        loads.append(index_dir)
        return load_version(config, index_dir, previous, open_index)

    monkeypatch.setattr(service_state, "load_version", counted)
    publish_current(broken)
    for _ in range(5):  # the watcher's polls
        assert published.check() is False
    assert loads == [broken]  # one load (one sha256 pass over the files), not one per poll
    assert published.reloads == {"ok": 0, "failed": 1} and "index.faiss" in published.last_error

    publish_current(first)  # CURRENT moves back to the served version, then to the broken one again: tried again
    assert published.check() is False and len(loads) == 1
    publish_current(broken)
    assert published.check() is False and published.check() is False
    assert len(loads) == 2 and published.reloads["failed"] == 2

    shutil.copyfile(first / "index.faiss", broken / "index.faiss")  # repaired in place (a copy that finished)
    assert published.check() is True and len(loads) == 3
    assert published.version.index.index_dir == broken and published.reloads["ok"] == 1
    assert published.last_error is None


def test_one_index_version_or_reload_off_is_never_swapped(
        tmp_path: Path, new_shop: Callable[..., tuple[Shop, Path]]) -> None:
    shop, first = new_shop(tmp_path, count=24)
    app = create_app(ServiceConfig(index=first, reload_seconds=0.05))  # one version: nothing to watch
    with LiveServer(app) as live:
        assert app.state.published.watching is False
        assert httpx.get(f"{live.url}/readyz").json()["index_id"] == first.name
    app = create_app(ServiceConfig(index=shop.indexes, reload_seconds=0))
    with LiveServer(app):
        assert app.state.published._thread is None

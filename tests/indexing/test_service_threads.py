"""The service's request threads: each searches with one FAISS (OpenMP) thread, and searches of a GPU index take
turns while CPU ones run side by side (there is no GPU here: the loaded index's on_gpu flag is forced)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import faiss
import httpx
import pytest

from cirflow.indexing.search import VectorIndex
from cirflow.indexing.service.app import create_app
from cirflow.indexing.service.state import ServiceConfig
from tests.indexing.service_setup import LiveServer, Shop

WORKERS = 3
HOLD = 0.2  # seconds each spied search holds its thread, so that requests sent together would overlap
REPO = Path(__file__).resolve().parents[2]


class SearchSpy:
    """Stands in for a loaded index's `search` (an instance attribute shadows the method): records the thread
    and OpenMP thread count of each call and the most calls that ran at once. Each call holds its thread HOLD
    seconds, or with `meet`, until that many calls are in at once (a search that cannot overlap fails)."""

    def __init__(self, index: VectorIndex, meet: int = 0) -> None:
        self.index = index
        self.meet = threading.Barrier(meet, timeout=30) if meet else None
        self.lock = threading.Lock()
        self.active = self.most = 0
        self.threads: dict[str, int] = {}  # request thread name -> faiss.omp_get_max_threads() there

    def __enter__(self) -> SearchSpy:
        self.index.search = self  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.index.search

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
            self.threads[threading.current_thread().name] = faiss.omp_get_max_threads()
        try:
            if self.meet is not None:
                self.meet.wait()
            else:
                time.sleep(HOLD)
            return VectorIndex.search(self.index, *args, **kwargs)
        finally:
            with self.lock:
                self.active -= 1


def send_together(url: str, count: int) -> list[int]:
    """POST `count` text-only searches at once; their status codes."""
    def one(_: int) -> int:
        return httpx.post(f"{url}/search", json={"text": "make it red", "k": 3}, timeout=60).status_code

    with ThreadPoolExecutor(count) as clients:
        return list(clients.map(one, range(count)))


def faiss_threads_of_requests(index: Path) -> dict[str, int]:
    """Request thread -> its OpenMP thread count, over WORKERS searches sent at once to a new service on `index`
    (run by the test in a process of its own when this one's default is already one thread)."""
    app = create_app(ServiceConfig(index=index, reload_seconds=0, workers=WORKERS))
    with LiveServer(app) as live, SearchSpy(app.state.published.version.index) as spy:
        assert send_together(live.url, WORKERS) == [200] * WORKERS
    return spy.threads


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, new_shop: Callable[..., tuple[Shop, Path]]) -> Shop:
    return new_shop(tmp_path_factory.mktemp("threads"), count=24)[0]


@pytest.fixture(scope="module")
def server(shop: Shop) -> Iterator[tuple[LiveServer, Any]]:
    app = create_app(ServiceConfig(index=shop.indexes, reload_seconds=0, workers=WORKERS))
    with LiveServer(app) as live:
        yield live, app


def openmp_default() -> int:
    """The OpenMP thread count a new thread starts with (OMP_NUM_THREADS, else one per core)."""
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(faiss.omp_get_max_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_every_request_thread_searches_with_one_faiss_thread(shop: Shop) -> None:
    if openmp_default() > 1:
        threads = faiss_threads_of_requests(shop.indexes)
    else:  # OMP_NUM_THREADS=1 or one core: new threads start with one anyway; a process told 2 shows the setting
        code = ("import json; from pathlib import Path; from tests.indexing.test_service_threads import "
                f"faiss_threads_of_requests as f; print(json.dumps(f(Path({str(shop.indexes)!r}))))")
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert done.returncode == 0, done.stderr
        threads = json.loads(done.stdout.splitlines()[-1])
    assert threads and all(name.startswith("cirflow-search") for name in threads)  # the app's request threads
    assert set(threads.values()) == {1}, threads


@pytest.mark.parametrize("on_gpu", [True, False], ids=["gpu", "cpu"])
def test_gpu_searches_take_turns_and_cpu_searches_overlap(server: tuple[LiveServer, Any], on_gpu: bool) -> None:
    live, app = server
    version = app.state.published.version
    index = version.index
    index.on_gpu = on_gpu  # a CPU flat index searches the same either way; the flag decides the lock
    try:
        with SearchSpy(index, meet=0 if on_gpu else WORKERS) as spy:  # on CPU, all WORKERS must search at once
            assert send_together(live.url, WORKERS) == [200] * WORKERS
    finally:
        index.on_gpu = False
    if on_gpu:
        assert spy.threads and spy.most == 1  # one at a time, whichever request threads they came from
    else:
        assert len(spy.threads) == spy.most == WORKERS  # all at once, each in a request thread of its own
    assert not version.search_lock.locked()

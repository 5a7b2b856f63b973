"""A sharded version served on Ray Serve across a simulated three-node cluster (ray.cluster_utils.Cluster, all on
127.0.0.1): a deployment per shard and a front. The front answers as the library does over the single index,
one version across every shard through a switch under load, and when a shard replica is SIGKILLed mid-stream
every answer is either whole or flagged partial with the missing shard named; Serve replaces the replica, and
the front's metrics count the retries and partial answers."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from cirflow.core.ray_local import _single_machine_mode
from cirflow.export.runtime import BundleRuntime
from cirflow.indexing.embedding.shards import open_snapshot
from cirflow.indexing.index.plan import IndexConfig
from cirflow.indexing.index.queries import Queries
from cirflow.indexing.index.sharded import build_sharded_index
from cirflow.indexing.index.versions import publish
from cirflow.indexing.search import Searcher, load_index
from cirflow.indexing.search.entries import SearchError
from cirflow.indexing.search.index_store import read_manifest
from cirflow.indexing.search.sharded import FanoutStats
from cirflow.indexing.service.app import create_app
from cirflow.indexing.service.ray_shards import RemoteShards, ShardServer
from cirflow.indexing.service.state import Published, ServiceConfig
from tests.indexing.service_setup import TEXTS, LiveServer, Shop, free_socket

K = 5


@pytest.fixture(scope="module")
def sharded_shop(new_shop: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Shop, Path, Path, Path]:
    """(shop, its single flat version, a sharded flat version of the same snapshot (published), and a second
    sharded version of it, HNSW, for the switch)."""
    shop, single = new_shop(tmp_path_factory.mktemp("sharded-serve"))
    run = open_snapshot(read_manifest(single)["embeddings"]["snapshot_dir"])
    runtime = BundleRuntime.load(shop.workdir / "bundles" / "tiny-0", providers="cpu")
    some = list(shop.images.values())[:12]
    queries = Queries.unreferenced(runtime.embed_queries(some, [TEXTS[i % len(TEXTS)] for i in range(len(some))]))
    flat = build_sharded_index(run, queries, shop.workdir / "indexes", IndexConfig(index_type="flat"), shards=2)
    graph = build_sharded_index(run, queries, shop.workdir / "indexes",
                                IndexConfig(index_type="hnsw", hnsw_m=8, recall_target=0.5), shards=2)
    publish(flat)
    return shop, single, flat, graph


@pytest.fixture(scope="module")
def serve_cluster() -> Iterator[int]:
    """A head and two worker nodes; Serve's HTTP proxy on the head, on a free loopback port."""
    from ray import serve

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    with _single_machine_mode():
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
        for _ in range(2):
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray.init(address=cluster.address, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def body(shop: Shop, item: int, text: str) -> dict[str, Any]:
    return {"image_base64": base64.b64encode(shop.images[item]).decode(), "text": text, "k": K}


def ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} was not ready within {timeout} s")


class Stream:
    """A client thread sending searches one after another until stopped, keeping every answer."""

    def __init__(self, url: str, bodies: list[dict[str, Any]]) -> None:
        self.url, self.bodies, self.answers = url, bodies, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                response = client.post(f"{self.url}/search", json=self.bodies[i % len(self.bodies)])
                self.answers.append((i % len(self.bodies), response.status_code, response.json()))
                i += 1

    def wait_for(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.answers) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.answers) >= count, f"{len(self.answers)} answers in {timeout} s"


class FakeCall:
    """A shard call as a DeploymentResponse answers it (awaited), run in this process."""

    def __init__(self, run: Any) -> None:
        self.run, self.cancelled = run, False

    def result(self, timeout_s: float | None = None) -> Any:
        return self.run()

    def __await__(self) -> Any:
        return self._answer().__await__()

    async def _answer(self) -> Any:
        return self.run()

    def cancel(self) -> None:
        self.cancelled = True


class SlowCall(FakeCall):
    """A shard call that answers after `delay` seconds on the awaiting event loop (a shard on another machine)."""

    def __init__(self, run: Any, delay: float) -> None:
        super().__init__(run)
        self.delay = delay

    async def _answer(self) -> Any:
        await asyncio.sleep(self.delay)
        return self.run()


class FakeShard:
    """A DeploymentHandle of one shard in this process: a real ShardServer, whose searches fail as `failures`
    says (one entry per call, None: answer), each after `delay` seconds."""

    def __init__(self, server: ShardServer, failures: list[Exception | None], delay: float = 0.0) -> None:
        self.server, self.failures = server, failures
        self.prepare = self._method(server.prepare, 0.0)
        self.search = self._method(self._search, delay)

    @staticmethod
    def _method(fn: Any, delay: float) -> Any:
        return type("Method", (), {"remote": staticmethod(lambda *args: SlowCall(lambda: fn(*args), delay))})()

    def _search(self, *args: Any) -> Any:
        failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            raise failure
        return self.server.search(*args)


def test_the_front_retries_a_failed_shard_once_then_answers_partial_or_503(
        sharded_shop: tuple[Shop, Path, Path, Path]) -> None:
    shop, single, flat, _ = sharded_shop
    stats = FanoutStats()
    died = RuntimeError("the replica died")
    failures: list[list[Exception | None]] = [[], []]
    handles = [FakeShard(ShardServer(shop.indexes, part, verify="size"), failures[part]) for part in (0, 1)]
    config = ServiceConfig(index=shop.indexes, reload_seconds=0, providers="cpu")
    app = create_app(config, Published(config, lambda path: RemoteShards(path, handles, 2.0, stats)))
    item = sorted(shop.images)[0]
    with LiveServer(app) as live:
        whole = httpx.post(f"{live.url}/search", json=body(shop, item, TEXTS[0]), timeout=60).json()
        assert whole["partial"] is False and len(whole["results"]) == K and whole["index_id"] == flat.name
        failures[0][:] = [died]  # once: sent again, answered whole
        again = httpx.post(f"{live.url}/search", json=body(shop, item, TEXTS[0]), timeout=60).json()
        assert again["results"] == whole["results"] and again["partial"] is False and stats.retries == {0: 1}
        failures[0][:] = [died, TimeoutError("deadline")]  # twice: the other shard's best, flagged
        partial = httpx.post(f"{live.url}/search", json=body(shop, item, TEXTS[0]), timeout=60).json()
        assert partial["partial"] is True and partial["missing_shards"] == [0]
        shard_1 = set(handles[1].server.index(flat.name).entries.ids.tolist())
        assert partial["results"] and {int(hit["id"]) for hit in partial["results"]} <= shard_1
        from_shard_1 = [hit for hit in whole["results"] if int(hit["id"]) in shard_1]
        assert partial["results"][:len(from_shard_1)] == from_shard_1  # shard 1's best, as the whole ranked them
        failures[0][:], failures[1][:] = [died, died], [died, died]  # no shard at all: 503, not an empty list
        none = httpx.post(f"{live.url}/search", json=body(shop, item, TEXTS[0]), timeout=60)
        assert none.status_code == 503 and "no shard of index" in none.text
        metrics = httpx.get(f"{live.url}/metrics", timeout=30).text
    assert 'cirflow_shard_retries_total{shard="0"} 3.0' in metrics
    assert 'cirflow_shard_retries_total{shard="1"} 1.0' in metrics
    assert "cirflow_partial_answers_total 1.0" in metrics and "cirflow_unavailable_answers_total 1.0" in metrics
    # A bad request is the request's fault: not retried, not partial.
    with pytest.raises(SearchError, match="k must be a positive integer"):
        handles[0].server.search(flat.name, np.zeros((1, 32), np.float32), 0, None, None)
    with pytest.raises(SearchError, match="no index version 'nope'"):
        handles[0].server.index("nope")


def test_the_front_awaits_its_shards_without_holding_a_request_thread(
        sharded_shop: tuple[Shop, Path, Path, Path]) -> None:
    """With one request thread and shards that take 0.5 s, eight concurrent requests are answered in about one
    shard delay, not eight: the thread only encodes; the shard calls are awaited on the event loop."""
    shop, _, flat, _ = sharded_shop
    delay, concurrent = 0.5, 8
    handles = [FakeShard(ShardServer(shop.indexes, part, verify="size"), [], delay) for part in (0, 1)]
    config = ServiceConfig(index=shop.indexes, reload_seconds=0, providers="cpu", workers=1)
    app = create_app(config, Published(config, lambda path: RemoteShards(path, handles, 5.0, FanoutStats())))
    item = sorted(shop.images)[0]
    with LiveServer(app) as live:
        expected = httpx.post(f"{live.url}/search", json=body(shop, item, TEXTS[0]), timeout=60).json()["results"]

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(client.post(f"{live.url}/search", json=body(shop, item, TEXTS[0]))
                                              for _ in range(concurrent)))

        started = time.monotonic()
        answers = asyncio.run(burst())
        took = time.monotonic() - started
    assert [a.status_code for a in answers] == [200] * concurrent
    assert all(a.json()["results"] == expected and a.json()["partial"] is False for a in answers)
    assert took < concurrent * delay / 2, f"{concurrent} requests took {took:.2f} s: the shard waits were serial"


def test_the_sharded_front_answers_as_the_library_switches_whole_and_survives_a_killed_shard(
        sharded_shop: tuple[Shop, Path, Path, Path], serve_cluster: int) -> None:
    from ray import serve

    from cirflow.indexing.service.ray_serve import app_builder

    shop, single, flat, graph = sharded_shop
    url = f"http://127.0.0.1:{serve_cluster}"
    serve.run(app_builder({"index": str(shop.indexes), "providers": "cpu", "reload_seconds": 0.3,
                           "cpus_per_replica": 0.25, "shard_timeout_s": 1.5, "shards": 2}),
              name="search", route_prefix="/")
    ready(url, 180)
    items = sorted(shop.images)[:6]
    bodies = [body(shop, item, TEXTS[i % len(TEXTS)]) for i, item in enumerate(items)]

    # The front's answer is the library's over the single index of the same snapshot (exact: Flat shards).
    library = Searcher.load(single, shop.workdir / "bundles" / "tiny-0", providers="cpu")
    for item_body, item in zip(bodies, items):
        answer = httpx.post(f"{url}/search", json=item_body, timeout=60).json()
        expected = library.search(shop.images[item], item_body["text"], k=K)
        assert [int(hit["id"]) for hit in answer["results"]] == [int(i) for i in expected.ids]
        assert answer["index_id"] == flat.name and answer["partial"] is False and answer["missing_shards"] == []

    # A switch under load: every answer comes from one version, whole, and is that version's own answer.
    per_version = {v.name: Searcher(load_index(v), library.runtime) for v in (flat, graph)}
    with Stream(url, bodies) as stream:
        stream.wait_for(5)
        publish(graph)
        deadline = time.monotonic() + 60
        while not any(a[2].get("index_id") == graph.name for a in stream.answers) and time.monotonic() < deadline:
            time.sleep(0.1)
        stream.wait_for(len(stream.answers) + 5)
    versions = {answer["index_id"] for _, status, answer in stream.answers if status == 200}
    assert versions == {flat.name, graph.name}
    for row, status, answer in stream.answers:
        assert status == 200, answer
        expected = per_version[answer["index_id"]].search(shop.images[items[row]], bodies[row]["text"], k=K)
        assert [int(hit["id"]) for hit in answer["results"]] == [int(i) for i in expected.ids]

    # A shard replica killed mid-stream: whole answers, or partial ones naming it; Serve starts another.
    shard = serve.get_deployment_handle("shard-0", app_name="search")
    victim = shard.pid.remote().result(timeout_s=30)
    with Stream(url, bodies) as stream:
        stream.wait_for(3)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 120
        replaced = None
        while replaced is None and time.monotonic() < deadline:
            try:
                pid = shard.pid.remote().result(timeout_s=5)
                replaced = pid if pid != victim else None
            except Exception:  # no replica yet
                time.sleep(0.5)
        assert replaced is not None, "Serve did not replace the killed shard replica"
        stream.wait_for(len(stream.answers) + 5)
    partial = 0
    for _, status, answer in stream.answers:
        assert status == 200, answer
        if answer["partial"]:
            partial += 1
            assert answer["missing_shards"] == [0] and 0 < len(answer["results"]) <= K
        else:
            assert answer["missing_shards"] == [] and len(answer["results"]) == K
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    assert f"cirflow_partial_answers_total {float(partial)}" in metrics
    retried = [float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith('cirflow_shard_retries_total{shard="0"}')]
    # The one replica of shard 0 was dead until Serve replaced it: requests then were sent again while their
    # deadline allowed, and those that still found none answered partial; the front saw the outage either way.
    assert retried and retried[0] + partial >= 1, (retried, partial)
    assert not [line for line in metrics.splitlines()
                if line.startswith('cirflow_shard_retries_total{shard="1"}') and not line.endswith(" 0.0")]

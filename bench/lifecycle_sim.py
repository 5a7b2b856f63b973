"""A shop that lives through time, for the lifecycle bench (bench/lifecycle.py) and the simulated month in the test
suite (tests/flows/test_lifecycle.py): a catalog manifest over image files that churns every day, a client that
queries the search service all the while, and the check that every answer is the search library's answer for the
version the response names.

    shop = Shop.create(root, pool, size=50, seed=0)     # root/images/<id>.png + root/catalog.parquet
    change = shop.churn(Churn(adds=2, removes=1, overwrites=1, metadata=1, corrupt=1))
    with QueryClient(url, queries) as client: ...         # a thread posting composed queries
    check_answers(client.answers, indexes_dir, bundles_dir)

Nothing here is clever on purpose: it does what a shop and a downstream user do, with a seeded generator.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CATEGORIES = ("hat", "shoe", "bag", "toy")


@dataclass(frozen=True)
class Churn:
    """One day's changes to the catalog (counts)."""

    adds: int = 2
    removes: int = 1
    overwrites: int = 1  # an entry's image replaced by another picture (same id and path)
    metadata: int = 1  # an entry's category changed, its image not
    corrupt: int = 1  # a new entry whose file is not an image (a broken upload)


@dataclass
class Shop:
    """A catalog manifest (id, uri, category) over files in root/images, and the pool new pictures come from."""

    root: Path
    pool: list[Path]  # pictures not yet in the catalog, taken in order
    rng: np.random.Generator
    entries: dict[int, dict[str, str]] = field(default_factory=dict)  # id -> uri, category
    next_id: int = 1000

    @property
    def manifest(self) -> Path:
        return self.root / "catalog.parquet"

    @classmethod
    def create(cls, root: Path, pool: list[Path], size: int, seed: int) -> Shop:
        if len(pool) < size:
            raise ValueError(f"the pool holds {len(pool)} pictures, the shop needs {size} to start")
        shop = cls(Path(root), list(pool), np.random.default_rng(seed))
        (shop.root / "images").mkdir(parents=True, exist_ok=True)
        for _ in range(size):
            shop._add(shop._next_picture().read_bytes())
        shop.write()
        return shop

    def churn(self, churn: Churn) -> dict[str, list[int]]:
        """Apply one day's changes and write the manifest; returns the ids of each kind of change."""
        live = sorted(i for i, e in self.entries.items() if e["kind"] == "image")
        picked = [int(i) for i in self.rng.permutation(live)[:churn.removes + churn.overwrites + churn.metadata]]
        removed = picked[:churn.removes]
        overwritten = picked[churn.removes:churn.removes + churn.overwrites]
        relabelled = picked[churn.removes + churn.overwrites:]
        for i in removed:
            Path(self.entries.pop(i)["uri"]).unlink()
        for i in overwritten:
            _write_atomic(Path(self.entries[i]["uri"]), self._next_picture().read_bytes())
        for i in relabelled:
            current = self.entries[i]["category"]
            self.entries[i]["category"] = CATEGORIES[(CATEGORIES.index(current) + 1) % len(CATEGORIES)]
        added = [self._add(self._next_picture().read_bytes()) for _ in range(churn.adds)]
        corrupt = [self._add(self.rng.bytes(300), kind="corrupt") for _ in range(churn.corrupt)]
        self.write()
        return {"added": added, "removed": removed, "overwritten": overwritten, "relabelled": relabelled,
                "corrupt": corrupt}

    def add_entry(self, data: bytes, uri: Path | None = None) -> int:
        """One more entry (its file written at `uri`, default root/images/<id>.png); the manifest is written."""
        i = self._add(data, uri=uri)
        self.write()
        return i

    def image_ids(self) -> set[int]:
        """The entries that hold a readable picture (the corrupt uploads are the catalog's errors rows)."""
        return {i for i, e in self.entries.items() if e["kind"] == "image"}

    def write(self) -> None:
        ids = sorted(self.entries)
        table = pa.table({"id": pa.array(ids, pa.int64()), "uri": [self.entries[i]["uri"] for i in ids],
                          "category": [self.entries[i]["category"] for i in ids]})
        tmp = self.manifest.with_name(f".{self.manifest.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.manifest)

    def _add(self, data: bytes, kind: str = "image", uri: Path | None = None) -> int:
        i, self.next_id = self.next_id, self.next_id + 1
        path = uri or self.root / "images" / f"{i}.png"
        if uri is None:
            _write_atomic(path, data)
        self.entries[i] = {"uri": str(path), "category": CATEGORIES[i % len(CATEGORIES)], "kind": kind}
        return i

    def _next_picture(self) -> Path:
        if not self.pool:
            raise ValueError("the shop's pool of new pictures is used up")
        return self.pool.pop(0)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Query:
    image: bytes
    text: str


@dataclass(frozen=True)
class Answer:
    query: int  # index into the client's queries
    sent: float  # time.monotonic()
    seconds: float
    status: int
    index_id: str | None = None
    bundle_id: str | None = None
    ids: tuple[int, ...] = ()
    scores: tuple[float, ...] = ()
    error: str | None = None


class QueryClient:
    """A thread that posts the queries round-robin to POST /search until stopped, keeping every answer."""

    def __init__(self, url: str, queries: list[Query], k: int = 5, pause: float = 0.0) -> None:
        self.url, self.queries, self.k, self.pause = url, queries, k, pause
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lifecycle-client", daemon=True)

    def __enter__(self) -> QueryClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        import httpx

        bodies = [{"image_base64": base64.b64encode(q.image).decode(), "text": q.text, "k": self.k}
                  for q in self.queries]
        with httpx.Client(timeout=60) as http:
            n = 0
            while not self._stop.is_set():
                which = n % len(bodies)
                sent = time.monotonic()
                try:
                    response = http.post(f"{self.url}/search", json=bodies[which])
                except Exception as e:  # a refused connection is an answer too: the check counts it
                    self.answers.append(Answer(which, sent, time.monotonic() - sent, 0, error=repr(e)))
                else:
                    self.answers.append(_answer(which, sent, response))
                n += 1
                if self.pause:
                    self._stop.wait(self.pause)


def _answer(which: int, sent: float, response: Any) -> Answer:
    seconds = time.monotonic() - sent
    if response.status_code != 200:
        return Answer(which, sent, seconds, response.status_code, error=response.text[:500])
    body = response.json()
    return Answer(which, sent, seconds, 200, body["index_id"], body["bundle_id"],
                  tuple(int(r["id"]) for r in body["results"]), tuple(float(r["score"]) for r in body["results"]))


def check_answers(answers: list[Answer], queries: list[Query], indexes: Path, bundles: Path, k: int,
                  atol: float = 1e-4) -> int:
    """Assert that every answer is the search library's answer for the (index_id, bundle_id) it names, and that
    none failed; returns how many (index, bundle) versions answered. Each version is loaded once."""
    from cirflow.export.runtime import BundleRuntime
    from cirflow.indexing.search import Searcher, VectorIndex
    from cirflow.indexing.service.state import ServiceConfig, find_bundle

    failed = [a for a in answers if a.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed, e.g. {failed[0]}"
    expected: dict[tuple[str, str, int], tuple[tuple[int, ...], np.ndarray]] = {}
    versions = {(a.index_id, a.bundle_id) for a in answers}
    for index_id, bundle_id in versions:
        index = VectorIndex.load(Path(indexes) / str(index_id), verify="size")
        assert index.bundle_id == bundle_id, (index_id, bundle_id)
        runtime = BundleRuntime.load(find_bundle(ServiceConfig(index=indexes, bundle=bundles), index.index_dir,
                                                 bundle_id), providers="cpu")
        searcher = Searcher(index, runtime)
        for which, query in enumerate(queries):
            result = searcher.search(query.image, query.text, k=k)
            expected[(index_id, bundle_id, which)] = (tuple(int(i) for i in result.ids), result.scores)
    for a in answers:
        ids, scores = expected[(a.index_id, a.bundle_id, a.query)]
        assert a.ids == ids, f"index {a.index_id} / bundle {a.bundle_id}: the service answered {a.ids}, the " \
                             f"library {ids}"
        np.testing.assert_allclose(a.scores, scores, atol=atol)
    return len(versions)

"""The search service under load on loopback: latency and throughput at a few concurrency levels, a hot reload
under load, and the cost of the HTTP service over the search library in-process.

    .venv/bin/python bench/service.py [--bundle DIR] [--data workdir/data/shapes] [--workdir workdir/bench/service]
        [--doc docs/benchmarks.md] [--queries 200] [--requests 1000] [--duration 20] [--workers N] [--ort-threads N]
    .venv/bin/python bench/service.py --quick [--workdir DIR] [--doc PATH]   # ~40 s on 2 cores; numbers meaningless

The first run also exports the bundle, embeds the catalog and builds both indexes; reruns reuse them. Run it on a
quiet machine: the load average at the start is reported.

Setup (cached under --workdir):
- Bundle: the demo's model architecture (flows/demo.py DEMO_MODEL: MiniLM text tower, built-in image tower, combiner)
  with untrained, seeded weights, exported to WORKDIR/bundle. Latency does not depend on training: the same graphs
  run the same operations whatever the weights. --bundle DIR serves a given bundle instead.
- Catalog: the test images of the shapes data (--data, generated when missing; 2,760 PNGs) as a catalog manifest
  (Parquet: id = stable_id(file name), uri, a `category` column cycling over 3 values), embedded with run_embed in
  this process (local_below above the catalog size: no Ray), indexed with build_index (IndexConfig defaults, tuned
  with the val split's composed queries, encoded once and kept in WORKDIR/tune-queries) and published. A second
  version of the same snapshot with index_type=hnsw is built, never published: the reload run switches to it.
- Queries: the first --queries composed queries of the test split (reference image bytes, caption), k = 10, sent as
  JSON {image_base64, text, k}. The references are catalog images; nothing is excluded, on both sides.

Protocol, one step after the other:
1. In-process baseline, in this process before the server starts: Searcher.load(index, bundle) with the library's
   defaults (ONNX Runtime picks its thread count: all cores for one query) and search(image bytes, caption, k=10)
   over the query set, one after the other, after a warm-up of BASELINE_WARMUP queries. Latency per call. Then the
   same with the service's thread settings (the bundle loaded with its ORT threads per request, FAISS on one
   thread): the row the service is compared with, so that the difference is the service's own cost (HTTP, JSON,
   base64, checks, the hop to a request thread), not a thread setting.
2. The service: `cirflow serve --index WORKDIR/indexes/<catalog> --bundle B --host 127.0.0.1 --port <free>
   --reload-seconds 0.5` (plus --workers / --ort-threads when given; else the service's defaults: one request thread
   per core, one ORT thread per request) as a subprocess, its log in WORKDIR/service.log (INFO: one access-log line
   per request, as deployed), ready when GET /readyz answers 200; stopped with SIGTERM at the end, also on failure.
3. Load levels (concurrency 1, 8, 32): the client is this process, asyncio with one keep-alive HTTP/1.1 connection
   per worker (Connection: a minimal client, since httpx's own CPU per request was more than the service overhead
   measured here); N workers take the queries in turn (cycling) and send each as soon as their previous answer came
   back (closed loop). A level runs until --requests requests were sent or --duration seconds passed, whichever
   comes first, after a warm-up of WARMUP_PER_WORKER requests per worker on the same connections. A request's
   latency: from sending to the body read (client side). Errors: non-200 answers and transport errors (a timeout
   after REQUEST_TIMEOUT s included). Seconds: from the first send to the last answer; req/s: answered requests
   (errors included) / seconds. Server p50: the median of the answers' took_ms.total (the server's checks of the
   request, base64 and the image's decode included, + encode + search, without HTTP, JSON and the wait for a request
   thread).
   CPU: the server process's and this process's CPU time over the level (/proc), in cores: the client shares the
   cores with the server, and this says how much it took.
4. Hot reload under load: concurrency 8 with the same bounds; when 1/3 and 2/3 of the run are done (of the requests
   or of the duration, whichever is further, and not before the switch before it showed in the answers), the
   catalog's CURRENT is switched (core.files.publish_current) to the hnsw version and back; the run goes on past its
   bounds until the last switch showed (SWITCH_TIMEOUT_S at most each). Reported: the same numbers, responses per
   index_id, whether every response came from one of the two versions, and for each switch the time until the
   first request sent after it was answered by the new version (the server polls CURRENT every 0.5 s, then loads
   the version beside the served one). The bench exits non-zero (after writing the section) when the reload run had
   an error, a response of another version, or never served the hnsw version.
5. The service's own cost: its p50 at concurrency 1 minus the library's p50 in-process with the service's thread
   settings (ms, and as a ratio), over the same queries; and the ratio to the library with its defaults.

--quick: the tiny model (models/tiny.py make_checkpoint, "sum" composer, TINY_MODEL) and a tiny generated shapes
dataset (QUICK_DATA: 120 test images, 80 queries; or --data), levels 1 and 4 and a reload run at 4, 3 s each; writes to
WORKDIR/service-quick.md unless --doc is given, never to docs/benchmarks.md by default. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import httpx
import numpy as np
import pyarrow as pa
from report import DOC, machine, progress, today, warn_if_busy, write_section

from cirflow.core.files import publish_current, write_json_atomic
from cirflow.export.bundle import export_bundle
from cirflow.export.runtime import BundleRuntime
from cirflow.indexing.embedding.catalog import CatalogConfig, stable_id
from cirflow.indexing.embedding.job import EmbedConfig, run_embed
from cirflow.indexing.embedding.shards import open_snapshot, write_parquet_atomic
from cirflow.indexing.index.build import build_index
from cirflow.indexing.index.plan import IndexConfig
from cirflow.indexing.index.queries import encode_query_split, read_queries, write_queries
from cirflow.indexing.index.versions import publish
from cirflow.indexing.search import Searcher, VectorIndex, index_store
from cirflow.indexing.service.state import ServiceConfig
from cirflow.models.data.loaders import load_split
from cirflow.models.data.shapes import MANIFEST as SHAPES_MANIFEST
from cirflow.models.data.shapes import ShapesConfig, generate_shapes
from cirflow.models.tiny import make_checkpoint

K = 10
LEVELS, QUICK_LEVELS = (1, 8, 32), (1, 4)
RELOAD_CONCURRENCY, QUICK_RELOAD_CONCURRENCY = 8, 4
REQUESTS, DURATION_S, QUICK_DURATION_S = 1000, 20.0, 3.0
QUICK_DATA = ShapesConfig(seed=0, train_triplets=8, val_queries=20, test_queries=80, workers=1)  # 120 test images
CATEGORIES = ("hat", "shoe", "bag")
SECOND_INDEX = IndexConfig(index_type="hnsw")  # another version of the same snapshot, for the reload run
RELOAD_SECONDS = 0.5
SWITCHES = (1 / 3, 2 / 3)
SWITCH_TIMEOUT_S = 60.0  # for a switch to show in the answers; the reload run ends no later
BASELINE_WARMUP = 5  # library calls before timing: session and allocator warm-up
WARMUP_PER_WORKER = 2  # requests per worker before a level: connections opened, server threads warm
WARMUP_MAX_S = 10.0
REQUEST_TIMEOUT = 60.0
READY_TIMEOUT = 300.0  # the MiniLM bundle's sha256 check and session load, on a busy machine
HOST = "127.0.0.1"  # the service listens on loopback only


# --- setup: bundle, catalog, index versions, queries ---------------------------------------------------------

def make_bundle(workdir: Path, quick: bool) -> Path:
    """The exported bundle of an untrained model (module docstring), made once per workdir."""
    bundle = workdir / "bundle"
    if (bundle / "manifest.json").is_file():  # an export lands whole (temp dir, then rename)
        return bundle
    if quick:
        checkpoint = make_checkpoint(workdir / "model.pt", "sum")
    else:
        from cirflow.flows.demo import DEMO_MODEL

        checkpoint = make_checkpoint(workdir / "model.pt", "combiner", tiny=False, overrides=list(DEMO_MODEL))
    return export_bundle(checkpoint, bundle)


def write_catalog(images: Sequence[Path], path: Path) -> Path:
    """A catalog manifest of `images`: id from the file name, absolute uri, a category cycling over CATEGORIES."""
    table = pa.table({"id": pa.array([stable_id(p.name) for p in images], pa.int64()),
                      "uri": [str(p.resolve()) for p in images],
                      "category": [CATEGORIES[i % len(CATEGORIES)] for i in range(len(images))]})
    write_parquet_atomic(table, path)
    return path


@dataclass(frozen=True)
class Setup:
    catalog_dir: Path  # WORKDIR/indexes/<catalog>: its CURRENT is served
    first: Path  # the published version
    second: Path  # the hnsw version of the same snapshot, unpublished
    bundle_id: str
    dim: int
    size: int


def build_versions(bundle: Path, data: Path, workdir: Path) -> Setup:
    """Embed the test images as a catalog, build both index versions and publish the first (cached: reruns find
    the snapshot, the queries file and the indexes, and build nothing)."""
    images = sorted((data / "images" / "test").glob("*.png"))
    if not images:
        raise SystemExit(f"--data {data}: no PNG under images/test (a shapes dataset: cirflow data shapes --out DIR)")
    manifest = write_catalog(images, workdir / "catalog.parquet")
    catalog = CatalogConfig(name=f"{data.name}-service", manifest=str(manifest))
    run = open_snapshot(run_embed(EmbedConfig(catalog=catalog, bundle=str(bundle), workdir=str(workdir),
                                         local_below=10**6)))
    tune_file = workdir / "tune-queries" / f"{run.bundle_id}.parquet"
    if tune_file.is_file():
        tune = read_queries(tune_file, run.bundle_id)
    else:
        tune = encode_query_split(BundleRuntime.load(bundle, providers="cpu"), "shapes", data, "val")
        write_queries(tune_file, tune, run.bundle_id)
    first = build_index(run, tune, workdir / "indexes")
    second = build_index(run, tune, workdir / "indexes", SECOND_INDEX)
    publish(first)
    return Setup(first.parent, first, second, run.bundle_id, run.dim, run.rows)


@dataclass(frozen=True)
class QuerySet:
    images: tuple[bytes, ...]  # reference image bytes
    texts: tuple[str, ...]
    bodies: tuple[bytes, ...]  # POST /search JSON bodies


def load_queries(data: Path, count: int) -> QuerySet:
    """The first `count` composed queries of the test split, with their requests' bodies."""
    split = load_split("shapes", data, "test")
    chosen = split.queries[:count]
    images = tuple(split.images[q.reference].read_bytes() for q in chosen)
    texts = tuple(q.caption for q in chosen)
    bodies = tuple(json.dumps({"image_base64": base64.b64encode(image).decode(), "text": text, "k": K}).encode()
                   for image, text in zip(images, texts))
    return QuerySet(images, texts, bodies)


# --- measuring -----------------------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between the nearest ranks (numpy's default); NaN for
    no values."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


@dataclass(frozen=True)
class Record:
    start: float  # perf_counter when sent
    done: float  # perf_counter when the body was read (or the transport failed)
    status: int  # HTTP status; 0: no response (transport error)
    server_ms: float | None = None  # the answer's took_ms.total
    index_id: str | None = None
    error: str | None = None  # "HTTP 503", "ReadTimeout", ...: None for a good answer

    @property
    def ms(self) -> float:
        return 1000 * (self.done - self.start)


def summarize(records: Sequence[Record], seconds: float) -> dict[str, Any]:
    """A level's numbers: requests, seconds, req/s, client p50 / p99 ms, server p50 ms, errors and their kinds."""
    latencies = [r.ms for r in records]
    server = [r.server_ms for r in records if r.server_ms is not None]
    kinds = Counter(r.error for r in records if r.error is not None)
    return {"requests": len(records), "seconds": seconds, "rps": len(records) / seconds if seconds > 0 else 0.0,
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "server_p50": percentile(server, 50), "errors": sum(kinds.values()), "error_kinds": dict(kinds)}


def baseline(setup: Setup, bundle: Path, queries: QuerySet, ort_threads: int | None = None) -> dict[str, Any]:
    """The library in this process: one search after the other over the query set (module docstring, step 1).
    ort_threads: None for the library's defaults; else the service's settings, that many ORT threads and one
    FAISS thread (restored afterwards)."""
    if ort_threads is None:
        return time_searches(Searcher.load(setup.catalog_dir, bundle), queries)
    searcher = Searcher(VectorIndex.load(setup.catalog_dir),
                        BundleRuntime.load(bundle, intra_op_threads=ort_threads))
    faiss_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return time_searches(searcher, queries)
    finally:
        faiss.omp_set_num_threads(faiss_threads)


def time_searches(searcher: Searcher, queries: QuerySet) -> dict[str, Any]:
    for image, text in zip(queries.images[:BASELINE_WARMUP], queries.texts[:BASELINE_WARMUP]):
        searcher.search(image, text, k=K)
    latencies = []
    started = time.perf_counter()
    for image, text in zip(queries.images, queries.texts):
        before = time.perf_counter()
        searcher.search(image, text, k=K)
        latencies.append(1000 * (time.perf_counter() - before))
    seconds = time.perf_counter() - started
    return {"requests": len(latencies), "seconds": seconds, "rps": len(latencies) / seconds,
            "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "index_type": searcher.index.manifest["type"], "index_id": searcher.index.manifest["index_id"]}


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), from /proc; None where there is no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON bodies: the load levels' client. With httpx this process
    took 1.7 ms of CPU per request on the 2-core bench machine, more than the service overhead it was there to
    measure, and on the same cores; with this, 0.4 ms. It reads what the service sends (a status line, headers, a
    Content-Length body) and treats anything else as an error; a connection that failed is dropped and opened
    again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """(status, body) of one request."""
        if self.streams is None:
            self.streams = await asyncio.open_connection(HOST, self.port)
        reader, writer = self.streams
        try:
            writer.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % (path.encode(), HOST.encode(), self.port, len(body)) + body)
            status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
            if "content-length" not in headers:
                raise ProtocolError(f"HTTP {status} without Content-Length")
            data = await reader.readexactly(int(headers["content-length"]))
        except BaseException:
            self.close()  # whatever was half sent or read, the next request starts on a clean connection
            raise
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, data

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


class ProtocolError(ValueError):
    """An answer the bench's client does not read (see Connection)."""


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """The status and the headers (names in lower case) of a response's head, up to its blank line."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def send(connection: Connection, body: bytes) -> Record:
    start = time.perf_counter()
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            status, data = await connection.post("/search", body)
    except (OSError, EOFError, TimeoutError, asyncio.LimitOverrunError, ProtocolError) as e:
        return Record(start, time.perf_counter(), 0, error=type(e).__name__)
    done = time.perf_counter()
    if status != 200:
        return Record(start, done, status, error=f"HTTP {status}")
    try:
        answer = json.loads(data)
        return Record(start, done, 200, float(answer["took_ms"]["total"]), str(answer["index_id"]))
    except (ValueError, KeyError, TypeError):
        return Record(start, done, 200, error="bad response body")


@dataclass
class Run:
    records: list[Record] = field(default_factory=list)
    seconds: float = 0.0
    switched: list[float] = field(default_factory=list)  # perf_counter of each switch made


@dataclass(frozen=True)
class Switch:
    """An action run once `at` (a fraction) of the run is done, and the index_id the answers carry once it shows."""

    at: float
    action: Callable[[], Any]
    shows_as: str


async def drive(connections: Sequence[Connection], bodies: Sequence[bytes], max_requests: int, duration: float,
                switches: Sequence[Switch] = ()) -> Run:
    """A closed-loop worker per connection until `max_requests` were sent or `duration` passed; each switch's action
    runs once its fraction of the run is done (of the requests or of the duration, whichever is further) and once
    the switch before it shows in the answers, and the run goes on until the last one shows too (SWITCH_TIMEOUT_S
    at most each). A switch made on time lets the server's load take whatever it takes: on a busy machine the
    reload can outlast the run's last third, and the check that the new version served would then fail for no
    fault of the server's."""
    run, sent = Run(), 0
    started = time.perf_counter()
    deadline = started + duration
    switching_done = asyncio.Event()

    async def worker(connection: Connection) -> None:
        nonlocal sent
        while (sent < max_requests and time.perf_counter() < deadline) or (switches and not switching_done.is_set()):
            body = bodies[sent % len(bodies)]
            sent += 1
            run.records.append(await send(connection, body))

    def shown(switch: Switch, at: float, since: int) -> bool:
        return any(r.start >= at and r.index_id == switch.shows_as for r in run.records[since:])

    async def switcher() -> None:
        try:
            for switch in switches:
                while max(sent / max_requests, (time.perf_counter() - started) / duration) < switch.at:
                    await asyncio.sleep(0.01)
                switch.action()
                at, since = time.perf_counter(), len(run.records)
                run.switched.append(at)
                while not shown(switch, at, since) and time.perf_counter() - at < SWITCH_TIMEOUT_S:
                    await asyncio.sleep(0.01)
        finally:
            switching_done.set()

    switching = asyncio.create_task(switcher()) if switches else None
    await asyncio.gather(*(worker(connection) for connection in connections))
    run.seconds = time.perf_counter() - started
    if switching is not None:
        await switching
    return run


async def level(port: int, bodies: Sequence[bytes], concurrency: int, requests: int, duration: float,
                server_pid: int, switches: Sequence[Switch] = ()) -> tuple[Run, float | None, float]:
    """A warm-up, then the measured run on the same connections; with the CPU seconds of the server and of this
    process over the measured run."""
    connections = [Connection(port) for _ in range(concurrency)]
    try:
        await drive(connections, bodies, WARMUP_PER_WORKER * concurrency, WARMUP_MAX_S)
        server_before, client_before = cpu_seconds(server_pid), time.process_time()
        run = await drive(connections, bodies, requests, duration, switches)
        server_after, client_after = cpu_seconds(server_pid), time.process_time()
    finally:
        for connection in connections:
            connection.close()
    server = None if server_before is None or server_after is None else server_after - server_before
    return run, server, client_after - client_before


def measure(port: int, bodies: Sequence[bytes], concurrency: int, requests: int, duration: float, server_pid: int,
            switches: Sequence[Switch] = ()) -> tuple[dict[str, Any], Run]:
    """One level: its summary, with the server's and this process's CPU in cores over the run."""
    run, server_cpu, client_cpu = asyncio.run(level(port, bodies, concurrency, requests, duration, server_pid,
                                                    switches))
    summary = {"concurrency": concurrency, **summarize(run.records, run.seconds)}
    summary["server_cores"] = None if server_cpu is None else server_cpu / run.seconds
    summary["client_cores"] = client_cpu / run.seconds
    return summary, run


def reload_checks(run: Run, first: str, second: str) -> dict[str, Any]:
    """Responses per index_id, foreign versions, and how long each switch took to show in the answers."""
    seen = Counter(r.index_id for r in run.records if r.index_id is not None)
    delays = []
    for at, target in zip(run.switched, (second, first)):
        answered = [r.done for r in run.records if r.start >= at and r.index_id == target]
        delays.append(min(answered) - at if answered else None)
    foreign = sorted(set(seen) - {first, second})
    return {"seen": dict(seen), "foreign": foreign, "switches": len(run.switched), "delays": delays,
            "only_two": not foreign, "second_served": seen.get(second, 0) > 0}


# --- the server ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def serve_command(catalog_dir: Path, bundle: Path, port: int, workers: int | None, ort_threads: int | None
                  ) -> list[str]:
    script = Path(sys.executable).with_name("cirflow")  # what a user runs; the module where it is not installed
    head = [str(script)] if script.is_file() else [sys.executable, "-m", "cirflow.flows.cli"]
    extra = ([f"--workers={workers}"] if workers is not None else []) + \
        ([f"--ort-threads={ort_threads}"] if ort_threads is not None else [])
    return [*head, "serve", "--index", str(catalog_dir), "--bundle", str(bundle), "--host", HOST,
            "--port", str(port), "--reload-seconds", str(RELOAD_SECONDS), *extra]


class Server:
    """`cirflow serve` as a subprocess: entering waits for /readyz; leaving sends SIGTERM (SIGKILL after 30 s)."""

    def __init__(self, command: list[str], port: int, log_path: Path) -> None:
        self.command, self.log_path = command, log_path
        self.port = port
        self.url = f"http://{HOST}:{port}"

    def __enter__(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode} before it was ready; "
                                   f"its log ({self.log_path}) ends:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5, trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the service was not ready within {READY_TIMEOUT:.0f} s; its log ends:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


# --- the report ----------------------------------------------------------------------------------------------

def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def table_row(label: str, row: dict[str, Any]) -> str:
    errors = str(row["errors"]) + (f" ({', '.join(f'{k}: {n}' for k, n in row['error_kinds'].items())})"
                                   if row["errors"] else "")
    cores = f"{fmt(row.get('server_cores'), 2)} / {fmt(row.get('client_cores'), 2)}"
    return (f"| {label} | {row['requests']} | {row['seconds']:.1f} | {row['rps']:.1f} | {fmt(row['p50'])} | "
            f"{fmt(row['p99'])} | {fmt(row['server_p50'])} | {errors} | {cores} |")


def render(args: argparse.Namespace, command: str, info: dict[str, Any], library: dict[str, Any],
           same_threads: dict[str, Any], levels: list[dict[str, Any]], reload: dict[str, Any],
           checks: dict[str, Any]) -> str:
    ratio = levels[0]["p50"] / library["p50"]
    overhead = levels[0]["p50"] - same_threads["p50"]
    first, second = info["first"], info["second"]
    title = "## Search service under load (loopback, CPU)" + (" [--quick: numbers meaningless]" if args.quick else "")
    lines = [title, "",
             f"- date: {today()}; machine: {machine()}; load average at the start {info['load']:.2f}",
             f"- command: `{command}`",
             f"- catalog: {info['size']:,} images ({args.data}/images/test as a Parquet manifest with a `category` "
             f"column), index {library['index_type']} ({first}, IndexConfig defaults; reason: {info['reason']}); "
             f"second version for the reload run: {info['second_type']} ({second}), same snapshot, unpublished",
             f"- bundle: {info['bundle']} (bundle_id {info['bundle_id']}, {info['dim']} dims; {info['model']})",
             f"- queries: the first {info['queries']} composed queries of the test split (reference image + caption, "
             f"k={K}), JSON with the image in base64 (mean body {info['body_bytes']:,.0f} bytes), cycled",
             f"- server: `{info['serve']}`: one uvicorn process, {info['workers']} request threads, "
             f"{info['ort_threads']} ONNX Runtime thread(s) and 1 FAISS thread per request, access log at INFO to a "
             f"file, CURRENT polled every {RELOAD_SECONDS} s",
             f"- client: this bench's process (asyncio, a minimal HTTP/1.1 client: one keep-alive connection per "
             "worker, closed loop). "
             f"It shares the {info['cores']} cores with the server: the last column gives both processes' CPU in "
             "cores over each level",
             f"- bounds per level: {args.requests} requests or {args.duration:g} s, whichever first, after "
             f"{WARMUP_PER_WORKER} warm-up requests per worker; in-process: the library in this process before the "
             f"server started, one call after the other, after {BASELINE_WARMUP} warm-up calls, first with its "
             f"defaults, then with the service's threads ({info['ort_threads']} ORT thread(s), 1 FAISS thread)",
             "- method and the meaning of every number: the docstring of bench/service.py", "",
             "| level | requests | seconds | req/s | p50 ms | p99 ms | server p50 ms | errors | CPU cores server / "
             "client |", "|---|---|---|---|---|---|---|---|---|",
             f"| in-process library (Searcher.search, sequential) | {library['requests']} | {library['seconds']:.1f} | "
             f"{library['rps']:.1f} | {fmt(library['p50'])} | {fmt(library['p99'])} | - | - | - |",
             f"| in-process library, the service's threads ({info['ort_threads']} ORT, 1 FAISS) | "
             f"{same_threads['requests']} | {same_threads['seconds']:.1f} | {same_threads['rps']:.1f} | "
             f"{fmt(same_threads['p50'])} | {fmt(same_threads['p99'])} | - | - | - |"]
    lines += [table_row(f"concurrency {row['concurrency']}", row) for row in levels]
    lines.append(table_row(f"hot reload, concurrency {reload['concurrency']} (2 switches)", reload))
    delays = ", ".join(f"{name} seen {fmt(d, 2)} s after" if d is not None else f"{name} NOT seen"
                       for name, d in zip((f"-> {info['second_type']}", f"-> {library['index_type']}"),
                                          checks["delays"]))
    lines += ["", f"The service's own cost: p50 at concurrency 1 minus the in-process library's p50 with the service's "
              f"threads (same queries): **{overhead:.1f} ms** ({levels[0]['p50'] / same_threads['p50']:.2f}x)", "",
              f"Service p50 at concurrency 1 / in-process library p50 (same queries): **{ratio:.2f}**", "",
              f"Hot reload: {reload['errors']} errors (expected 0); responses per version: "
              + ", ".join(f"{i} ({'published' if i == first else 'hnsw' if i == second else 'FOREIGN'}): {n}"
                          for i, n in checks["seen"].items())
              + f"; every response from one of the two versions: {'yes' if checks['only_two'] else 'NO'}; "
              f"{checks['switches']} switches of CURRENT: {delays} (the first answer of the new version to a "
              "request sent after the switch)", "", "Reading:"]
    one, top = levels[0], levels[-1]
    lines += [f"- At concurrency 1 a query through the service takes {fmt(one['p50'])} ms (p50), the library "
              f"{fmt(same_threads['p50'])} ms in-process with the same threads: the service's own cost is "
              f"{fmt(overhead)} ms. Of the service's time, the server's own checks, decode, encode and search take "
              f"{fmt(one['server_p50'])} ms; the other {fmt(one['p50'] - one['server_p50'])} ms are HTTP, JSON, "
              "the hop to a request thread and back, and the client. With its defaults the "
              f"library lets ONNX Runtime use every core for one query ({fmt(library['p50'])} ms, {ratio:.2f}x); "
              f"the service gives each request {info['ort_threads']} ORT thread(s) so that concurrent requests fill "
              "the cores.",
              f"- Throughput goes from {one['rps']:.1f} req/s at concurrency 1 to {top['rps']:.1f} at "
              f"{top['concurrency']} ({top['rps'] / one['rps']:.2f}x), p50 from {fmt(one['p50'])} to "
              f"{fmt(top['p50'])} ms while the server's own p50 goes from {fmt(one['server_p50'])} to "
              f"{fmt(top['server_p50'])} ms: with {info['cores']} cores, requests beyond the busy cores wait (client "
              "p50 minus server p50 is that wait plus HTTP).",
              f"- The client took {fmt(top['client_cores'], 2)} of the {info['cores']} cores at concurrency "
              f"{top['concurrency']}: on a separate client machine the server would have that CPU too.",
              f"- Hot reload under load: {reload['errors']} errors at {reload['rps']:.1f} req/s (p99 "
              f"{fmt(reload['p99'])} ms against {fmt(levels_at(levels, reload['concurrency'], 'p99'))} ms without "
              "switches)."]
    return "\n".join(lines) + "\n"


def levels_at(levels: list[dict[str, Any]], concurrency: int, key: str) -> float | None:
    return next((row[key] for row in levels if row["concurrency"] == concurrency), None)


# --- main ----------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="serve this bundle (default: the demo architecture, untrained, "
                        "exported into WORKDIR/bundle)")
    parser.add_argument("--data", type=Path, help="a shapes dataset (default workdir/data/shapes; --quick: a tiny "
                        "one in WORKDIR/data/shapes-quick), generated when missing")
    parser.add_argument("--workdir", type=Path, help="default workdir/bench/service (--quick: "
                        "workdir/bench/service-quick); reruns reuse its bundle, snapshot and indexes")
    parser.add_argument("--doc", type=Path, help="default docs/benchmarks.md (--quick: WORKDIR/service-quick.md)")
    parser.add_argument("--queries", type=int, default=200, help="test-split queries in the query set")
    parser.add_argument("--requests", type=int, default=REQUESTS, help="requests per level at most")
    parser.add_argument("--duration", type=float, help=f"seconds per level at most (default {DURATION_S:g}; "
                        f"--quick: {QUICK_DURATION_S:g})")
    parser.add_argument("--workers", type=int, help="the service's request threads (default: its own, one per core)")
    parser.add_argument("--ort-threads", type=int, help="the service's ORT threads per request (default: its own, 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model and data, numbers meaningless")
    args = parser.parse_args(argv)
    args.workdir = (args.workdir or Path("workdir/bench/service-quick" if args.quick
                                         else "workdir/bench/service")).resolve()
    args.data = (args.data or (args.workdir / "data" / "shapes-quick" if args.quick
                               else Path("workdir/data/shapes"))).resolve()
    args.doc = args.doc or (args.workdir / "service-quick.md" if args.quick else DOC)
    args.duration = args.duration or (QUICK_DURATION_S if args.quick else DURATION_S)
    args.bundle = args.bundle.resolve() if args.bundle else None
    if args.queries < 1 or args.requests < 1 or args.duration <= 0:
        raise SystemExit(f"--queries and --requests must be positive and --duration > 0; got {args.queries}, "
                         f"{args.requests}, {args.duration}")
    for name in ("workers", "ort_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `with Server` block: the service is stopped too


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    command = shlex.join([".venv/bin/python", "bench/service.py", *(sys.argv[1:] if argv is None else argv)])
    cores = len(os.sched_getaffinity(0))
    say = progress()
    load = warn_if_busy(say, args.quick)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not (args.data / SHAPES_MANIFEST).exists():
        say(f"generating the shapes dataset in {args.data} ...")
        generate_shapes(QUICK_DATA if args.quick else ShapesConfig(), args.data)
    say("setup: bundle, catalog snapshot, index versions (cached in the workdir) ...")
    bundle = args.bundle or make_bundle(args.workdir, args.quick)
    setup = build_versions(bundle, args.data, args.workdir)
    queries = load_queries(args.data, args.queries)
    first, second = index_store.read_manifest(setup.first), index_store.read_manifest(setup.second)
    say(f"catalog {setup.size:,} images; published {first['type']} {setup.first.name}, reload target "
        f"{second['type']} {setup.second.name}; {len(queries.bodies)} queries")

    config = ServiceConfig(setup.catalog_dir, bundle, workers=args.workers or 0, ort_threads=args.ort_threads or 1)
    say("in-process baseline ...")
    library = baseline(setup, bundle, queries)
    say(f"library: p50 {library['p50']:.1f} ms, p99 {library['p99']:.1f} ms")
    same_threads = baseline(setup, bundle, queries, config.ort_threads)
    say(f"library with the service's threads: p50 {same_threads['p50']:.1f} ms, p99 {same_threads['p99']:.1f} ms")

    port = free_port()
    serve = serve_command(setup.catalog_dir, bundle, port, args.workers, args.ort_threads)
    levels_run = QUICK_LEVELS if args.quick else LEVELS
    reload_at = QUICK_RELOAD_CONCURRENCY if args.quick else RELOAD_CONCURRENCY
    say(f"starting the service: {shlex.join(serve)}")
    levels = []
    with Server(serve, port, args.workdir / "service.log") as server:
        say("service ready")
        for concurrency in levels_run:
            row, _ = measure(server.port, queries.bodies, concurrency, args.requests, args.duration, server.process.pid)
            levels.append(row)
            say(f"concurrency {concurrency}: {row['requests']} requests in {row['seconds']:.1f} s, "
                f"{row['rps']:.1f} req/s, p50 {row['p50']:.1f} ms, p99 {row['p99']:.1f} ms, errors {row['errors']}")
        switches = [Switch(SWITCHES[0], lambda: publish_current(setup.second), setup.second.name),
                    Switch(SWITCHES[1], lambda: publish_current(setup.first), setup.first.name)]
        try:
            reload, run = measure(server.port, queries.bodies, reload_at, args.requests, args.duration, server.process.pid,
                                  switches)
        finally:
            publish_current(setup.first)  # the published version stays CURRENT whatever happened
        checks = reload_checks(run, setup.first.name, setup.second.name)
        say(f"hot reload at {reload_at}: {reload['requests']} requests, errors {reload['errors']}, versions seen "
            f"{checks['seen']}, switch delays {checks['delays']}")

    info = {"load": load, "cores": cores, "size": setup.size, "first": setup.first.name,
            "second": setup.second.name, "second_type": second["type"], "reason": first["reason"],
            "bundle": bundle, "bundle_id": setup.bundle_id, "dim": setup.dim,
            "model": ("given with --bundle" if args.bundle else
                      "the tiny test model (models/tiny.py), untrained" if args.quick else
                      "the demo's architecture (flows/demo.py DEMO_MODEL), untrained: latency does not depend on "
                      "training"),
            "queries": len(queries.bodies), "body_bytes": float(np.mean([len(b) for b in queries.bodies])),
            "serve": shlex.join(serve), "workers": config.threads, "ort_threads": config.ort_threads}
    write_json_atomic(args.workdir / "service-results.json",
                      {"setup": {k: str(v) if isinstance(v, Path) else v for k, v in info.items()},
                       "library": library, "library_same_threads": same_threads, "levels": levels,
                       "reload": reload, "reload_checks": checks},
                      sort_keys=True)
    body = render(args, command, info, library, same_threads, levels, reload, checks)
    write_section("service", body, args.doc)
    print(body)
    say(f"wrote the service section to {args.doc}")
    failed = [text for text, bad in (("errors", reload["errors"] > 0), ("responses of another version",
                                                                          not checks["only_two"]),
                                     ("the hnsw version never served", not checks["second_served"])) if bad]
    if failed:
        say(f"hot reload run FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The system living through a month: a 20,000-image shop catalog with 1% daily churn, a nightly refresh by the
catalog flow, weekly retrains by the training flow, a refused model and an operator rollback, while the search
service answers a client all the while. Per day: refresh vs full rebuild, freshness, service latency during the
refresh vs idle, recall of the published version and disk used.

    .venv/bin/python bench/lifecycle.py [--data workdir/data/shapes] [--workdir workdir/bench/lifecycle]
        [--doc docs/benchmarks.md] [--size 20000] [--days 30] [--full-every 5] [--rate 10] [--idle 10]
        [--model tiny|builtin|demo] [--nice 10] [--service-cores 1]
    .venv/bin/python bench/lifecycle.py --quick [--data DIR] [--workdir DIR] [--doc PATH]   # ~1 min on 2 quiet cores

About 20 minutes on 2 cores with the default tiny model (21 measured with other jobs holding 1-2 cores most of
the time; the first run also generates the dataset: ~2 minutes); the retrains cost more with a larger --model.

Data: the built-in shapes dataset at scale 1 (--data, generated when missing: 26,538 training images of 64x64).
The shop (lifecycle_sim.Shop: a Parquet manifest of id, uri, category over PNG files in WORKDIR/shop/images,
copied from the dataset) starts with --size training images in sorted order; its pool of new pictures is the
training images after them (then the val and test images, which only --quick reaches). The model trains on a
copy of the dataset (hard links; WORKDIR/train-data) whose training captions hold all but the coming weeks'
triplets; the catalog flow tunes and validates with the val split of --data itself (unchanged by the growth).

Model (--model, MODELS): each retrain is a training flow run on a fixed step budget, no periodic validation (a
time budget trains less on a busy machine and would make the gate's verdicts depend on the load). The default,
tiny (models/tiny.py TINY_MODEL, 200 steps of batch 16), keeps the month's five training runs to minutes on 2
shared cores: the demo's model (flows/demo.py DEMO_MODEL, frozen MiniLM text tower) first runs MiniLM over every
training caption for its frozen stems and exports and evaluates MiniLM, minutes per run there; "builtin" is
TrainConfig's own architecture (~0.8M parameters). The service's latency is that of the model trained: with
tiny, encoding is a small part of a request.

The scenario, with the real flows in this process under one Prefect server (an ephemeral one, started by the
first flow run, its home in WORKDIR/prefect, analytics off):
- Day 0 (setup, untimed for the table): the training flow trains the first model, exports, gates and registers
  it; the catalog flow embeds the whole shop, builds, validates and publishes the first index. Then the service
  and the client start.
- Every day: the shop churns (CHURN_SHARES of --size: adds, removes, overwrites with a new picture, a
  category change only, and one corrupt upload: 1% in all) and the catalog flow runs (the nightly: snapshot,
  embed the delta in-process, an index overlay on the published version or a build, validation, publication,
  pruning to keep_versions / keep_bundles / embed.keep_snapshots at their defaults).
- Weekly (RETRAIN): GROW_SHARE of the training triplets arrive and the training flow trains a new run before
  that day's nightly. A new bundle makes the nightly embed the whole catalog with it and build a new index. One
  week (the "worse" one) trains with optim.max_steps=1: the gate (tolerance GATE_TOLERANCE, so that the seed noise
  of short runs never refuses a good model) must refuse it (GateRefused) and the nightly keeps the served model.
- ROLLBACK_DAY: after its nightly, an operator rolls the index back (versions.rollback); the next day the
  shop is quiet (no churn) and the nightly must hold (published False: the rollback is respected).

Processes: `cirflow serve --index WORKDIR/work/indexes/<catalog> --bundle WORKDIR/work/bundles --host 127.0.0.1
--port <free> --reload-seconds 0.5` (bench/service.py's Server: ready on /readyz, SIGTERM at the end), and the
latency client in its own process (bench/latency_client.py: composed queries, the first CLIENT_QUERIES of the
test split with k=10, paced at --rate requests per second, one at a time, one JSON line per request). Once both
run, this process lowers its CPU priority (every thread of it and of its other descendants, the Prefect server
included, to nice --nice, default NICE; the children it starts later inherit it) and, with --service-cores N (1 by
default), keeps the first N cores for the service and the client and runs itself on the others (CPU affinity of
every thread: what a cpuset, or a pod's CPU request and limit, gives a batch job beside a latency-serving process).
The refreshes, full rebuilds and retrains run at that priority on those cores, the service and the client at 0 on
theirs: idle and refresh windows are measured on the same cores, so their ratio is the refresh's interference.

A day, one step after the other, each timed by wall clock:
1. Retrain (RETRAIN days): the training flow. Its window's latency is recorded too.
2. Idle window: --idle seconds in which this process sleeps: the client's requests sent then are the day's idle
   latency.
3. The churn (the catalog change: the manifest written), then the nightly flow: its wall time (Prefect's overhead
   included) is the refresh time, and the requests sent meanwhile the day's refresh latency. p50 / p99 of each
   window and the ratio refresh p99 / idle p99 (aim: <= AIM_P99_RATIO). Errors: answers other than 200.
4. Freshness: a thread of this process watches the catalog's CURRENT (a file: free) and, once it moved, asks the
   service every PROBE_S s image-only with the first added item's own picture (its own vector ranks first) until
   the answer holds its id; freshness = that answer's arrival - the change. A request before CURRENT moved could
   not have held it, and would have loaded the refresh window.
5. Full rebuild (every --full-every days, not on retrain days, whose nightly embeds everything anyway): what a
   user without refresh does, on the day's catalog in a scratch workdir (deleted after) with the served bundle:
   run_embed (no previous snapshot: every image; a local Ray instance at >= local_below images), open_snapshot,
   build_index (IndexConfig defaults, tuned with the nightly's encoded val queries), validate_index; not
   published, no Prefect. refresh / full is the day's ratio. Its window's latency is recorded too.
6. Recall@10 of the published version: the validation the nightly returns (recall@10 re-measured on the held-out
   half of the val queries against exact search over the snapshot). Disk: bytes allocated under the work
   directory's embeddings/, indexes/ and bundles/ (each inode once: an overlay hard-links its base's files).
The other processes' CPU (outside this process's tree, which holds the service and the client) is sampled from
/proc during each window (bench/refresh.py OtherJobs) and reported in cores: a reader sees which days had
company. The client's log and every number are kept in WORKDIR (client.jsonl, lifecycle-results.json).
Correctness of the answers (each the library's answer for its version) is tests/flows/test_lifecycle.py's job.

--quick: a tiny dataset (WORKDIR/data/shapes-quick unless --data), the tiny model (40 steps, gate tolerance 0.2),
a catalog of up to 300 images, 2 days (day 1 rolled back, day 2 quiet; the retrains and the refused week run in
the full scenario and in tests/flows/test_lifecycle.py), 1 s idle windows, a full rebuild every
day that has a change, nice QUICK_NICE (the renicing is exercised, the smoke run not starved on a busy machine);
writes to WORKDIR/lifecycle-quick.md unless --doc is given. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import httpx
from lifecycle_sim import Churn, Shop
from refresh import BUSY_CORES, OtherJobs
from report import DOC, machine, progress, today, warn_if_busy, write_section
from service import Server, free_port, load_queries, percentile, serve_command

from cirflow.core.files import follow_current, write_json_atomic, write_text_atomic
from cirflow.export.manifest import resolve_bundle_dir
from cirflow.flows.demo import DEMO_MODEL
from cirflow.indexing.embedding import shards
from cirflow.indexing.embedding.catalog import CatalogConfig
from cirflow.indexing.embedding.job import EmbedConfig, run_embed
from cirflow.indexing.index.build import build_index
from cirflow.indexing.index.queries import read_queries
from cirflow.indexing.index.validate import validate_index
from cirflow.indexing.search import index_store
from cirflow.models.data.shapes import MANIFEST as SHAPES_MANIFEST
from cirflow.models.data.shapes import ShapesConfig, generate_shapes
from cirflow.models.tiny import TINY_MODEL

SEED = 0
CATALOG = "shop"
# Shares of --size changed a day (at least one each), besides one corrupt upload: 1% in all at 20,000.
CHURN_SHARES = {"adds": 0.005, "removes": 0.0025, "overwrites": 0.002, "metadata": 0.0005}
GROW_SHARE = 0.025  # of the training triplets, arriving each retrain week (held back until then)
AIM_P99_RATIO = 1.2  # the aim: p99 at most +20% while a refresh runs
NICE, QUICK_NICE = 10, 1  # --quick only exercises the renicing: a smoke test should not starve on a busy machine
PROBE_S = 0.2
PROBE_TIMEOUT_S = 120.0  # after the nightly returned
CLIENT_QUERIES = 50
STOP_TIMEOUT_S = 30.0
# --model: the training flow's model overrides, each on a fixed step budget (module docstring).
MODELS = {
    "tiny": (*TINY_MODEL, "optim.max_steps=200"),  # models/tiny.py: batch 16, a few thousand parameters a tower
    "builtin": ("optim.max_steps=100", "optim.max_minutes=0", "val_every_minutes=0"),  # TrainConfig's, batch 256
    "demo": (*DEMO_MODEL, "optim.max_steps=100", "optim.max_minutes=0", "val_every_minutes=0"),  # + MiniLM
}
QUICK_MODEL = (*TINY_MODEL, "optim.max_steps=40")
# Recall a retrained model may lose and still be registered: short runs differ by several points from seed noise
# alone, and the "worse" model (one step) loses far more.
GATE_TOLERANCE, QUICK_GATE_TOLERANCE = 0.1, 0.2
WORSE = "train.optim.max_steps=1"  # the week an operator's experiment has a far shorter schedule
PREFECT_ENV = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
FULL_DATA = ShapesConfig()  # 26,538 training images: 20,000 + 30 days x 140 new pictures fit
QUICK_DATA = ShapesConfig(seed=0, train_triplets=240, val_queries=40, test_queries=40, workers=1)
QUICK_SIZE = 300
SCRATCH = ("shop", "work", "prefect", "train-data", "scratch")  # WORKDIR's folders made afresh by every run


@dataclass(frozen=True)
class Schedule:
    days: int
    retrain: dict[int, str]  # day -> "better" | "worse"
    rollback_day: int  # rolled back after its nightly; the next day is quiet
    full_every: int  # a full rebuild on the days divisible by it (not on retrain days or quiet days)
    idle_s: float


FULL_SCHEDULE = Schedule(days=30, retrain={7: "better", 14: "worse", 21: "better", 28: "better"}, rollback_day=10,
                         full_every=5, idle_s=10.0)
# The smoke run: a rollback and the quiet day that holds it; the retrains are the simulated month's in the test
# suite (tests/flows/test_lifecycle.py).
QUICK_SCHEDULE = Schedule(days=2, retrain={}, rollback_day=1, full_every=1, idle_s=1.0)


def churn_for(size: int) -> Churn:
    """One day's change of a catalog of `size`: CHURN_SHARES, at least one of each, and one corrupt upload."""
    return Churn(**{kind: max(1, round(share * size)) for kind, share in CHURN_SHARES.items()}, corrupt=1)


# --- the data and the shop -----------------------------------------------------------------------------------

def pictures(data: Path) -> list[Path]:
    """The dataset's images, training ones first (sorted within each split): the shop's pictures, in order."""
    info = json.loads((data / SHAPES_MANIFEST).read_text())
    return [p for split in ("train", "val", "test")
            for p in sorted((data / info["splits"][split]["image_dir"]).iterdir())]


class TrainingData:
    """A copy of the dataset (hard links) whose training captions hold all but `weeks` x `grow` triplets; each
    add_week() adds the next week's. The captions file is replaced (temp, then rename), never rewritten in place:
    its inode is the source's."""

    CAPTIONS = Path("captions") / "cap.rc2.train.json"

    def __init__(self, source: Path, root: Path, weeks: int, grow: int) -> None:
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(source, root, copy_function=os.link)
        self.root, self.triplets = root, json.loads((source / self.CAPTIONS).read_text())
        self.grow, self.held_back = grow, weeks * grow
        if self.held_back >= len(self.triplets):
            raise SystemExit(f"{weeks} weeks of {grow} triplets: the data has only {len(self.triplets)}")
        self._write()

    def add_week(self) -> None:
        self.held_back = max(0, self.held_back - self.grow)
        self._write()

    @property
    def size(self) -> int:
        return len(self.triplets) - self.held_back

    def _write(self) -> None:
        write_text_atomic(self.root / self.CAPTIONS, json.dumps(self.triplets[:self.size]))


# --- processes and priorities --------------------------------------------------------------------------------

class Client:
    """bench/latency_client.py as a subprocess: started on entry, SIGTERM on exit."""

    def __init__(self, url: str, bodies: list[bytes], workdir: Path, rate: float) -> None:
        self.log = workdir / "client.jsonl"
        self.bodies_file = workdir / "client-bodies.jsonl"
        self.bodies_file.write_bytes(b"\n".join(bodies) + b"\n")
        self.command = [sys.executable, str(Path(__file__).with_name("latency_client.py")), "--url", url,
                        "--bodies", str(self.bodies_file), "--log", str(self.log), "--rate", str(rate)]
        self.out = workdir / "client.out"

    def __enter__(self) -> Client:
        self.log.unlink(missing_ok=True)
        with open(self.out, "wb") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *_: object) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def records(self) -> list[dict[str, Any]]:
        if self.process.poll() is not None:
            raise RuntimeError(f"the latency client exited with {self.process.returncode}: "
                               f"{self.out.read_text(errors='replace')[-2000:]}")
        return read_log(self.log)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The client's records (a last line being written is left out)."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else ():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def process_tree(root: int) -> set[int]:
    """`root` and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, stack = set(), [root]
    while stack:
        pid = stack.pop()
        tree.add(pid)
        stack.extend(children.get(pid, ()))
    return tree


def lower_priority(niceness: int, spare: list[int], cpus: tuple[set[int], set[int]] | None = None) -> int:
    """Set every thread of this process and of its descendants, but the trees of `spare`, to `niceness` (Linux
    niceness and CPU affinity are per thread: os.nice would leave the threads already running at 0); with `cpus`
    (batch cores, service cores), pin those threads to the batch cores and the threads of `spare` to the service
    cores (threads and children started later inherit both). Returns the threads changed."""
    keep = set().union(*(process_tree(pid) for pid in spare)) if spare else set()
    changed = 0
    for pid in sorted(process_tree(os.getpid()) | keep):
        for tid in _threads(pid):
            try:
                if pid in keep:
                    if cpus:
                        os.sched_setaffinity(tid, cpus[1])
                    continue
                if cpus:
                    os.sched_setaffinity(tid, cpus[0])
                if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                    os.setpriority(os.PRIO_PROCESS, tid, niceness)
                changed += 1
            except OSError:  # ended meanwhile
                continue
    return changed


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def split_cores(service_cores: int) -> tuple[set[int], set[int]] | None:
    """(batch cores, service cores): the first `service_cores` of this process's cores serve, the rest run the
    batch jobs; None when 0 or when fewer cores than that plus one are there."""
    cores = sorted(os.sched_getaffinity(0))
    if service_cores <= 0 or len(cores) <= service_cores:
        return None
    return set(cores[service_cores:]), set(cores[:service_cores])


# --- measuring -----------------------------------------------------------------------------------------------

@dataclass
class Window:
    """A span of the day, and the other processes' CPU during it."""

    start: float  # time.time()
    end: float = 0.0
    others_cores: float = 0.0


class Timed:
    """`with Timed() as w:` a Window over the block, with OtherJobs sampling."""

    def __enter__(self) -> Window:
        self.jobs = OtherJobs().__enter__()
        self.window = Window(time.time())
        return self.window

    def __exit__(self, *exc: object) -> None:
        self.window.end = time.time()
        self.jobs.__exit__(*exc)
        self.window.others_cores = self.jobs.cores


def latency(records: list[dict[str, Any]], window: Window) -> dict[str, Any]:
    """p50 / p99 / max ms, requests and errors of the client's requests sent in `window`."""
    inside = [r for r in records if window.start <= r["sent"] < window.end]
    ms = [r["ms"] for r in inside]
    return {"requests": len(inside), "errors": sum(r["status"] != 200 for r in inside),
            "p50": percentile(ms, 50), "p99": percentile(ms, 99), "max": max(ms, default=float("nan")),
            "seconds": window.end - window.start, "others_cores": window.others_cores}


class FreshnessProbe:
    """A thread: once the catalog's CURRENT moves from `before`, image-only searches with the item's own picture
    every PROBE_S until an answer holds the item; `seen` is that answer's arrival (time.time())."""

    def __init__(self, url: str, catalog_dir: Path, before: str | None, item: int, picture: bytes) -> None:
        self.url, self.catalog_dir, self.before, self.item = url, catalog_dir, before, str(item)
        self.body = {"image_base64": base64.b64encode(picture).decode(), "k": 10}
        self.seen: float | None = None
        self.index_id: str | None = None
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="freshness-probe", daemon=True)

    def __enter__(self) -> FreshnessProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=STOP_TIMEOUT_S)

    def wait(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            current = follow_current(self.catalog_dir, index_store.IndexFormatError)
            if current is not None and current.name != self.before:
                break
        with httpx.Client(timeout=30, trust_env=False) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(f"{self.url}/search", json=self.body)
                    self.requests += 1
                    answer = response.json() if response.status_code == 200 else {"results": []}
                except (httpx.HTTPError, ValueError):
                    answer = {"results": []}
                if any(hit["id"] == self.item for hit in answer["results"]):
                    self.seen, self.index_id = time.time(), answer["index_id"]
                    return
                self._stop.wait(PROBE_S)


def disk_bytes(work: Path) -> dict[str, int]:
    """Bytes allocated under work/embeddings, indexes and bundles, each inode counted once (first folder wins)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name in ("embeddings", "indexes", "bundles"):
        total = 0
        for directory, _, files in os.walk(work / name):
            for file in files:
                try:
                    st = os.lstat(os.path.join(directory, file))
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
        out[name] = total
    return out


def full_rebuild(manifest: Path, bundle: Path, queries_file: Path, scratch: Path, min_recall: float
                 ) -> dict[str, Any]:
    """Embed the whole catalog afresh, build, validate (module docstring, step 5); each call timed."""
    shutil.rmtree(scratch, ignore_errors=True)
    config = EmbedConfig(catalog=CatalogConfig(name=CATALOG, manifest=str(manifest)), bundle=str(bundle),
                         workdir=str(scratch))
    seconds: dict[str, float] = {}

    def step(name: str, call: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        result = call(*args)
        seconds[name] = time.perf_counter() - started
        return result

    snapshot_dir = step("run_embed", run_embed, config)
    run = step("open_snapshot", shards.open_snapshot, snapshot_dir)
    queries = read_queries(queries_file, run.bundle_id)
    index_dir = step("build_index", build_index, run, queries, scratch / "indexes")
    validation = step("validate_index", validate_index, index_dir, run, queries, min_recall)
    embedded_by = shards.read_manifest(snapshot_dir)["last_run"].get("embedded_by")
    shutil.rmtree(scratch)
    if not validation.passed:
        raise RuntimeError(f"the full rebuild failed validation: {'; '.join(validation.problems)}")
    return {"seconds": seconds, "total": sum(seconds.values()), "rows": run.rows, "embedded_by": embedded_by,
            "recall": validation.as_dict()}


def encoded_queries(work: Path, bundle_id: str) -> Path:
    """The val queries the nightly encoded with this bundle (WORKDIR/queries/<bundle_id>/<key>.parquet)."""
    found = sorted((work / "queries" / bundle_id).glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RuntimeError(f"no encoded queries of bundle {bundle_id} under {work / 'queries'}")
    return found[-1]


# --- the scenario --------------------------------------------------------------------------------------------

@dataclass
class Setup:
    work: Path
    shop: Shop
    data: Path  # the dataset (queries)
    training_data: TrainingData
    train_overrides: list[str]
    nightly_overrides: list[str]
    min_recall: float
    churn: Churn  # a day's


def train(setup: Setup, kind: str) -> dict[str, Any]:
    """One run of the training flow: registered, or refused by the gate (GateRefused)."""
    from cirflow.flows.gate import GateRefused
    from cirflow.flows.training_flow import training

    overrides = [*setup.train_overrides, *([WORSE] if kind == "worse" else [])]
    started = time.perf_counter()
    try:
        result = training(overrides=overrides)
    except GateRefused as e:
        return {"kind": kind, "registered": False, "reason": str(e).splitlines()[0],
                "seconds": time.perf_counter() - started, "triplets": setup.training_data.size}
    return {"kind": kind, "registered": result["registered"], "bundle_id": result["bundle_id"],
            "reason": result["gate"]["reason"], "seconds": time.perf_counter() - started,
            "triplets": setup.training_data.size}


def nightly(setup: Setup) -> dict[str, Any]:
    from cirflow.flows.catalog_flow import catalog

    started = time.perf_counter()
    result = catalog(overrides=setup.nightly_overrides)
    out = {"seconds": time.perf_counter() - started, "published": result["published"],
           "held": result.get("held") is not None, "encoded": result["encoded"], "delta": result["delta"],
           "errors": result["errors"], "bundle_id": result["bundle_id"], "snapshot": result["snapshot"]}
    if result["published"]:
        manifest = index_store.read_manifest(Path(result["index_dir"]))
        overlay = manifest.get("overlay")
        out.update(index_id=Path(result["index_dir"]).name, index_type=manifest["type"],
                   overlay=None if not overlay else {"delta": overlay["delta"], "dead": overlay["dead"]},
                   recall=result["validation"].get("recall@10"), vectors=result["validation"]["vectors"])
    return out


def live_day(day: int, setup: Setup, schedule: Schedule, url: str, client: Client,
             say: Callable[[str], None]) -> dict[str, Any]:
    """One day of the scenario (module docstring, steps 1-6)."""
    from cirflow.indexing.index.versions import rollback

    record: dict[str, Any] = {"day": day, "events": []}
    windows: dict[str, Window] = {}
    catalog_dir = setup.work / "indexes" / CATALOG
    served_bundle = resolve_bundle_dir(setup.work / "bundles").name
    if day in schedule.retrain:
        setup.training_data.add_week()
        with Timed() as windows["train"]:
            record["train"] = train(setup, schedule.retrain[day])
        record["events"].append(f"retrain ({schedule.retrain[day]}): "
                                + ("registered" if record["train"]["registered"] else "REFUSED by the gate"))
    with Timed() as windows["idle"]:
        time.sleep(schedule.idle_s)
    quiet = day == schedule.rollback_day + 1
    change = None if quiet else setup.shop.churn(setup.churn)
    changed_at = time.time()
    record["catalog"] = len(setup.shop.entries)
    record["change"] = {k: len(v) for k, v in change.items()} if change else None
    before = follow_current(catalog_dir, index_store.IndexFormatError)
    probe = None
    with ExitStack() as stack:
        if change:
            item = change["added"][0]
            probe = stack.enter_context(FreshnessProbe(url, catalog_dir, before.name if before else None, item,
                                                       Path(setup.shop.entries[item]["uri"]).read_bytes()))
        with Timed() as windows["refresh"]:
            record["nightly"] = nightly(setup)
        if probe is not None and record["nightly"]["published"]:
            probe.wait(PROBE_TIMEOUT_S)
    night = record["nightly"]
    record["new_bundle"] = resolve_bundle_dir(setup.work / "bundles").name != served_bundle
    if quiet:
        record["events"].append("quiet day: " + ("the nightly held the rollback" if night["held"]
                                                 else "the nightly did NOT hold the rollback"))
    if probe is not None:
        record["freshness"] = None if probe.seen is None else probe.seen - changed_at
        record["probe_requests"] = probe.requests
    full_day = change is not None and not record["new_bundle"] and day % schedule.full_every == 0
    if full_day:
        with Timed() as windows["full"]:
            record["full"] = full_rebuild(setup.shop.manifest, resolve_bundle_dir(setup.work / "bundles"),
                                          encoded_queries(setup.work, night["bundle_id"]),
                                          setup.work.parent / "scratch", setup.min_recall)
    if day == schedule.rollback_day:
        restored = rollback(catalog_dir)
        record["events"].append(f"rollback to {restored.name}")
    record["disk"] = disk_bytes(setup.work)
    records = client.records()
    record["latency"] = {name: latency(records, window) for name, window in windows.items()}
    record["windows"] = {name: asdict(window) for name, window in windows.items()}
    lat = record["latency"]
    say(f"day {day}: {', '.join(record['events']) or 'ordinary'}; nightly {night['seconds']:.1f} s "
        f"(encoded {night['encoded']}, {'published' if night['published'] else 'not published'})"
        + (f", full {record['full']['total']:.1f} s" if full_day else "")
        + (f", freshness {fmt(record.get('freshness'))} s" if probe else "")
        + f"; p99 idle {fmt(lat['idle']['p99'])} / refresh {fmt(lat['refresh']['p99'])} ms")
    return record


# --- the report ----------------------------------------------------------------------------------------------

def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b or a != a or b != b else a / b


def pooled(days: list[dict[str, Any]], records: list[dict[str, Any]], name: str,
           which: Callable[[dict[str, Any]], bool] = lambda d: True) -> dict[str, Any]:
    """Latency over every day's `name` window (of the days `which` picks), all requests together."""
    ms = [r["ms"] for d in days if which(d) and name in d["windows"]
          for r in records if d["windows"][name]["start"] <= r["sent"] < d["windows"][name]["end"]]
    return {"requests": len(ms), "p50": percentile(ms, 50), "p99": percentile(ms, 99)}


def kind_of(day: dict[str, Any]) -> str:
    """delta (an ordinary nightly), new-bundle (everything embedded) or held (nothing published)."""
    if not day["nightly"]["published"]:
        return "held"
    return "new-bundle" if day["new_bundle"] else "delta"


def summarize(days: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
    delta = [d for d in days if kind_of(d) == "delta"]

    def stats(values: list[float | None]) -> dict[str, float] | None:
        values = [v for v in values if v is not None and v == v]
        return {"median": statistics.median(values), "max": max(values), "n": len(values)} if values else None

    idle = pooled(days, records, "idle")
    refresh = pooled(days, records, "refresh", lambda d: kind_of(d) == "delta")
    quiet = [d["day"] for d in delta if max(d["latency"]["idle"]["others_cores"],
                                             d["latency"]["refresh"]["others_cores"]) < BUSY_CORES]
    quiet_idle = pooled(days, records, "idle", lambda d: d["day"] in quiet)
    quiet_refresh = pooled(days, records, "refresh", lambda d: d["day"] in quiet)
    return {
        "refresh_s": stats([d["nightly"]["seconds"] for d in delta]),
        "full_s": stats([d["full"]["total"] for d in days if "full" in d]),
        "refresh_over_full": stats([d["nightly"]["seconds"] / d["full"]["total"] for d in delta if "full" in d]),
        "new_bundle_s": stats([d["nightly"]["seconds"] for d in days if kind_of(d) == "new-bundle"]),
        "freshness_s": stats([d.get("freshness") for d in delta]),
        "new_bundle_freshness_s": stats([d.get("freshness") for d in days if kind_of(d) == "new-bundle"]),
        "p99_ratio": stats([ratio(d["latency"]["refresh"]["p99"], d["latency"]["idle"]["p99"]) for d in delta]),
        "p50_ratio": stats([ratio(d["latency"]["refresh"]["p50"], d["latency"]["idle"]["p50"]) for d in delta]),
        "days_within_aim": sum((ratio(d["latency"]["refresh"]["p99"], d["latency"]["idle"]["p99"]) or 99)
                               <= AIM_P99_RATIO for d in delta),
        "pooled": {"idle": idle, "refresh": refresh,
                   "new_bundle": pooled(days, records, "refresh", lambda d: kind_of(d) == "new-bundle"),
                   "full": pooled(days, records, "full"), "train": pooled(days, records, "train")},
        "pooled_p99_ratio": ratio(refresh["p99"], idle["p99"]),
        "without_company": {"days": quiet, "idle": quiet_idle, "refresh": quiet_refresh,
                            "p99_ratio": ratio(quiet_refresh["p99"], quiet_idle["p99"])},
        "recall": stats([d["nightly"].get("recall") for d in days]),
        "disk_mb": stats([sum(d["disk"].values()) / 2**20 for d in days]),
        "errors": sum(r["status"] != 200 for r in records), "requests": len(records),
        "delta_days": len(delta)}


def scenario_checks(days: list[dict[str, Any]], schedule: Schedule) -> list[str]:
    """What the scenario expects and did not happen (empty: all did)."""
    failed = []
    for d in days:
        trained = d.get("train")
        if trained and trained["registered"] != (trained["kind"] == "better"):
            failed.append(f"day {d['day']}: the {trained['kind']} model was "
                          f"{'registered' if trained['registered'] else 'refused'}")
        if d["day"] == schedule.rollback_day + 1 and not d["nightly"]["held"]:
            failed.append(f"day {d['day']}: the nightly after the rollback did not hold it")
        if d["change"] and not d["nightly"]["published"]:
            failed.append(f"day {d['day']}: a changed catalog was not published")
        if d["change"] and d.get("freshness") is None:
            failed.append(f"day {d['day']}: the probe never saw the added item")
    return failed


def render(args: argparse.Namespace, command: str, info: dict[str, Any], days: list[dict[str, Any]],
           summary: dict[str, Any], failed: list[str]) -> str:
    title = "## Lifecycle: a month of churn, nightly refreshes and retrains, with the service answering" + (
        " [--quick: numbers meaningless]" if args.quick else "")
    s, p, q = summary, summary["pooled"], summary["without_company"]
    sched = info["schedule"]
    lines = [title, "",
             f"- date: {today()}; machine: {machine()}; load average at the start {info['load']:.2f}; "
             f"{info['wall_minutes']:.1f} minutes in all",
             f"- command: `{command}`",
             f"- catalog: {info['size']:,} images at the start (shapes training images, {args.data}), "
             f"{days[-1]['catalog']:,} entries at the end; a day's churn: {info['churn']} (quiet on day "
             f"{sched['rollback_day'] + 1})",
             f"- model: {info['model']}; retrains on days "
             + ", ".join(f"{d} ({k})" for d, k in sorted(sched["retrain"].items(), key=lambda dk: int(dk[0])))
             + f", each after {info['grow']:,} more training triplets",
             f"- service: `cirflow serve` (reload 0.5 s) at nice 0; client: its own process, composed queries "
             f"(k=10) paced at {args.rate:g}/s; this process (flows, rebuilds, retrains) and the Prefect server at "
             f"nice {args.nice}; "
             + (f"the service and the client on {args.service_cores} core(s), the flows on the others (CPU "
                "affinity); " if split_cores(args.service_cores) else "every process on every core; ")
             + f"idle window {sched['idle_s']:g} s before each nightly",
             f"- full rebuild (run_embed from nothing + build_index + validate_index in a scratch workdir, no "
             f"Prefect) every {sched['full_every']} days but retrain days; the refresh is the nightly catalog "
             "flow's wall time (Prefect included)",
             "- method and the meaning of every number: the docstring of bench/lifecycle.py", "",
             "| day | events | entries | refresh s | encoded | index | full s | refresh / full | freshness s | "
             "idle p50 / p99 ms | refresh p50 / p99 ms | p99 ratio | other CPU idle / refresh | recall@10 | "
             "disk MB (emb / idx / bundles) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in days:
        night, lat = d["nightly"], d["latency"]
        if not night["published"]:
            index = "held" if night["held"] else "-"
        elif night.get("overlay"):
            index = f"{night['index_type']} overlay (+{night['overlay']['delta']} / -{night['overlay']['dead']})"
        else:
            index = f"{night['index_type']} built"
        full = d.get("full")
        disk = d["disk"]
        events = "; ".join(d["events"]) + ("; new bundle: all embedded" if d["new_bundle"] else "")
        lines.append(
            f"| {d['day']} | {events or '-'} | {d['catalog']:,} | {night['seconds']:.1f} | {night['encoded']} | "
            f"{index} | {fmt(full['total']) if full else '-'} | "
            f"{fmt(ratio(night['seconds'], full['total']), 3) if full else '-'} | {fmt(d.get('freshness'))} | "
            f"{fmt(lat['idle']['p50'])} / {fmt(lat['idle']['p99'])} | "
            f"{fmt(lat['refresh']['p50'])} / {fmt(lat['refresh']['p99'])} | "
            f"{fmt(ratio(lat['refresh']['p99'], lat['idle']['p99']), 2)} | "
            f"{lat['idle']['others_cores']:.2f} / {lat['refresh']['others_cores']:.2f} | "
            f"{fmt(night.get('recall'), 3)} | "
            f"{disk['embeddings'] / 2**20:.1f} / {disk['indexes'] / 2**20:.1f} / {disk['bundles'] / 2**20:.1f} |")

    def mm(x: dict[str, float] | None, digits: int = 1) -> str:
        return "-" if x is None else f"median {x['median']:.{digits}f}, max {x['max']:.{digits}f} (n={x['n']})"

    met = s["pooled_p99_ratio"] is not None and s["pooled_p99_ratio"] <= AIM_P99_RATIO
    lines += ["", "Summary (ordinary nightlies: a delta refresh; new-bundle nights and the held day apart):", "",
              f"- refresh: {mm(s['refresh_s'])} s; full rebuild: {mm(s['full_s'])} s; refresh / full: "
              f"{mm(s['refresh_over_full'], 3)}",
              f"- new-bundle nightly (whole catalog embedded with the new model, index built): {mm(s['new_bundle_s'])} s",
              f"- freshness (catalog change -> first answer holding the new item): {mm(s['freshness_s'])} s; on "
              f"new-bundle nights {mm(s['new_bundle_freshness_s'])} s",
              f"- service p99 during the refresh / idle, per day: {mm(s['p99_ratio'], 2)}; "
              f"{s['days_within_aim']} of {s['delta_days']} days within +{AIM_P99_RATIO - 1:.0%}; all requests "
              f"of those windows together: idle p50 {fmt(p['idle']['p50'])} / p99 {fmt(p['idle']['p99'])} ms "
              f"(n={p['idle']['requests']}), refresh p50 {fmt(p['refresh']['p50'])} / p99 "
              f"{fmt(p['refresh']['p99'])} ms (n={p['refresh']['requests']}): ratio "
              f"**{fmt(s['pooled_p99_ratio'], 2)}** (aim <= {AIM_P99_RATIO}: {'met' if met else 'NOT met'})",
              f"- the same on the days without company (other processes under {BUSY_CORES} cores in both windows: "
              f"{', '.join(map(str, q['days'])) or 'none'}): idle p99 {fmt(q['idle']['p99'])} ms "
              f"(n={q['idle']['requests']}), refresh p99 {fmt(q['refresh']['p99'])} ms (n={q['refresh']['requests']}): "
              f"ratio {fmt(q['p99_ratio'], 2)}: only these days isolate the refresh's own effect; on the others the "
              "cores were oversubscribed in both windows (other CPU per day in the table)",
              f"- for contrast, p50 / p99 ms during new-bundle nightlies {fmt(p['new_bundle']['p50'])} / "
              f"{fmt(p['new_bundle']['p99'])} (n={p['new_bundle']['requests']}), full rebuilds "
              f"{fmt(p['full']['p50'])} / {fmt(p['full']['p99'])} (n={p['full']['requests']}), retrains "
              f"{fmt(p['train']['p50'])} / {fmt(p['train']['p99'])} (n={p['train']['requests']})",
              f"- service answers other than 200: {s['errors']} of {s['requests']:,} requests",
              f"- recall@10 of each published version (held-out val queries, re-measured by validation): "
              f"{mm(s['recall'], 3)}; min {min(d['nightly']['recall'] for d in days if d['nightly'].get('recall') is not None):.3f}"
              if s["recall"] else "- recall@10: -",
              f"- disk (embeddings + indexes + bundles): {mm(s['disk_mb'])} MB; day 1 "
              f"{sum(days[0]['disk'].values()) / 2**20:.1f} MB, last day {sum(days[-1]['disk'].values()) / 2**20:.1f} MB",
              f"- day 0 (setup, before the service): training flow {info['day0']['train_s']:.1f} s, first nightly "
              f"(everything embedded) {info['day0']['nightly_s']:.1f} s",
              "- scenario checks: " + ("all as expected (the worse model refused, the better ones registered, "
                                       "the rollback held, every change published and seen by the probe)"
                                       if not failed else "FAILED: " + "; ".join(failed))]
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="shapes dataset, generated when missing (default "
                        "workdir/data/shapes; --quick: WORKDIR/data/shapes-quick)")
    parser.add_argument("--workdir", type=Path, help="default workdir/bench/lifecycle (--quick: "
                        f"workdir/bench/lifecycle-quick); its {', '.join(SCRATCH)} are made afresh")
    parser.add_argument("--doc", type=Path, help="default docs/benchmarks.md (--quick: WORKDIR/lifecycle-quick.md)")
    parser.add_argument("--size", type=int, help=f"catalog images at the start (default 20000; --quick: up to "
                        f"{QUICK_SIZE})")
    parser.add_argument("--days", type=int, help="days simulated (default 30; --quick: 2)")
    parser.add_argument("--full-every", type=int, help="a full rebuild every N days (default 5; --quick: 1)")
    parser.add_argument("--rate", type=float, default=10.0, help="the client's requests per second")
    parser.add_argument("--idle", type=float, help="seconds of the idle window before each nightly (default 10; "
                        "--quick: 1)")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny", help="the model the training flow "
                        "trains (MODELS; --quick: tiny, 40 steps)")
    parser.add_argument("--nice", type=int, help=f"this process's niceness once the service runs (default {NICE}; "
                        f"--quick: {QUICK_NICE})")
    parser.add_argument("--service-cores", type=int, default=1, help="cores kept for the service and the client; "
                        "the flows run on the others (CPU affinity, as a cpuset or a pod's CPU limit would); 0: all "
                        "share every core (default 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data and model, numbers meaningless")
    args = parser.parse_args(argv)
    args.nice = args.nice if args.nice is not None else QUICK_NICE if args.quick else NICE
    args.workdir = (args.workdir or Path("workdir/bench/lifecycle-quick" if args.quick
                                         else "workdir/bench/lifecycle")).resolve()
    args.data = (args.data or (args.workdir / "data" / "shapes-quick" if args.quick
                               else Path("workdir/data/shapes"))).resolve()
    args.doc = args.doc or (args.workdir / "lifecycle-quick.md" if args.quick else DOC)
    base = QUICK_SCHEDULE if args.quick else FULL_SCHEDULE
    days = args.days or base.days
    args.schedule = Schedule(days=days, retrain={d: k for d, k in base.retrain.items() if d <= days},
                             rollback_day=base.rollback_day, full_every=args.full_every or base.full_every,
                             idle_s=base.idle_s if args.idle is None else args.idle)
    if days < 1 or args.schedule.full_every < 1 or args.rate <= 0 or args.schedule.idle_s <= 0 or (
            args.size is not None and args.size < 10) or not 0 <= args.nice <= 19:
        raise SystemExit("--days, --full-every, --rate and --idle must be positive, --size >= 10 and --nice 0..19")
    return args


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the `with` blocks: the service and the client are stopped too


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    command = shlex.join([".venv/bin/python", "bench/lifecycle.py", *(sys.argv[1:] if argv is None else argv)])
    schedule = args.schedule
    say = progress()
    load = warn_if_busy(say, args.quick)
    began = time.monotonic()
    if not (args.data / SHAPES_MANIFEST).exists():
        say(f"generating the shapes dataset in {args.data} ...")
        generate_shapes(QUICK_DATA if args.quick else FULL_DATA, args.data)
    for name in SCRATCH:
        shutil.rmtree(args.workdir / name, ignore_errors=True)
    os.environ.update(PREFECT_ENV, PREFECT_HOME=str(args.workdir / "prefect"))  # before Prefect is imported
    from cirflow.flows.catalog_flow import CatalogFlowConfig

    pool = pictures(args.data)
    size = args.size or (QUICK_SIZE if args.quick else 20_000)
    need = schedule.days * (churn_for(size).adds + churn_for(size).overwrites)  # new pictures
    if args.quick and args.size is None:
        size = max(10, min(size, len(pool) - need))  # a smaller tiny dataset: a smaller catalog
    churn = churn_for(size)
    if size + need > len(pool):
        raise SystemExit(f"a catalog of {size} and {schedule.days} days of {churn} need {size + need} pictures; "
                         f"{args.data} has {len(pool)}")
    say(f"the shop: {size:,} pictures copied into {args.workdir / 'shop'} ...")
    shop = Shop.create(args.workdir / "shop", pool, size=size, seed=SEED)
    weeks = sum(1 for d in schedule.retrain)
    triplets = len(json.loads((args.data / TrainingData.CAPTIONS).read_text()))
    grow = max(1, round(GROW_SHARE * triplets))
    training_data = TrainingData(args.data, args.workdir / "train-data", weeks, grow)
    work = args.workdir / "work"
    model = [*(f"train.{o}" for o in (QUICK_MODEL if args.quick else MODELS[args.model])),
             f"gate.tolerance={QUICK_GATE_TOLERANCE if args.quick else GATE_TOLERANCE}"]
    setup = Setup(work, shop, args.data, training_data,
                  [f"workdir={work}", f"train.data.root={training_data.root}", *model],
                  [f"embed.workdir={work}", f"embed.catalog.name={CATALOG}", f"embed.catalog.manifest={shop.manifest}",
                   "queries.kind=shapes", f"queries.root={args.data}", "queries.split=val"],
                  CatalogFlowConfig().min_recall, churn)

    say(f"day 0: the training flow ({training_data.size:,} triplets) ...")
    first = train(setup, "better")
    if not first["registered"]:
        raise RuntimeError(f"the first model was not registered: {first['reason']}")
    say(f"day 0: registered {first['bundle_id']} in {first['seconds']:.1f} s; the first nightly ...")
    night0 = nightly(setup)
    say(f"day 0: published {night0.get('index_id')} ({night0.get('index_type')}) in {night0['seconds']:.1f} s")

    port = free_port()
    serve = serve_command(work / "indexes" / CATALOG, work / "bundles", port, None, None)
    bodies = list(load_queries(args.data, CLIENT_QUERIES).bodies)
    days: list[dict[str, Any]] = []
    say(f"starting the service: {shlex.join(serve)}")
    with Server(serve, port, args.workdir / "service.log") as server, \
            Client(server.url, bodies, args.workdir, args.rate) as client:
        cpus = split_cores(args.service_cores)
        reniced = lower_priority(args.nice, [server.process.pid, client.process.pid], cpus)
        say(f"service and client running{f' on cores {sorted(cpus[1])}' if cpus else ''}; {reniced} threads of "
            f"this process tree set to nice {args.nice}{f' on cores {sorted(cpus[0])}' if cpus else ''}")
        for day in range(1, schedule.days + 1):
            days.append(live_day(day, setup, schedule, server.url, client, say))
        records = client.records()

    summary = summarize(days, records)
    failed = scenario_checks(days, schedule)
    info = {"load": load, "size": size, "churn": ", ".join(f"{k} {v}" for k, v in asdict(churn).items()),
            "schedule": asdict(schedule), "grow": grow, "wall_minutes": (time.monotonic() - began) / 60,
            "model": (f"--model {'tiny (--quick)' if args.quick else args.model}: "
                      f"{' '.join(QUICK_MODEL if args.quick else MODELS[args.model])}; gate tolerance "
                      f"{QUICK_GATE_TOLERANCE if args.quick else GATE_TOLERANCE}"),
            "day0": {"train_s": first["seconds"], "nightly_s": night0["seconds"], "train": first, "nightly": night0}}
    write_json_atomic(args.workdir / "lifecycle-results.json",
                      {"info": info, "days": days, "summary": summary, "failed": failed}, sort_keys=True)
    body = render(args, command, info, days, summary, failed)
    write_section("lifecycle", body, args.doc)
    print(body)
    say(f"wrote the lifecycle section to {args.doc}")
    if failed:
        say("scenario checks FAILED: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sharded serving on Ray Serve: a catalog served as 1 index (the plain search deployment), and as 2 and 4 index
shards (a deployment per shard and a front, indexing/service/ray_shards.py), on a simulated three-node cluster.

    .venv/bin/python bench/sharded_serve.py [--size 200000] [--shards 1 2 4] [--concurrency 4] [--duration 20]
        [--workdir workdir/bench/sharded] [--doc docs/benchmarks.md] [--bundle DIR] [--data workdir/bench/shapes-x4]

Catalog: --size vectors of bench/indexing.py's recipe (part 1's real 128-d vectors of the registered bundle, then
noisy copies; bench/indexing.py must have run once, for part 1), built with IndexConfig defaults as one index and
as N shards (cirflow index build --shards N), each published in turn to its own catalog directory. Cluster:
ray.cluster_utils.Cluster, a head and two worker nodes of one CPU each, all on this machine (the cores are shared:
the shards' parallelism across machines is not measured here, their fan-out and merge overhead is); Serve's HTTP
proxy on the head. Each layout: app_builder (one replica per deployment, 0.25 CPU each so that all fit), ready
when /readyz answers, then a closed loop of --concurrency clients (asyncio + httpx in this process, one
connection each) posting composed queries (a test-split reference image in base64 and its caption, k=10) for
--duration seconds after a warm-up of 5 requests per client. QPS: answered requests / seconds; p50/p99: client
side, send to body read; server p50: took_ms.total (decode + encode + search, the fan-out and merge included).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ray
from ray import serve
from ray.cluster_utils import Cluster
from report import DOC, default_bundle, machine, today, write_section

from cirflow.core.files import read_json
from cirflow.core.ray_local import _single_machine_mode
from cirflow.export.runtime import BundleRuntime
from cirflow.indexing.embedding import shards
from cirflow.indexing.index.build import build_index
from cirflow.indexing.index.plan import IndexConfig
from cirflow.indexing.index.queries import encode_query_split
from cirflow.indexing.index.sharded import build_sharded_index
from cirflow.indexing.index.versions import publish
from cirflow.indexing.search.index_store import read_manifest
from cirflow.indexing.service.ray_serve import app_builder
from cirflow.models.data.loaders import load_split

K, SEED, WARMUP_PER_CLIENT, QUERIES = 10, 0, 5, 200


def catalog(args: argparse.Namespace) -> shards.EmbeddingSnapshot:
    """The --size catalog of bench/indexing.py's recipe, from its part 1 run (reused when built before)."""
    spec = importlib.util.spec_from_file_location("indexing_bench", Path(__file__).with_name("indexing.py"))
    indexing_bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = indexing_bench  # its dataclasses look their module up there
    spec.loader.exec_module(indexing_bench)

    bundle_id = read_json(args.bundle / "manifest.json")["bundle_id"]
    saved = sorted(Path("workdir/bench/indexing").glob(f"embedding-*-{bundle_id}.json"))
    if not saved:
        raise SystemExit("run bench/indexing.py once first (its part 1 embeds the real vectors this catalog copies)")
    run = shards.open_snapshot(Path(read_json(saved[0])["ray"]["snapshot_dir"]))
    ids, vectors, uris = run.read_all()
    base = min(len(ids), 100_000)
    real = (ids[:base], vectors[:base], uris[:base])
    scale = indexing_bench.median_nn_distance(real[1], 2000, SEED) / math.sqrt(run.dim)
    return indexing_bench.catalog_run(args.workdir / "catalogs", real, args.size, scale, run.bundle_id,
                                      f"sharded-{base}-{scale:.6f}", f"sharded-{args.size}")


def bodies(args: argparse.Namespace) -> list[dict[str, Any]]:
    split = load_split("shapes", args.data, "test")
    rows = np.random.default_rng(SEED).permutation(len(split.queries))[:QUERIES]
    return [{"image_base64": base64.b64encode(split.images[split.queries[i].reference].read_bytes()).decode(),
             "text": split.queries[i].caption, "k": K} for i in rows]


async def load(url: str, requests: list[dict[str, Any]], concurrency: int, duration: float) -> dict[str, Any]:
    latencies, server, errors = [], [], 0

    clients = [httpx.AsyncClient(timeout=60, trust_env=False) for _ in range(concurrency)]

    async def warm(worker: int) -> None:
        for i in range(WARMUP_PER_CLIENT):
            await clients[worker].post(f"{url}/search", json=requests[(worker + i) % len(requests)])

    async def client(worker: int) -> None:
        nonlocal errors
        http, i = clients[worker], worker
        while time.monotonic() < end:
            start = time.perf_counter()
            response = await http.post(f"{url}/search", json=requests[i % len(requests)])
            latencies.append(1000 * (time.perf_counter() - start))
            if response.status_code == 200 and not response.json()["partial"]:
                server.append(response.json()["took_ms"]["total"])
            else:
                errors += 1
            i += concurrency

    await asyncio.gather(*(warm(w) for w in range(concurrency)))
    started = time.monotonic()
    end = started + duration
    await asyncio.gather(*(client(w) for w in range(concurrency)))
    seconds = time.monotonic() - started
    for http in clients:
        await http.aclose()
    return {"requests": len(latencies), "qps": len(latencies) / seconds, "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99)), "server_p50": float(np.median(server)) if server else None,
            "errors": errors}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=200_000)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--workdir", type=Path, default=Path("workdir/bench/sharded"))
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--data", type=Path, default=Path("workdir/bench/shapes-x4"))
    args = parser.parse_args(argv)
    args.bundle = args.bundle or default_bundle()
    command = shlex.join([".venv/bin/python", "bench/sharded_serve.py", *(sys.argv[1:] if argv is None else argv)])
    run = catalog(args)
    runtime = BundleRuntime.load(args.bundle, providers="cpu")
    queries = encode_query_split(runtime, "shapes", args.data, "val").take(np.arange(1000))
    requests = bodies(args)
    versions = {}
    for count in args.shards:
        root = args.workdir / f"indexes-{count}"
        built = (build_index(run, queries, root, IndexConfig()) if count == 1
                 else build_sharded_index(run, queries, root, IndexConfig(), count))
        publish(built)
        versions[count] = built
        print(f"{count} shard(s): {built}", flush=True)

    port = 18000 + (hash(str(args.workdir)) % 1000)
    with _single_machine_mode():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                                "include_dashboard": False})
        for _ in range(2):
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray.init(address=cluster.address, log_to_driver=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
        url = f"http://127.0.0.1:{port}"
        for count, built in versions.items():
            serve.run(app_builder({"index": str(built.parent), "bundle": str(args.bundle), "providers": "cpu",
                                   "cpus_per_replica": 0.25, "reload_seconds": 0}), name="search", route_prefix="/")
            deadline = time.monotonic() + 300
            while httpx.get(f"{url}/readyz", timeout=30).status_code != 200 and time.monotonic() < deadline:
                time.sleep(1)
            result = asyncio.run(load(url, requests, args.concurrency, args.duration))
            manifest = read_manifest(built)
            rows.append({"shards": count, "type": manifest["type"], "recall": manifest["recall"]["held_out"],
                         **result})
            print(rows[-1], flush=True)
            serve.delete("search")
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()

    single = rows[0]
    lines = ["## Sharded serving on Ray Serve (simulated cluster, CPU)", "",
             f"- date: {today()}; machine: {machine()}", f"- command: `{command}`",
             f"- catalog: {args.size:,} vectors of bench/indexing.py's recipe (128 dims), IndexConfig defaults per "
             f"shard; clients: {args.concurrency} concurrent (closed loop), {args.duration:g} s after a warm-up; "
             "three Ray nodes on this machine's cores (fan-out and merge cost, not cross-machine parallelism)",
             "- method: the docstring of bench/sharded_serve.py", "",
             "| layout | index per shard | recall@10 held out (merged) | requests | QPS | p50 ms | p99 ms | server p50 ms "
             "| QPS / single | not whole |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        layout = "1 index (search deployment)" if r["shards"] == 1 else f"{r['shards']} shards + front"
        lines.append(f"| {layout} | {r['type']} | {r['recall']:.3f} | {r['requests']} | {r['qps']:.1f} | "
                     f"{r['p50']:.1f} | {r['p99']:.1f} | {r['server_p50'] or 0:.1f} | {r['qps'] / single['qps']:.2f} "
                     f"| {r['errors']} |")
    write_section("sharded-serve", "\n".join(lines), args.doc)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

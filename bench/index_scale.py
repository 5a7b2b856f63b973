"""Part 3 of bench/indexing.py (--scale): the planner's own index for catalogs of millions under a memory budget.

    .venv/bin/python bench/indexing.py --scale [--sizes 10000000] [--dims 128 512] [--budget-mb 16384]

Catalogs: part 2's recipe at each size (the first 100k real vectors of part 1, then noisy copies at the scale of
a real nearest neighbour), from the demo model's 128-d vectors. The 512-d variant is the same recipe applied to
a lift of the real vectors: v512 = normalize(L v + m) with L a fixed random orthogonal 512 x 128 matrix (QR of
a seeded Gaussian) and m ~ N(0, s_l^2 I), s_l = (r / 2) / sqrt(512), r the 128-d median nearest-neighbour
distance: the noise gives the 384 extra dimensions energy (a real 512-d embedding is not rank 128, and a PQ
codebook would find a rank-128 catalog too easy) while moving each vector by half a neighbour's distance. The
composed queries are lifted the same way (their own noise seed); the noisy copies of the lifted catalog use the
lifted vectors' own median nearest-neighbour distance.

Index: build_index with IndexConfig(index_type="auto", memory_budget_mb=--budget-mb): the planner picks the type
and its parameters, tuning picks nprobe (and the re-rank's k_factor) on the tuning half of the queries; recall@10
is measured on the held-out half (split by reference image). Peak RSS: the build's high-water mark of this
process (VmHWM, reset through /proc/self/clear_refs before the build), memory-mapped pages it touched included.
Timings as part 2 (the index loaded as served, verify="size"; 200 single queries at 1 faiss thread after 20
warm-ups); encode+search: the bundle's query encoder on the reference image and caption (ONNX Runtime at every
core), the lift for 512-d, the search at 1 thread.

The 100M rows are on paper, from each measured run: memory = bytes/vector x 100M, the shards that keep each
machine within the budget (each shard planned by plan_index at its size), and build time = the measured add
time per vector x 100M plus the training at the larger nlist (k-means cost grows with lists x points, both
doubled at 100M: x4), divided over the shards' machines.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np

from cirflow.export.runtime import BundleRuntime
from cirflow.indexing.embedding.shards import EmbeddingSnapshot
from cirflow.indexing.index.build import build_index, index_id
from cirflow.indexing.index.plan import MB, IndexConfig, IndexConfigError, IndexPlan, plan_index, train_points
from cirflow.indexing.index.queries import Queries
from cirflow.indexing.search import VectorIndex

K = 10
LIFT_NOISE = 0.5  # the lift's noise norm, in units of the 128-d median nearest-neighbour distance
PAPER_SIZE = 100_000_000
PLAN_SIZES = (1_000_000, 10_000_000, 100_000_000)
AIMS = {128: {"recall": 0.95, "search_p50_ms": 2.0}, 512: {"recall": 0.95, "search_p50_ms": 5.0}}


@dataclass(frozen=True)
class Lift:
    """The fixed orthogonal lift of 128-d vectors to `dim` dimensions, plus noise (module docstring)."""

    matrix: np.ndarray  # (dim, 128), orthonormal columns
    noise: float  # per-dimension standard deviation

    @classmethod
    def make(cls, dim: int, source_dim: int, nn_distance: float, seed: int) -> Lift:
        q, _ = np.linalg.qr(np.random.default_rng([seed, dim]).standard_normal((dim, source_dim)))
        return cls(q.astype(np.float32), LIFT_NOISE * nn_distance / math.sqrt(dim))

    def __call__(self, vectors: np.ndarray, seed: int | None) -> np.ndarray:
        """Unit (N, dim) lifts of (N, 128) `vectors`; seed None: no noise (the timed query path costs the same)."""
        lifted = vectors @ self.matrix.T
        if seed is not None:
            lifted += np.random.default_rng(seed).standard_normal(lifted.shape, dtype=np.float32) * self.noise
        return (lifted / np.linalg.norm(lifted, axis=1, keepdims=True)).astype(np.float32)


def peak_rss_reset() -> None:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_scale(args: Any, runtime: BundleRuntime, queries: Queries, images: list[Path], captions: list[str],
              real: tuple[np.ndarray, np.ndarray, list[str]], nn_distance: float,
              catalog_run: Callable[..., EmbeddingSnapshot], median_nn: Callable[[np.ndarray], float],
              latencies_ms: Callable[..., np.ndarray], say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Build and time the planner's index at every (size, dim); part 2's helpers come in as arguments."""
    rows = []
    for dim in args.dims:
        lift = None if dim == real[1].shape[1] else Lift.make(dim, real[1].shape[1], nn_distance, args.seed)
        vectors = real[1] if lift is None else lift(real[1], args.seed)
        dim_queries = queries if lift is None else Queries(lift(queries.vectors, args.seed + 1), queries.references)
        dim_nn = nn_distance if lift is None else median_nn(vectors)
        scale = dim_nn / math.sqrt(dim)
        for size in args.sizes:
            started = time.monotonic()
            run = catalog_run((real[0], vectors, real[2]), size, scale, dim)
            say(f"{size:,} x {dim}: catalog ready in {time.monotonic() - started:.0f} s")
            config = IndexConfig(memory_budget_mb=args.budget_mb, hnsw_ef_construction=args.ef_construction,
                                 seed=args.seed)
            reused = (args.workdir / "indexes" / run.manifest["catalog"]["name"]
                      / index_id(run, dim_queries, config)).is_dir()
            peak_rss_reset()
            index_dir = build_index(run, dim_queries, args.workdir / "indexes", config)
            rss = peak_rss_mb()
            row = measure(index_dir, runtime, dim_queries.vectors, images, captions, lift, args, latencies_ms)
            row.update({"size": size, "dim": dim, "reused": reused, "peak_rss_mb": rss, "scale": scale,
                        "nn_distance": dim_nn, "lift_noise": None if lift is None else lift.noise})
            rows.append(row)
            say(f"{size:,} x {dim}: {row['type']} built in {row['build_seconds']['total']:.0f} s"
                f"{' (reused)' if reused else ''}, peak RSS {rss:,.0f} MB, recall {row['recall']:.3f}, search "
                f"p50 {row['search_ms'][0]:.2f} ms, encode+search p50 {row['encode_ms'][0]:.2f} ms")
    return rows


def measure(index_dir: Path, runtime: BundleRuntime, queries: np.ndarray, images: list[Path], captions: list[str],
            lift: Lift | None, args: Any, latencies_ms: Callable[..., np.ndarray]) -> dict[str, Any]:
    loaded_at = time.monotonic()
    index = VectorIndex.load(index_dir, verify="size")
    load_s = time.monotonic() - loaded_at
    manifest = index.manifest
    faiss.omp_set_num_threads(1)
    single = latencies_ms(lambda i: index.search(queries[i % len(queries)][None], K), args.counts.single,
                          args.counts.warmup)

    def encode_search(i: int) -> None:
        vector = runtime.embed_queries([images[i % len(images)]], [captions[i % len(captions)]])
        index.search(vector if lift is None else lift(vector, None), K)

    encode = latencies_ms(encode_search, args.counts.encode, args.counts.warmup)
    faiss.omp_set_num_threads(args.faiss_threads)
    return {"type": manifest["type"], "factory": manifest["factory"], "params": manifest["params"],
            "reason": manifest["reason"], "build_seconds": manifest["build_seconds"],
            "bytes_per_vector": manifest["bytes_per_vector"], "bytes_on_disk": manifest["bytes_on_disk"],
            "search": manifest["search"], "recall": manifest["recall"]["held_out"],
            "target_met": manifest["recall"]["target_met"], "split": manifest["recall"]["split"],
            "k_factor_sweep": manifest["recall"].get("k_factor_sweep"), "load_s": load_s,
            "search_ms": [float(np.percentile(single, 50)), float(np.percentile(single, 99)), len(single)],
            "encode_ms": [float(np.percentile(encode, 50)), float(np.percentile(encode, 99)), len(encode)]}


def on_paper(row: dict[str, Any], budget_mb: float) -> dict[str, Any]:
    """What PAPER_SIZE vectors of the row's dimension would take, from its measured per-vector costs."""
    memory = row["bytes_per_vector"] * PAPER_SIZE
    shards = 1
    while (per_shard := shard_plan(math.ceil(PAPER_SIZE / shards), row["dim"], budget_mb)) is None:
        shards *= 2
    build = row["build_seconds"]
    lists_growth = (train_points(PAPER_SIZE, IndexConfig()) / train_points(row["size"], IndexConfig())) ** 2
    add_s = build["add"] / row["size"] * PAPER_SIZE
    train_s = build["train"] * lists_growth
    return {"memory_mb": memory / MB, "shards": shards, "shard_plan": per_shard, "add_s": add_s, "train_s": train_s,
            "build_s_per_machine": train_s + add_s / shards}


def shard_plan(size: int, dim: int, budget_mb: float) -> IndexPlan | None:
    """The planner's index for one shard of `size` vectors, or None when it would not fit the budget or would
    be plain IVF-PQ, whose codes cap recall below the target: the catalog needs more shards."""
    try:
        plan = plan_index(size, dim, IndexConfig(memory_budget_mb=budget_mb))
    except IndexConfigError:
        return None
    return None if plan.index_type == "ivf_pq" else plan


def render(rows: list[dict[str, Any]], args: Any, header: list[str]) -> str:
    lines = ["## Indexing at scale: the planner's index for millions of vectors (CPU)", "", *header,
             f"- memory budget {args.budget_mb:,g} MB (IndexConfig.memory_budget_mb); everything else IndexConfig's "
             "defaults; the type is the planner's choice", "- method: the docstring of bench/index_scale.py", "",
             "| vectors | dims | planner's choice | factory | build s total (train / add / tune) | peak RSS MB | "
             "bytes/vector | tuned setting | recall@10 held out | search p50 / p99 ms (1 thread) | encode+search "
             "p50 / p99 ms | aim |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, s = r["build_seconds"], r["search"]
        setting = f"{s['param']} {s['value']}" + (f", k_factor {s['k_factor']}" if s.get("k_factor") else "")
        aim = AIMS.get(r["dim"])
        verdict = "-" if aim is None else ("**met**" if r["recall"] >= aim["recall"] and r["search_ms"][0]
                                           <= aim["search_p50_ms"] else "NOT met") + (
            f" (recall >= {aim['recall']}, p50 <= {aim['search_p50_ms']:g} ms)" if aim else "")
        lines.append(f"| {r['size']:,} | {r['dim']} | {r['type']} | {r['factory']} | {b['total']:.0f} "
                     f"({b['train']:.0f} / {b['add']:.0f} / {b['tune']:.0f}){' reused' if r['reused'] else ''} | "
                     f"{r['peak_rss_mb']:,.0f}{' (loading only: build reused)' if r['reused'] else ''} | "
                     f"{r['bytes_per_vector']:.1f} | {setting} | {r['recall']:.3f} | "
                     f"{r['search_ms'][0]:.2f} / {r['search_ms'][1]:.2f} | {r['encode_ms'][0]:.2f} / "
                     f"{r['encode_ms'][1]:.2f} | {verdict} |")
    lines += ["", "Why the planner chose each (the manifest's reason):", ""]
    lines += [f"- {r['size']:,} x {r['dim']}: {r['reason']}" for r in rows]
    lines += ["", "Tuning of the re-rank (k_factor, nprobe, recall on the tuning half, ms per query in the tuning "
              "batch, target met):", ""]
    lines += [f"- {r['size']:,} x {r['dim']}: {r['k_factor_sweep']}" for r in rows if r["k_factor_sweep"]]
    lines += ["", f"### {PAPER_SIZE:,} vectors, on paper", "",
              "| dims | from | memory at 100M | shards within the budget | each shard | build per machine |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        p = on_paper(r, args.budget_mb)
        lines.append(f"| {r['dim']} | {r['size']:,} measured, {r['bytes_per_vector']:.0f} B/vector | "
                     f"{p['memory_mb'] / 1024:,.0f} GB | {p['shards']} | {p['shard_plan'].index_type} "
                     f"{p['shard_plan'].factory}, ~{p['shard_plan'].estimated_bytes / MB / 1024:,.1f} GB | "
                     f"~{p['build_s_per_machine'] / 3600:.1f} h (train ~{p['train_s'] / 60:.0f} min + add "
                     f"~{p['add_s'] / 3600:.1f} h / {p['shards']}) |")
    lines += ["", f"### The planner's choice by size (budget {args.budget_mb:,g} MB, on paper)", "",
              "| vectors | dims | type | factory | estimated size | reason |", "|---|---|---|---|---|---|"]
    for dim in args.dims:
        for size in PLAN_SIZES:
            try:
                plan = plan_index(size, dim, IndexConfig(memory_budget_mb=args.budget_mb))
                lines.append(f"| {size:,} | {dim} | {plan.index_type} | {plan.factory} | "
                             f"{plan.estimated_bytes / MB / 1024:,.1f} GB | {plan.reason} |")
            except IndexConfigError as e:
                lines.append(f"| {size:,} | {dim} | none | - | - | {e} |")
    return "\n".join(lines)

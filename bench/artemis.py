"""ARTEMIS beside the combiner on shapes, with and without its re-rank: what the second base and its two-stage
search give, and what the re-rank costs per query.

    .venv/bin/python bench/artemis.py [--steps 400] [--seeds 0 1 2] [--workdir workdir/bench/artemis]
        [--data workdir/data/shapes] [--doc docs/benchmarks.md]
    .venv/bin/python bench/artemis.py --quick [--workdir DIR] [--doc PATH]   # smoke, tiny model and data

Rows (the demo's model, configs/shapes_demo.yaml: built-in image tower, frozen MiniLM under two trainable blocks):
- combiner: CLIP4Cir's Combiner, QTM (the demo's own model);
- cala-combiner: CaLa's two branches on it (paper loss form);
- artemis: the ARTEMIS composer (models/artemis.py), trained on its exact score;
- cala-artemis: CaLa's branches on ARTEMIS (CaLa's second base in the paper).
Every row trains for --steps optimiser steps (no time limit: rows compare at equal samples seen whatever their
per-step cost, and a busy machine changes the wall time, not the result), one `cirflow train` process per run,
named by its config hash under --workdir so that an interrupted bench resumes. The demo trains for 8.5 minutes
(~1,600 steps on 2 quiet cores); the default 400 steps is a quarter of that, so that 4 rows x 3 seeds fit an
hour: `--steps 1600` is the demo's budget (about 2 hours on 2 quiet cores).

Evaluation, in this process for each run: the test and novel-phrasing splits of the shapes data, every gallery
image and query embedded once (models/evaluation.py), then ranked
- for the combiner rows: by the query vector's cosine, as search ranks them;
- for the ARTEMIS rows: by the folded query vector alone ("N=0", what an index returns), and in two stages, the
  fold's top N re-scored with the exact score (models/rerank.py) for N = 10, 50, 200, and the whole gallery
  ("exact", the brute-force ARTEMIS ranking). The bundle's default N (100) is the row's headline.
Cost of the re-rank, on the exported bundle of the first ARTEMIS run (one ONNX Runtime thread, as the service
runs a request): the query graph with and without its features output, and the re-rank stage at N (N random
candidates' vectors read from a memory-mapped float32 store by id, as VectorStore reads them, the re-ranker, the
sort), median and p99 over the test queries, one query at a time, each stage in its own pass after a warm-up
pass.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from ablation import CLI, cell, run
from report import DOC, machine, today, write_section

from cirflow.export.bundle import export_bundle
from cirflow.export.runtime import BundleRuntime
from cirflow.indexing.search.vector_store import VectorStore
from cirflow.models.checkpoint import load_checkpoint
from cirflow.models.data.loaders import load_split
from cirflow.models.evaluation import (
    EvalSet,
    TorchEncoders,
    build_eval_set,
    embed_eval_set,
    score_embeddings,
)
from cirflow.models.preprocess import normalize_uint8
from cirflow.models.stem_cache import eval_stems
from cirflow.models.tiny import TINY_MODEL
from cirflow.models.tokenizer import encode_texts

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shapes_demo.yaml"
ROWS = {"combiner": ("model.composer.name=combiner", "method.name=base"),
        "cala-combiner": ("model.composer.name=combiner", "method.name=cala"),
        "artemis": ("model.composer.name=artemis", "method.name=base"),
        "cala-artemis": ("model.composer.name=artemis", "method.name=cala")}
SPLITS = {"test": "test", "novel (novel phrasing)": "novel"}
RERANK_N = (0, 10, 50, 200, None)  # 0: the folded vector alone; None: the whole gallery (exact)
HEADLINE_N = 100  # the bundle's default (models.rerank.DEFAULT_RERANK_N)
LATENCY_N = (10, 50, 200)
METRICS = ("R@1", "R@10", "Rsubset@1")


def n_label(n: int | None) -> str:
    return "exact" if n is None else "N=0 (fold only)" if n == 0 else f"N={n}"


def train(args: argparse.Namespace, row: str, seed: int) -> Path:
    """The run's checkpoint (trained now, or found by its config hash)."""
    common = ([f"data.root={args.data}", *TINY_MODEL, "optim.batch_size=16"] if args.quick
              else ["--config", str(CONFIG), f"data.root={args.data}"])
    out = run([*CLI, "train", "--workdir", str(args.workdir), *common, *ROWS[row], f"seed={seed}",
               f"optim.max_steps={args.steps}", "optim.max_minutes=0", "val_every_minutes=0"])
    return Path(out.strip().splitlines()[-1])


def evaluate(checkpoint: Path, args: argparse.Namespace, cache: dict[str, EvalSet]) -> dict[str, Any]:
    """split -> N label -> metrics (one label for a model that does not re-rank)."""
    ckpt = load_checkpoint(checkpoint)
    out: dict[str, Any] = {}
    for label, split_name in SPLITS.items():
        if split_name not in cache:
            cache[split_name] = build_eval_set(load_split("shapes", args.data, split_name), ckpt.config.preprocess)
        data = cache[split_name]
        stems = eval_stems(ckpt.model, data.pixels, [q.caption for q in data.split.queries], ckpt.tokenizer,
                           ckpt.config.preprocess)
        encoders = TorchEncoders(ckpt.model, stems)
        emb = embed_eval_set(encoders, data, ckpt.tokenizer, ckpt.config.preprocess, ("composed",))
        if encoders.reranks:
            out[label] = {n_label(n): score_embeddings(emb, data, ("composed",), rerank_n=n).metrics["composed"]
                          for n in (*RERANK_N[:3], HEADLINE_N, *RERANK_N[3:])}
        else:
            out[label] = {"cosine": score_embeddings(emb, data, ("composed",)).metrics["composed"]}
    return out


def latency(checkpoint: Path, args: argparse.Namespace, data: EvalSet, queries: int) -> dict[str, Any]:
    """Per-query timings (ms) of the exported bundle on one ORT thread: encode with and without the features,
    and the re-rank stage at each N (stored vectors by id + the re-ranker)."""
    # One bundle directory per run: a bench at other --steps must not meet an earlier run's bundle there.
    bundle = export_bundle(checkpoint, args.workdir / f"bundle-{checkpoint.parent.parent.name}")
    runtime = BundleRuntime.load(bundle, providers="cpu", intra_op_threads=1)
    pre = runtime.preprocess
    gallery = runtime.encode_images(normalize_uint8(data.pixels, pre))
    ids = np.arange(len(gallery), dtype=np.int64) * 7 + 1  # catalog ids, sorted
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        np.save(Path(tmp) / "vectors.npy", gallery)
        store = VectorStore([(ids, np.load(Path(tmp) / "vectors.npy", mmap_mode="r"))])
        rng = np.random.default_rng(0)
        inputs = []
        for q in data.split.queries[:queries]:
            pixels = normalize_uint8(data.pixels[[data.names.index(q.reference)]], pre)
            inputs.append((pixels, *encode_texts(runtime.tokenizer, [q.caption])))
        stages = {"encode": lambda x: runtime.encode_queries(*x),
                  "encode with features": lambda x: runtime.encode_queries_with_features(*x)}
        features = [runtime.encode_queries_with_features(*x)[1] for x in inputs]
        for n in LATENCY_N:
            candidates = [ids[rng.choice(len(ids), min(n, len(ids)), replace=False)][None] for _ in inputs]
            stages[f"re-rank N={n}"] = lambda i, c=candidates: np.argsort(
                -runtime.rescore(features[i], store.vectors_of(c[i])), axis=1, kind="stable")
        timings: dict[str, list[float]] = {}
        # Each stage in its own pass over the queries, after a warm-up pass: a stage timed right after another
        # would pay for the caches the other left cold.
        for name, stage in stages.items():
            args_of = inputs if name.startswith("encode") else range(len(inputs))
            for x in args_of:
                stage(x)
            timings[name] = []
            for x in args_of:
                t0 = time.perf_counter()
                stage(x)
                timings[name].append(time.perf_counter() - t0)
    return {name: {"p50": 1000 * statistics.median(v), "p99": 1000 * float(np.percentile(v, 99))}
            for name, v in timings.items()}


def render(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], cost: dict[str, Any],
           command: str) -> str:
    lines = ["## ARTEMIS and its re-rank (shapes)", "",
             f"- date: {today()}; machine: {machine()}",
             f"- command: `{command}`",
             f"- regime: {args.steps} steps per run ({'the tiny model, tiny data: numbers meaningless' if args.quick else 'the demo model, configs/shapes_demo.yaml, batch 256'}); "
             f"seeds {' '.join(map(str, args.seeds))}; mean ± sample std over seeds. The demo trains ~1,600 steps "
             "(8.5 minutes on 2 quiet cores).",
             "- ARTEMIS rows: 'fold' = the folded query vector alone (what the index ranks by); 'N=100' = the "
             "bundle's default two-stage search (the fold's top 100 re-scored exactly); 'exact' = the ARTEMIS "
             "score over the whole gallery. Combiner rows rank by their query vector's cosine.",
             "- method and the meaning of every number: the docstring of bench/artemis.py", ""]
    for split in SPLITS:
        lines += [f"### {split}, composed queries", "",
                  "| row | ranking | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
        for row, results in runs.items():
            for n in results[0][split]:
                values = [cell([r[split][n][m] for r in results]) for m in METRICS]
                lines.append(f"| {row} | {n} | " + " | ".join(values) + " |")
        lines.append("")
    lines += ["### Re-rank gain against N (test split, ARTEMIS rows)", "",
              "Recall of the two-stage ranking minus the fold's alone, mean over seeds:", "",
              "| row | N | R@1 gained | R@10 gained |", "|---|---|---|---|"]
    for row in (r for r in runs if "artemis" in r):
        for n in (*RERANK_N[1:3], HEADLINE_N, *RERANK_N[3:]):
            gains = [statistics.fmean(r["test"][n_label(n)][m] - r["test"][n_label(0)][m] for r in runs[row])
                     for m in ("R@1", "R@10")]
            lines.append(f"| {row} | {n_label(n)} | {gains[0]:+.3f} | {gains[1]:+.3f} |")
    lines += ["", f"### Cost per query (bundle of {cost['run']}, 1 ORT thread, {cost['queries']} test queries, "
                  "one at a time)", "", "| stage | p50 ms | p99 ms |", "|---|---|---|"]
    for name, t in cost["timings"].items():
        lines.append(f"| {name} | {t['p50']:.3f} | {t['p99']:.3f} |")
    extra = cost["timings"]["encode with features"]["p50"] - cost["timings"]["encode"]["p50"]
    lines += ["", f"The features output adds {extra:+.3f} ms to the query graph's p50; the re-rank stage adds the "
                  "rows above (the index's own search of N instead of k is extra, and small beside them for a "
                  "flat or HNSW index)."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="optimiser steps per run (default 400; --quick: 3)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, help="default workdir/bench/artemis (--quick: ...-quick)")
    parser.add_argument("--data", type=Path, help="shapes data (generated when missing; default "
                                                 "workdir/data/shapes, --quick: a tiny one)")
    parser.add_argument("--doc", type=Path, help="default docs/benchmarks.md (--quick: WORKDIR/artemis-quick.md)")
    parser.add_argument("--latency-queries", type=int, default=300, help="test queries timed one at a time")
    parser.add_argument("--quick", action="store_true", help="smoke: tiny model and data, 1 seed, 3 steps")
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "bench/artemis.py", *sys.argv[1:]])
    if args.quick:
        args.steps, args.seeds = args.steps or 3, args.seeds[:1]
        args.workdir = args.workdir or Path("workdir/bench/artemis-quick")
        args.data = args.data or args.workdir / "data"
        args.doc = args.doc or args.workdir / "artemis-quick.md"
        args.latency_queries = min(args.latency_queries, 20)
    args.steps = args.steps or 400
    args.workdir = (args.workdir or Path("workdir/bench/artemis")).resolve()
    args.data = (args.data or Path("workdir/data/shapes")).resolve()
    args.doc = args.doc or DOC
    args.workdir.mkdir(parents=True, exist_ok=True)
    run([*CLI, "data", "shapes", "--out", str(args.data), *(["--scale", "0.02"] if args.quick else [])])
    cache: dict[str, EvalSet] = {}
    runs: dict[str, list[dict[str, Any]]] = {row: [] for row in ROWS}
    first_artemis = None
    started = time.monotonic()
    for seed in args.seeds:  # seed-major: each pass is a whole comparison
        for row in ROWS:
            checkpoint = train(args, row, seed)
            result = evaluate(checkpoint, args, cache)
            runs[row].append(result)
            first_artemis = first_artemis or (checkpoint if row == "artemis" else None)
            best = max(result["test"].values(), key=lambda m: m["R@1"])
            print(f"{row} seed {seed}: test R@1 {json.dumps({n: round(m['R@1'], 3) for n, m in result['test'].items()})}"
                  f" (best {best['R@1']:.3f}); {(time.monotonic() - started) / 60:.1f} min", flush=True)
    assert first_artemis is not None
    cost = {"run": first_artemis.parent.parent.name, "queries": args.latency_queries,
            "timings": latency(first_artemis, args, cache["test"], args.latency_queries)}
    write_section("artemis", render(args, runs, cost, command), args.doc)
    print(f"wrote the artemis section to {args.doc}", flush=True)
    return 0 if all(math.isfinite(v) for r in runs.values() for x in r for s in x.values() for m in s.values()
                    for v in m.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

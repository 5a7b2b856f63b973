"""Method ablation on shapes: base, CaLa (TBIA, CTR, both), DRA, TMCIR (ATF theta sweep + oracle IACMA).

    .venv/bin/python bench/ablation.py [--steps 200] [--seeds 0 1 2] [--thetas 0.1 0.3 0.5]
        [--iacma-fraction 0.25] [--max-train-queries 0] [--workdir workdir/ablation]
        [--data workdir/data/shapes] [--doc docs/benchmarks.md] [--backbone tiny|effnet-minilm]
    .venv/bin/python bench/ablation.py --quick [--workdir DIR] [--doc PATH] [--no-in-process]   # smoke, ~15 s

Every row trains the default model (batch 256) for the same number of optimiser steps, so rows compare at
equal samples seen whatever their per-step cost; samples/s and training minutes are reported beside the
metrics so the cost is visible. TMCIR's IACMA stage counts within the budget: it takes `--iacma-fraction` of
the steps and ATF training the rest (same total steps, same samples). Every other row keeps the default
composer (combiner); TMCIR rows use ATF. IACMA runs with the oracle generator (the true target image as the
pseudo-target), so every TMCIR row is an UPPER BOUND, labelled so wherever it appears.

Regime: the demo's budget nearly saturates shapes (base val R@1 ~0.78 after ~460 steps), which hides the
differences between methods; at the default `--steps 200` (~1 min per base run on 2 quiet cores) base
val R@1 is ~0.60, inside the 0.4-0.7 band where methods can move it either way. `--max-train-queries` shrinks
the training set instead (the same for every row). The default bench is 9 rows x 3 seeds = 27 runs, about 40
minutes on 2 quiet cores (39 measured on 2026-12-06; an estimate is printed at the start and refined after each
run).

`--backbone effnet-minilm` runs the same rows on the pretrained backbone (ImageNet EfficientNet-Lite0, frozen as
BLIP2Cir freezes its ViT, and all-MiniLM-L6-v2, frozen under a trainable two-block neck: BACKBONE_OVERRIDES) into
its own section ("ablation-effnet-minilm"), to answer whether the training-only branches help once the encoders
start pretrained. The towers' new layers (projections, necks) are what the branches' gradients reach there.

Each run is a `cirflow train` process (final validation only) and a `cirflow eval` on test and novel-phrasing
test, so that each run's speed and memory are its own. `--quick` runs those commands inside the bench's process
instead (`--no-in-process` gives them their processes back): its runs take about a second each, while a process
start and torch import for each of its 19 commands took 2 s each on 2 quiet cores (10-15 s on busy ones). Runs are
named by their config hash in the workdir, so an interrupted bench resumes where it stopped (delete the workdir
to redo it). Results go to the "ablation" section of --doc: mean +- std over seeds (sample
std), and a reading paragraph generated from the numbers. `--quick` trains every row for 3 steps on a tiny
model and a tiny dataset (1 seed) and writes to <workdir>/ablation-quick.md unless --doc is given.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from report import DOC, machine, today, write_section

from cirflow.core.config import load_config
from cirflow.models.tiny import TINY_MODEL  # --quick's model, the one the test suite trains
from cirflow.models.train_config import TrainConfig

PROGRAM = [sys.executable, "-m", "cirflow.flows.cli"]
CLI = [*PROGRAM, "--log-level", "WARNING"]
SPLITS = {"test": "shapes/test", "novel (novel phrasing)": "shapes/novel"}
METRICS = ("R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3", "Avg")
UPPER_BOUND = "UPPER BOUND (oracle IACMA)"
# Time estimate only: base speed of the default model on 2 quiet cores, per-run decoding/validation/eval time,
# and guessed per-step slowdowns of the methods' extra branches (HCA, TAC x4 x2, ATF); refined as runs finish.
BASE_SAMPLES_PER_S = 1300.0  # measured on 2026-12-06
OVERHEAD_S = {"full": 40.0, "quick": 8.0}
# The pretrained regime of `--backbone effnet-minilm`: both pretrained networks frozen (their outputs computed once
# per run, models/stem_cache.py), the new layers over them trained: the image tower's GridNeck, two transformer
# blocks over MiniLM's tokens, the projections; at 96 px (a 3x3 grid of EfficientNet cells; 64 px gives 2x2, too
# coarse for positions) and lr 1e-3, as bench/backbones.py's em-frozen96 measured it. Adapters or fine-tuning
# MiniLM run at ~170 samples/s on 2 cores, which would not fit 27 runs into 90 minutes.
BACKBONE_OVERRIDES = {
    "tiny": (),
    "effnet-minilm": ("model.backbone.name=effnet-minilm", "model.backbone.image.train=frozen",
                      "model.backbone.text.train=frozen", "model.backbone.text_neck_layers=2",
                      "model.image.image_size=96", "preprocess.size=96", "optim.lr=1e-3"),
}
SLOWDOWN = {"base": 1.0, "cala-tbia": 1.2, "cala-ctr": 1.3, "cala": 1.5, "dra": 1.4, "tmcir": 1.15}


@dataclass(frozen=True)
class Row:
    name: str
    overrides: tuple[str, ...]
    slowdown: float
    upper_bound: bool = False

    @property
    def label(self) -> str:
        return f"{self.name} **{UPPER_BOUND}**" if self.upper_bound else self.name


def build_rows(steps: int, thetas: list[float], iacma_fraction: float) -> list[Row]:
    iacma = max(1, round(iacma_fraction * steps))
    if iacma >= steps:
        raise ValueError(f"--iacma-fraction {iacma_fraction} leaves no ATF steps out of {steps}")
    rows = [Row("base", ("method.name=base",), SLOWDOWN["base"]),
            Row("cala-tbia", ("method.name=cala", "method.ctr=false"), SLOWDOWN["cala-tbia"]),
            Row("cala-ctr", ("method.name=cala", "method.tbia=false"), SLOWDOWN["cala-ctr"]),
            Row("cala", ("method.name=cala",), SLOWDOWN["cala"]),
            Row("dra", ("method.name=dra",), SLOWDOWN["dra"]),
            # ATF alone (no IACMA) at the middle threshold: separates the composer's effect from the oracle's.
            Row(f"atf{thetas[len(thetas) // 2]:g}", ("method.name=base", "model.composer.name=atf",
                                                  f"model.composer.atf_threshold={thetas[len(thetas) // 2]:g}"),
                SLOWDOWN["tmcir"])]
    for theta in thetas:
        # IACMA's steps come out of the same budget: optim.max_steps (the ATF stage) is what is left.
        rows.append(Row(f"tmcir-atf{theta:g}", (
            "method.name=tmcir", "model.composer.name=atf", f"model.composer.atf_threshold={theta:g}",
            "method.generator=oracle", f"method.iacma_steps={iacma}", f"optim.max_steps={steps - iacma}"),
            SLOWDOWN["tmcir"], upper_bound=True))
    return rows


def run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    print("+", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc.stdout


def run_in_process(cmd: list[str]) -> str:
    """`run` for a `cirflow` command (CLI + its arguments), executed by this process's interpreter."""
    from cirflow.flows.cli import main as cirflow_main

    print("+ (in process)", shlex.join(cmd), flush=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cirflow_main(cmd[len(PROGRAM):])
    if code:
        raise subprocess.CalledProcessError(code, cmd, out.getvalue())
    return out.getvalue()


def train_and_eval(common: list[str], row: Row, seed: int, workdir: Path, started: float,
                   cirflow: Callable[[list[str]], str]) -> dict:
    """One run: train (or reuse the config-hashed run), evaluate; returns its metrics and costs.
    `cirflow` runs a command (`run` or `run_in_process`)."""
    ckpt = cirflow([*CLI, "train", "--workdir", str(workdir), *common, *row.overrides,
                    f"seed={seed}"]).strip().splitlines()[-1]
    run_dir = Path(ckpt).parent.parent
    eval_path = run_dir / "eval" / "metrics.json"
    if not eval_path.exists():
        cirflow([*CLI, "eval", "--checkpoint", ckpt])
    train_metrics = json.loads((run_dir / "metrics.json").read_text())
    results = json.loads(eval_path.read_text())["results"]
    missing = [s for s in SPLITS.values() if s not in results]
    if missing:
        raise ValueError(f"{eval_path} lacks splits {missing}; it has {sorted(results)}")
    return {"results": results, "samples_per_s": train_metrics["samples_per_s"],
            "train_minutes": train_metrics["train_seconds"] / 60, "wall_minutes": train_metrics["wall_seconds"] / 60,
            "method": train_metrics["method"],
            "reused": (run_dir / "metrics.json").stat().st_mtime < started, "run_dir": str(run_dir)}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std; std is NaN for a single seed (no noise estimate)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def cell(values: list[float], digits: int = 3) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def reading(rows: list[Row], runs: dict[str, list[dict]]) -> list[str]:
    """Each row's test R@1 and Rsubset@1 difference to base, against the larger of the two rows' seed std."""
    def values(name: str, metric: str) -> list[float]:
        return [r["results"][SPLITS["test"]]["composed"][metric] for r in runs[name]]

    lines = ["Generated from the numbers above (test split, composed queries; \"noise\" = the larger of the two "
             "rows' seed std):", ""]
    for row in rows[1:]:
        parts = []
        for metric in ("R@1", "Rsubset@1"):
            (m, s), (m0, s0) = mean_std(values(row.name, metric)), mean_std(values("base", metric))
            stds = [x for x in (s, s0) if not math.isnan(x)]  # a one-seed row has no std of its own
            noise = max(stds) if stds else math.nan
            if math.isnan(noise):
                verdict = "one seed, no noise estimate"
            elif abs(m - m0) > noise:
                verdict = f"exceeds seed noise ({noise:.3f})"
            else:
                verdict = f"within seed noise ({noise:.3f})"
            parts.append(f"{metric} {m - m0:+.3f} ({m:.3f} vs {m0:.3f}), {verdict}")
        lines.append(f"- {row.label}: " + "; ".join(parts) + ".")
    return lines


def render(args: argparse.Namespace, rows: list[Row], runs: dict[str, list[dict]], batch: int,
           command: str) -> str:
    regime = (f"{args.steps} steps x batch {batch} = {args.steps * batch} samples per row, "
              f"{'all' if not args.max_train_queries else args.max_train_queries} training triplets")
    title = "" if args.backbone == "tiny" else f", pretrained backbone {args.backbone}"
    lines = [f"## Method ablation (shapes{title})", "",
             f"- date: {today()}; machine: {machine()}",
             f"- command: `{command}`",
             f"- regime: {regime}; seeds {' '.join(map(str, args.seeds))}; mean ± sample std over seeds. "
             "The demo's budget nearly saturates shapes, so the rows train far less: base R@1 between 0.4 and "
             "0.7 leaves room for a method to move it either way (`--steps`, `--max-train-queries`).",
             f"- equal budget in steps (`optim.max_steps`, no time limit), final validation only. TMCIR rows: "
             f"IACMA takes {args.iacma_fraction:g} of the steps out of the same budget, ATF the rest; rows "
             "other than TMCIR use the default composer (combiner). Each TMCIR stage has its own warmup "
             "(`optim.warmup_steps`) and cosine schedule, so a short IACMA stage never reaches the peak rate.",
             f"- TMCIR rows use the oracle pseudo-target generator (the true target image): "
             f"**{UPPER_BOUND}**, not a reproduction of TMCIR.",
             "- DRA is our reconstruction (no official code).",
             f"- backbone: {args.backbone}"
             + (f" (`{' '.join(BACKBONE_OVERRIDES[args.backbone])}`)" if BACKBONE_OVERRIDES[args.backbone] else
                " (the built-in model, trained from scratch)"), ""]
    for title, split in SPLITS.items():
        lines += [f"### {title}, composed queries", "",
                  "| row | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        for row in rows:
            cells = [cell([r["results"][split]["composed"][m] for r in runs[row.name]]) for m in METRICS]
            lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### Cost and row definitions", "",
              "Samples/s are wall-clock rates of the optimisation loop: other jobs on the cores lower them, so the "
              "table gives the median over seeds and the best seed (the least disturbed run).", "",
              "| row | training samples/s, median (best) | train minutes | train process wall minutes | method | overrides |",
              "|---|---|---|---|---|---|"]
    for row in rows:
        rs = runs[row.name]
        speeds = [r["samples_per_s"] for r in rs]
        lines.append(f"| {row.label} | {statistics.median(speeds):.0f} ({max(speeds):.0f}) | "
                     f"{cell([r['train_minutes'] for r in rs], 2)} | {cell([r['wall_minutes'] for r in rs], 2)} | "
                     f"{rs[0]['method']} | "
                     f"`{' '.join(row.overrides)}` |")
    lines += ["", "### Reading (generated)", "", *reading(rows, runs)]
    base_r1 = mean_std([r["results"][SPLITS["test"]]["composed"]["R@1"] for r in runs["base"]])[0]
    if not args.quick and not 0.4 <= base_r1 <= 0.7:
        lines += ["", f"Note: base test R@1 {base_r1:.3f} lies outside the intended 0.4-0.7 regime; "
                  "adjust --steps or --max-train-queries."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="optimiser steps per row (default 200; --quick: 3)")
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (--quick: 0)")
    parser.add_argument("--thetas", type=float, nargs="+", default=[0.1, 0.3, 0.5], help="ATF thresholds")
    parser.add_argument("--iacma-fraction", type=float, default=0.25, help="share of the steps given to IACMA")
    parser.add_argument("--max-train-queries", type=int, default=0, help="0 = every training triplet")
    parser.add_argument("--workdir", type=Path, help="default workdir/ablation (--quick: workdir/ablation-quick)")
    parser.add_argument("--data", type=Path, help="default workdir/data/shapes (--quick: WORKDIR/data/shapes-x0.02)")
    parser.add_argument("--doc", type=Path, help="default docs/benchmarks.md (--quick: WORKDIR/ablation-quick.md)")
    parser.add_argument("--backbone", choices=sorted(BACKBONE_OVERRIDES), default="tiny",
                        help="tiny: the built-in model; effnet-minilm: the pretrained regime (its own doc section)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model and data, 1 seed, 3 steps")
    parser.add_argument("--in-process", action=argparse.BooleanOptionalAction,
                        help="run the cirflow commands in this process, not one process each (default: --quick)")
    args = parser.parse_args(argv)
    args.in_process = args.quick if args.in_process is None else args.in_process
    args.steps = args.steps or (3 if args.quick else 200)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.workdir = args.workdir or Path("workdir/ablation-quick" if args.quick else "workdir/ablation")
    args.data = args.data or (args.workdir / "data" / "shapes-x0.02" if args.quick else Path("workdir/data/shapes"))
    args.doc = args.doc or (args.workdir / "ablation-quick.md" if args.quick else DOC)
    if args.steps < 2:
        raise SystemExit(f"--steps must be >= 2 (IACMA and ATF each need a step), got {args.steps}")
    return args


def common_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides every row shares: data, budget, and for --quick the tiny model."""
    common = [f"data.root={args.data}", "optim.max_minutes=0", "val_every_minutes=0",
              f"data.max_train_queries={args.max_train_queries}", f"optim.max_steps={args.steps}",
              *BACKBONE_OVERRIDES[args.backbone]]
    if args.backbone != "tiny":  # every row shares the frozen towers' outputs: computed by the first run only
        common.append(f"stem_cache_dir={args.workdir / 'stems'}")
    return [*TINY_MODEL, *common] if args.quick else common


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = shlex.join([".venv/bin/python", "bench/ablation.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.time()
    common = common_overrides(args)
    rows = build_rows(args.steps, args.thetas, args.iacma_fraction)
    # Every row's config is loaded before anything runs, so a bad override fails now and not after an hour.
    configs = {row.name: load_config(TrainConfig, None, [*common, *row.overrides]) for row in rows}
    batch = configs[rows[0].name].optim.batch_size  # no row overrides it; for the estimate and the report
    # --quick's 0.02 scale: 40 test queries, so galleries exceed the 50 images that R@50 needs (0.01 falls short).
    env = None  # full runs: torch's default threads (every core), as the speed figures assume
    if args.quick:
        # One thread: a tiny model gains nothing from two, and on cores busy with other jobs two spinning
        # OpenMP threads made each step ~80x slower (3.4 s instead of 0.04 s, measured).
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if args.in_process:
            import torch

            torch.set_num_threads(1)
    cirflow = run_in_process if args.in_process else functools.partial(run, env=env)
    cirflow([*CLI, "data", "shapes", "--out", str(args.data), *(["--scale", "0.02"] if args.quick else [])])
    jobs = [(seed, row) for seed in args.seeds for row in rows]  # seed-major: each pass is a full comparison
    overhead = OVERHEAD_S["quick" if args.quick else "full"]
    rate = math.inf if args.quick else BASE_SAMPLES_PER_S
    estimates = [args.steps * batch / rate * row.slowdown + overhead for _, row in jobs]
    print(f"ablation: {len(rows)} rows x {len(args.seeds)} seeds = {len(jobs)} runs of {args.steps} steps; "
          f"estimated {sum(estimates) / 60:.0f} min on 2 quiet cores "
          f"(~{BASE_SAMPLES_PER_S:.0f} samples/s for base, {overhead:.0f} s of decoding/eval per run)", flush=True)
    load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    if not args.quick and load > 0.5:
        print(f"warning: load average {load:.1f} on {cores} cores before starting; other jobs skew samples/s "
              "and oversubscribed torch threads can slow steps many times over", flush=True)

    runs: dict[str, list[dict]] = {row.name: [] for row in rows}
    spent = estimated = 0.0  # over the runs actually trained here (reused runs take seconds)
    for i, (seed, row) in enumerate(jobs):
        t0 = time.monotonic()
        result = train_and_eval(common, row, seed, args.workdir, started, cirflow)
        runs[row.name].append(result)
        elapsed = time.monotonic() - t0
        if not result["reused"]:
            spent, estimated = spent + elapsed, estimated + estimates[i]
        left = sum(estimates[i + 1:]) * (spent / estimated if estimated else 1.0)
        r1 = result["results"][SPLITS["test"]]["composed"]["R@1"]
        print(f"[{i + 1}/{len(jobs)}] {row.label} seed {seed}: {elapsed / 60:.1f} min"
              f"{' (reused)' if result['reused'] else ''}, {result['samples_per_s']:.0f} samples/s, "
              f"test R@1 {r1:.3f}; total {(time.time() - started) / 60:.1f} min, ~{left / 60:.0f} min left",
              flush=True)

    body = render(args, rows, runs, batch, command)
    write_section("ablation" if args.backbone == "tiny" else f"ablation-{args.backbone}", body, args.doc)
    print(body)
    print(f"wrote the ablation section to {args.doc} in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()

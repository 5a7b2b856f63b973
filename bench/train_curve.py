"""Composed R@1 against training minutes on shapes, plus the demo run's speed and memory.

    .venv/bin/python bench/train_curve.py [--minutes 2 5 9] [--workdir workdir/bench]

Each budget is a separate `cirflow train` process (its own cosine schedule, its own peak RSS) followed by
`cirflow eval` on test and novel. The largest budget is the demo's configuration. Results go to the
"train_curve" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from report import machine, today, write_section

from cirflow.flows.demo import DEMO_MODEL

CLI = [sys.executable, "-m", "cirflow.flows.cli", "--log-level", "WARNING"]


def run(cmd: list[str]) -> str:
    print("+", shlex.join(cmd), flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[2.0, 5.0, 8.5])
    parser.add_argument("--workdir", type=Path, default=Path("workdir"))
    parser.add_argument("--data", type=Path, default=Path("workdir/data/shapes"))
    args = parser.parse_args()
    run([*CLI, "data", "shapes", "--out", str(args.data)])
    rows = []
    for minutes in args.minutes:
        # Runs are named by their config hash, so the demo's finished run (same config) is reused, not redone.
        ckpt = run([*CLI, "train", "--workdir", str(args.workdir), *DEMO_MODEL, f"data.root={args.data}",
                    f"optim.max_minutes={minutes:g}"]).strip().splitlines()[-1]
        run_dir = Path(ckpt).parent.parent
        if not (run_dir / "eval" / "metrics.json").exists():
            run([*CLI, "eval", "--checkpoint", ckpt])
        train_metrics = json.loads((run_dir / "metrics.json").read_text())
        results = json.loads((run_dir / "eval" / "metrics.json").read_text())["results"]
        rows.append((minutes, train_metrics["wall_seconds"], train_metrics, results))

    lines = ["## Training curve and demo run (shapes, the demo's model)", "",
             f"- model: `{' '.join(DEMO_MODEL)}` (flows/demo.py DEMO_MODEL)",
             f"- date: {today()}; machine: {machine()}",
             f"- command: `.venv/bin/python bench/train_curve.py --minutes {' '.join(f'{m:g}' for m in args.minutes)}`",
             "- each row is its own run with that optimisation budget (own cosine schedule); wall = the whole "
             "`cirflow train` process (data decoding and periodic validation included)", "",
             "| budget (min) | wall (min) | samples/s | peak RSS (MB) | test R@1 | test Rsubset@1 | test Avg "
             "| novel R@1 | novel Rsubset@1 |", "|---|---|---|---|---|---|---|---|---|"]
    for minutes, wall, tm, res in rows:
        t, n = res["shapes/test"]["composed"], res["shapes/novel"]["composed"]
        lines.append(f"| {minutes:g} | {wall / 60:.1f} | {tm['samples_per_s']:.0f} | {tm['peak_rss_mb']:.0f} | "
                     f"{t['R@1']:.3f} | {t['Rsubset@1']:.3f} | {t['Avg']:.3f} | {n['R@1']:.3f} | "
                     f"{n['Rsubset@1']:.3f} |")
    minutes, wall, tm, res = rows[-1]
    lines += ["", f"### The {minutes:g}-minute run in full (the demo's configuration)", ""]
    for split in ("shapes/test", "shapes/novel"):
        lines += [f"{split}:", "", "| query | R@1 | R@5 | R@10 | R@50 | Rsubset@1 | Rsubset@2 | Rsubset@3 | Avg |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for mode, m in res[split].items():
            lines.append(f"| {mode} | " + " | ".join(f"{m[k]:.3f}" for k in
                         ("R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3", "Avg")) + " |")
        lines.append("")
    write_section("train_curve", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""The `cirflow` command line: one subcommand per job; each parses arguments and calls one entry point.

Stage modules are imported inside each subcommand so that `cirflow --help` stays fast and a subcommand
loads only what it uses.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cirflow", description="Composed image retrieval pipeline")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="generate built-in datasets").add_subparsers(dest="dataset", required=True)
    shapes = data.add_parser("shapes", help="the built-in shapes CIR benchmark, in CIRR format")
    shapes.add_argument("--out", type=Path, required=True)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--scale", type=float, default=1.0)
    shapes.add_argument("--workers", type=int, default=2)

    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("--config", type=Path, help="YAML file (defaults: models.train_config.TrainConfig)")
    train.add_argument("--workdir", type=Path, default=Path("workdir"))
    train.add_argument("--run-id", help="run directory name under WORKDIR/runs (default: from the config hash)")
    train.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. optim.max_minutes=2")

    ev = sub.add_parser("eval", help="evaluate a checkpoint (metrics.json, tables, example sheets)")
    ev.add_argument("--checkpoint", type=Path, required=True)
    ev.add_argument("--out", type=Path, help="output directory (default: beside the checkpoint's run, eval/)")
    ev.add_argument("--kind", help="dataset kind (default: the training one); 'fashioniq' = all categories")
    ev.add_argument("--root", type=Path, help="dataset directory (default: the training one)")
    ev.add_argument("--splits", help="comma-separated splits (default: the config's eval_splits)")

    demo = sub.add_parser("demo", help="the main job end to end on the built-in shapes benchmark")
    demo.add_argument("--workdir", type=Path, default=Path("workdir"))
    demo.add_argument("--config", type=Path, help="training YAML (default: built-in defaults)")
    demo.add_argument("--scale", type=float, default=1.0, help="shapes dataset scale")
    demo.add_argument("overrides", nargs="*", help="training key.path=value overrides")

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except (ValueError, FileNotFoundError) as e:
        # Bad input (config, dataset, checkpoint): one clear line, no traceback.
        logging.getLogger("cirflow").error("%s", e)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "data":
        from models.data.shapes import ShapesConfig, generate_shapes

        generate_shapes(ShapesConfig(seed=args.seed, scale=args.scale, workers=args.workers), args.out)
        print(args.out)
    elif args.command == "train":
        from flows.demo import train_run

        print(train_run(args.config, args.overrides, args.workdir, args.run_id))
    elif args.command == "eval":
        from models.eval_job import EvalJobConfig, run_eval

        out = args.out or args.checkpoint.parent.parent / "eval"
        splits = tuple(s for s in (args.splits or "").split(",") if s)
        run_eval(EvalJobConfig(args.checkpoint, out, args.kind, args.root, splits))
    elif args.command == "demo":
        from flows.demo import DemoConfig, run_demo

        run_demo(DemoConfig(args.workdir, args.config, args.scale, tuple(args.overrides)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

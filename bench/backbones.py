"""Backbones and text-tower policies on shapes: test and novel-phrasing R@1, per edit kind, at one budget.

    .venv/bin/python bench/backbones.py [--variants tiny tm-frozen ...] [--minutes 8.5] [--workdir workdir/backbones]

Each variant is `cirflow train` with the training defaults (models/train_config.py: combiner, batch 256, lr 2e-3,
the built-in tiny backbone) plus the variant's overrides and the same optimisation budget in minutes (the demo's
8.5 by default), then
`cirflow eval` on test and novel with the image-only and text-only baselines and R@1 per edit kind. Runs are
named by variant in the workdir, so a rerun reuses finished variants. The question: what does a pretrained text
tower keep of what it knew (the novel split's words never enter training data or vocabulary), frozen, gently
fine-tuned or through adapters, and what does it cost on test? Results go to the "backbones" section of
docs/benchmarks.md.

A probe beside the table asks the same of the text towers alone: where does a novel caption's own
training-phrasing paraphrase rank among all test captions by cosine (median rank; chance is half the split)?
Measured on raw MiniLM (the mean-pooled sentence vector the frozen variants read) and on each trained model's
text vector (the text-only query): how much of the paraphrase structure a tower has, before and after training
on the templates. Paraphrases do not always name the same attributes (a novel caption may name an object by its
position where the test caption names its colour), so even a perfect reader would not rank every one first.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from report import DOC, machine, today, write_section

from cirflow.models.backbones.towers import masked_mean
from cirflow.models.checkpoint import LoadedCheckpoint, load_checkpoint
from cirflow.models.data.loaders import load_split
from cirflow.models.eval_job import shapes_edit_kinds
from cirflow.models.tokenizer import encode_texts

CLI = [sys.executable, "-m", "cirflow.flows.cli", "--log-level", "WARNING"]
KINDS = ("add", "remove", "colour", "shape", "size", "move")
MINILM = "model.backbone.name=tiny-minilm"
VARIANTS: dict[str, tuple[str, ...]] = {
    "tiny": (),
    "tm-frozen": (MINILM, "model.backbone.text.train=frozen"),
    "tm-neck2": (MINILM, "model.backbone.text.train=frozen", "model.backbone.text_neck_layers=2"),
    "tm-neck2-noise": (MINILM, "model.backbone.text.train=frozen", "model.backbone.text_neck_layers=2",
                       "loss.text_noise=1.0"),
    # Run while other jobs shared the cores, so at a step budget: the steps tm-neck2-noise reached in 8.5 minutes.
    "tm-neck2-noise-keep": (MINILM, "model.backbone.text.train=frozen", "model.backbone.text_neck_layers=2",
                            "loss.text_noise=1.0", "loss.text_keep=1.0", "optim.max_minutes=0",
                            "optim.max_steps=1660"),
    "tm-adapter": (MINILM, "model.backbone.text.train=adapter"),
    "tm-gentle": (MINILM, "model.backbone.text.train=full", "model.backbone.text.lr_scale=0.1"),
    "em-frozen96": ("model.backbone.name=effnet-minilm", "model.backbone.image.train=frozen",
                    "model.backbone.text.train=frozen", "model.image.image_size=96", "preprocess.size=96",
                    "optim.lr=1e-3"),
}
DESCRIPTIONS = {
    "tiny": "built-in towers from scratch (the code default; the demo's model until 2026-11-29)",
    "tm-frozen": "built-in image tower + MiniLM frozen (linear projections of its tokens and mean-pooled vector)",
    "tm-neck2": "as tm-frozen + 2 trainable transformer blocks over MiniLM's tokens",
    "tm-neck2-noise": "as tm-neck2, with Gaussian noise (1x their RMS) on MiniLM's outputs in training",
    "tm-neck2-noise-keep": "as tm-neck2-noise, plus loss.text_keep=1 (the text vectors keep MiniLM's in-batch "
                           "similarity structure); 1660 steps, not minutes",
    "tm-adapter": "built-in image tower + MiniLM with bottleneck adapters (pretrained weights frozen)",
    "tm-gentle": "built-in image tower + MiniLM fully fine-tuned at 0.1x the learning rate",
    "em-frozen96": "EfficientNet-Lite0 (96 px) and MiniLM, both frozen; GridNeck + projections train",
}


def run(cmd: list[str]) -> str:
    print("+", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc.stdout


def train_and_eval(name: str, overrides: tuple[str, ...], args: argparse.Namespace) -> dict:
    ckpt = run([*CLI, "train", "--workdir", str(args.workdir), "--run-id", name,
                f"data.root={args.data}", f"optim.max_minutes={args.minutes}", *overrides]).strip().splitlines()[-1]
    run_dir = Path(ckpt).parent.parent
    eval_path = run_dir / "eval" / "metrics.json"
    if not eval_path.exists() or "by_edit_kind" not in json.loads(eval_path.read_text()):
        run([*CLI, "eval", "--checkpoint", ckpt, "--out", str(eval_path.parent)])
    return {"eval": json.loads(eval_path.read_text()), "train": json.loads((run_dir / "metrics.json").read_text()),
            "checkpoint": ckpt}


@torch.inference_mode()
def text_vectors(loaded: LoadedCheckpoint, captions: list[str], raw: bool, batch_size: int = 256) -> np.ndarray:
    """Unit vectors of the captions: the trained model's text vector, or (raw) the mean of its frozen MiniLM
    stem's token states, which is the pretrained sentence vector itself."""
    model, out = loaded.model.eval(), []
    for i in range(0, len(captions), batch_size):
        ids, mask = (torch.from_numpy(a) for a in encode_texts(loaded.tokenizer, captions[i:i + batch_size]))
        vectors = masked_mean(model.text_encoder.stem(ids, mask), mask) if raw else model.encode_text(ids, mask)
        out.append(torch.nn.functional.normalize(vectors, dim=-1).numpy())
    return np.concatenate(out)


def paraphrase_probe(data: Path, towers: dict[str, tuple[str, bool]]) -> tuple[int, dict[str, dict[str, float]]]:
    """(test captions, tower name -> median rank (1 = nearest) of each novel caption's own training-phrasing
    paraphrase among all test captions by cosine, overall and per edit kind). towers: name -> (checkpoint,
    raw)."""
    test, novel = (load_split("shapes", data, split) for split in ("test", "novel"))
    if [q.pair_id for q in test.queries] != [q.pair_id for q in novel.queries]:
        raise SystemExit(f"{data}: the test and novel splits do not hold the same queries in the same order")
    kinds = np.array([(shapes_edit_kinds(data, "novel") or {}).get(q.pair_id, "") for q in novel.queries])
    results = {}
    for name, (checkpoint, raw) in towers.items():
        loaded = load_checkpoint(Path(checkpoint))
        t = text_vectors(loaded, [q.caption for q in test.queries], raw)
        n = text_vectors(loaded, [q.caption for q in novel.queries], raw)
        scores = n @ t.T
        own = scores[np.arange(len(n)), np.arange(len(n))]
        ranks = 1 + (scores > own[:, None]).sum(1)
        results[name] = {"all": float(np.median(ranks)),
                         **{k: float(np.median(ranks[kinds == k])) for k in KINDS if (kinds == k).any()}}
    return len(test.queries), results


def render(args: argparse.Namespace, results: dict[str, dict], probe: tuple[int, dict[str, dict[str, float]]],
           command: str) -> str:
    lines = ["## Backbones and text-tower policies (shapes)", "",
             f"- date: {today()}; machine: {machine()}",
             f"- command: `{command}`",
             f"- budget: {args.minutes:g} minutes of optimisation per variant (a variant that names "
             "optim.max_steps trains that many steps instead), the training defaults otherwise "
             "(combiner, batch 256, lr 2e-3, 20k training triplets); frozen stems are computed once before the "
             "budget starts (their time is in the wall minutes).",
             "- samples/s and wall minutes are wall-clock figures: some runs shared the 2 cores with other jobs "
             "(em-frozen96's frozen EfficientNet stems took most of its 27 minutes that way), so compare R@1, "
             "not speed, across rows.",
             "- novel = the test queries re-captioned with a disjoint vocabulary and sentence shapes; its words "
             "never enter training data, vocabularies or prompts. Image-only is the same for test and novel.", "",
             "| variant | test R@1 | novel R@1 | novel image-only R@1 | novel - image-only | test Rsubset@1 | "
             "novel Rsubset@1 | samples/s | wall minutes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        res = r["eval"]["results"]
        test, novel = res["shapes/test"], res["shapes/novel"]
        lines.append(f"| {name} | {test['composed']['R@1']:.3f} | {novel['composed']['R@1']:.3f} | "
                     f"{novel['image-only']['R@1']:.3f} | "
                     f"{novel['composed']['R@1'] - novel['image-only']['R@1']:+.3f} | "
                     f"{test['composed']['Rsubset@1']:.3f} | {novel['composed']['Rsubset@1']:.3f} | "
                     f"{r['train']['samples_per_s']:.0f} | {r['train']['wall_seconds'] / 60:.1f} |")
    for split in ("shapes/test", "shapes/novel"):
        lines += ["", f"### {split}: composed R@1 per edit kind (image-only in brackets)", "",
                  "| variant | " + " | ".join(KINDS) + " |", "|---|" + "---:|" * len(KINDS)]
        for name, r in results.items():
            kinds = r["eval"]["by_edit_kind"][split]
            lines.append(f"| {name} | " + " | ".join(
                f"{kinds[k]['composed']['R@1']:.3f} ({kinds[k]['image-only']['R@1']:.3f})" for k in KINDS) + " |")
    lines += ["", "### Text towers alone: where does a novel caption's own paraphrase rank among the test captions?", "",
              "Median rank (1 = nearest by cosine) of each novel caption's training-phrasing paraphrase among all "
              f"{probe[0]} test captions; chance is about {probe[0] // 2}. raw MiniLM = the "
              "pretrained sentence vector the MiniLM variants start from; the others are each trained model's "
              "text vector (its text-only query).", "",
              "| text tower | all | " + " | ".join(KINDS) + " |", "|---|---:|" + "---:|" * len(KINDS)]
    lines += [f"| {name} | {p['all']:.0f} | " + " | ".join(f"{p[k]:.0f}" if k in p else "-" for k in KINDS) + " |"
              for name, p in probe[1].items()]
    lines += ["", "### Variants", "", "| variant | what | overrides |", "|---|---|---|"]
    lines += [f"| {name} | {DESCRIPTIONS[name]} | `{' '.join(VARIANTS[name]) or '(none)'}` |" for name in results]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--minutes", type=float, default=8.5, help="optimisation minutes per variant")
    parser.add_argument("--workdir", type=Path, default=Path("workdir/backbones"))
    parser.add_argument("--data", type=Path, default=Path("workdir/data/shapes"))
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "bench/backbones.py", *sys.argv[1:]])
    run([*CLI, "data", "shapes", "--out", str(args.data)])
    results = {name: train_and_eval(name, VARIANTS[name], args) for name in args.variants}
    # Raw MiniLM through any variant whose MiniLM tower is frozen (its stem is the pretrained network itself).
    frozen = [name for name in results if "model.backbone.text.train=frozen" in VARIANTS[name]
              and any(o.endswith("-minilm") for o in VARIANTS[name] if o.startswith("model.backbone.name="))]
    towers = {"raw MiniLM": (results[frozen[0]]["checkpoint"], True)} if frozen else {}
    towers.update({name: (r["checkpoint"], False) for name, r in results.items()})
    probe = paraphrase_probe(args.data, towers)
    body = render(args, results, probe, command)
    write_section("backbones", body, args.doc)
    print(body)


if __name__ == "__main__":
    main()

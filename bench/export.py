"""ONNX Runtime bundle vs eager PyTorch on the CPU: batch-1 latency, batch-64 throughput, parity.

    .venv/bin/python bench/export.py [--checkpoint CKPT] [--quick]

Without --checkpoint the default model configuration (models/train_config.py) is built with seeded random
weights and a tokenizer over a few shapes-style captions (cirflow.models.tiny.make_checkpoint): speed does not
depend on training, and parity is a property of the export. The checkpoint is exported to a bundle in a temp directory, then both runtimes encode
the same preprocessed arrays. torch.set_num_threads and ORT's intra_op_num_threads are both set to the number of
cores, and the two are timed alternately, call by call, so that machine noise hits both alike. Results go to
the "export" section of docs/benchmarks.md. --quick (a tiny model, few repetitions) checks that the script
runs and prints its table without recording it.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from report import machine, today, write_section

from cirflow.export.bundle import export_bundle
from cirflow.export.runtime import BundleRuntime
from cirflow.models.checkpoint import load_checkpoint
from cirflow.models.cir_model import count_parameters
from cirflow.models.composers import ComposerConfig
from cirflow.models.data.shapes_scene import random_scene, render_scene
from cirflow.models.preprocess import normalize_uint8
from cirflow.models.tiny import make_checkpoint
from cirflow.models.tokenizer import encode_texts

CAPTIONS = ["same scene but the red circle is blue", "add a small green square in the top left",
            "remove the large triangle on the right", "move the purple circle to the bottom",
            "make the yellow square large and add a cyan triangle in the center",
            "the brown circle becomes a gray square", "swap nothing but make the small blue triangle red"]
COMPOSER = ComposerConfig().name  # the default model's, as `cirflow train` builds it


def shapes_images(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size, 3) uint8 rendered shapes scenes: the images the default model is made for."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    return np.stack([render_scene(random_scene(rng, 1, 5), size, np_rng) for _ in range(n)])


def timed_pair(a: Callable[[], object], b: Callable[[], object], runs: int, warmup: int) -> tuple[list, list]:
    """Seconds per call of a and b, alternating call by call after `warmup` untimed calls of each."""
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for _ in range(runs):
        for fn, out in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return ta, tb


def top10_agreement(q_a: np.ndarray, g_a: np.ndarray, q_b: np.ndarray, g_b: np.ndarray) -> tuple[float, float]:
    """(fraction of queries with the same top-10 set, mean overlap of the top-10 sets)."""
    ta = np.argsort(-(q_a @ g_a.T), axis=1, kind="stable")[:, :10]
    tb = np.argsort(-(q_b @ g_b.T), axis=1, kind="stable")[:, :10]
    overlap = np.array([len(set(x) & set(y)) / 10 for x, y in zip(ta, tb)])
    return float((overlap == 1).mean()), float(overlap.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to export (default: random default model)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few runs, nothing recorded")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)  # equal threads for both runtimes: the comparison is of engines, not threads
    runs, warmup, rounds, gallery = (20, 3, 3, 100) if args.quick else (300, 30, 20, 2000)

    with tempfile.TemporaryDirectory(prefix="cirflow-bench-export-") as work:
        ckpt = args.checkpoint or make_checkpoint(Path(work) / "model.pt", COMPOSER, captions=CAPTIONS,
                                                  tiny=args.quick)
        start = time.perf_counter()
        bundle = export_bundle(ckpt, Path(work) / "bundle")
        export_s = time.perf_counter() - start
        bundle_mb = sum(p.stat().st_size for p in bundle.iterdir()) / 1e6
        loaded = load_checkpoint(ckpt)
        model, pre, tok = loaded.model.eval(), loaded.config.preprocess, loaded.tokenizer
        rt = BundleRuntime.load(bundle, providers="cpu", intra_op_threads=cores)

        def pixels(n: int, seed: int) -> np.ndarray:
            return normalize_uint8(shapes_images(n, pre.size, seed), pre)

        def texts(n: int) -> tuple[np.ndarray, np.ndarray]:
            return encode_texts(tok, [CAPTIONS[i % len(CAPTIONS)] for i in range(n)])

        def torch_image(px: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model.encode_image(torch.from_numpy(px)).numpy()

        def torch_query(px: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model.compose(torch.from_numpy(px), torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

        rows = []
        for batch, n_runs in ((1, runs), (64, rounds)):
            px = pixels(batch, seed=batch)
            ids, mask = texts(batch)
            # Default arguments bind this iteration's arrays (the lambdas are called within it, but say so).
            cases = {"image encoder": (lambda px=px: torch_image(px), lambda px=px: rt.encode_images(px)),
                     "query encoder": (lambda px=px, ids=ids, mask=mask: torch_query(px, ids, mask),
                                       lambda px=px, ids=ids, mask=mask: rt.encode_queries(px, ids, mask))}
            for name, (pt_fn, ort_fn) in cases.items():
                t_pt, t_ort = timed_pair(pt_fn, ort_fn, n_runs, warmup if batch == 1 else 1)
                rows.append((name, batch, np.array(t_pt), np.array(t_ort)))

        # Parity on a gallery: the same arrays through both runtimes.
        g_px = pixels(gallery, seed=7)
        q_px, (ids, mask) = pixels(64, seed=8), texts(64)
        g_pt = np.concatenate([torch_image(g_px[i:i + 256]) for i in range(0, gallery, 256)])
        g_ort = np.concatenate([rt.encode_images(g_px[i:i + 256]) for i in range(0, gallery, 256)])
        q_pt, q_ort = torch_query(q_px, ids, mask), rt.encode_queries(q_px, ids, mask)
        diff_img, diff_q = float(np.abs(g_pt - g_ort).max()), float(np.abs(q_pt - q_ort).max())
        same_sets, overlap = top10_agreement(q_ort, g_ort, q_pt, g_pt)
        params = count_parameters(model)

    source = str(args.checkpoint) if args.checkpoint else ("tiny random model (--quick)" if args.quick else
                                                          "default configuration, random weights")
    command = "`.venv/bin/python bench/export.py" + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "") \
        + (" --quick`" if args.quick else "`")
    lines = ["## Export: ONNX Runtime bundle vs eager PyTorch (CPU)", "",
             f"- date: {today()}; machine: {machine()}; onnxruntime {rt.manifest['exporter']['onnxruntime']}",
             f"- command: {command}",
             f"- model: {source}, {params / 1e6:.2f}M parameters, composer `{loaded.config.model.composer.name}`; "
             f"bundle {bundle_mb:.1f} MB, exported in {export_s:.1f} s",
             f"- threads: torch.set_num_threads({cores}) and ORT intra_op_num_threads={cores} (ORT graph "
             "optimisation level ALL); calls alternate between the two runtimes; inputs are the same "
             "preprocessed arrays (preprocessing and tokenisation not timed)",
             f"- batch 1: {runs} timed calls after {warmup} warm-up calls; batch 64: {rounds} calls", "",
             "| encoder | batch | torch p50 (ms) | ORT p50 (ms) | torch p99 (ms) | ORT p99 (ms) | ORT speed-up (p50) "
             "| torch items/s | ORT items/s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, batch, t_pt, t_ort in rows:
        p50_pt, p50_ort = np.percentile(t_pt, 50) * 1e3, np.percentile(t_ort, 50) * 1e3
        p99_pt, p99_ort = np.percentile(t_pt, 99) * 1e3, np.percentile(t_ort, 99) * 1e3
        lines.append(f"| {name} | {batch} | {p50_pt:.2f} | {p50_ort:.2f} | {p99_pt:.2f} | {p99_ort:.2f} | "
                     f"{p50_pt / p50_ort:.2f}x | {batch / np.median(t_pt):.0f} | {batch / np.median(t_ort):.0f} |")
    lines += ["", f"Parity (ORT vs PyTorch): max abs diff {diff_img:.1e} (gallery embeddings), {diff_q:.1e} "
              f"(query vectors); top-10 over a {gallery}-image gallery for 64 queries: identical sets for "
              f"{same_sets:.0%} of queries, mean overlap {overlap:.1%}."]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        write_section("export", text)


if __name__ == "__main__":
    main()

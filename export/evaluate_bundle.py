"""Evaluate an exported bundle through ONNX Runtime with the same evaluator as the PyTorch model.

The bundle runtime satisfies `models.evaluation.Encoders`, so the numbers differ from the checkpoint's only
by what the export changed (they should agree to float rounding).
"""

from __future__ import annotations

from pathlib import Path

from cirflow.export.runtime import BundleRuntime
from cirflow.models.data.loaders import load_split
from cirflow.models.evaluation import QUERY_MODES, build_eval_set, embed_eval_set, score_embeddings


def evaluate_bundle(bundle_dir: Path, kind: str, root: Path, splits: tuple[str, ...],
                    providers: str = "auto") -> dict[str, dict[str, dict[str, float]]]:
    """split name -> query mode (composed, image-only, text-only) -> metric, computed through ONNX Runtime."""
    runtime = BundleRuntime.load(bundle_dir, providers=providers)
    results = {}
    for split_name in splits:
        split = load_split(kind, root, split_name)
        data = build_eval_set(split, runtime.preprocess)
        modes = QUERY_MODES
        emb = embed_eval_set(runtime, data, runtime.tokenizer, runtime.preprocess, modes)
        results[split.name] = score_embeddings(emb, data, modes).metrics
    return results

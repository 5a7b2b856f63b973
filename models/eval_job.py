"""The `cirflow eval` job: a checkpoint on dataset splits -> metrics.json, tables, example sheets.

Splits with targets get metrics for composed queries and both baselines; CIRR splits without targets
(test1) get the two test-server submission files instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cirflow.core.config import check_non_negative
from cirflow.core.files import write_json_atomic
from cirflow.models.checkpoint import load_checkpoint
from cirflow.models.data.loaders import load_split
from cirflow.models.data.types import CIRSplit
from cirflow.models.evaluation import (
    QUERY_MODES,
    TorchEncoders,
    build_eval_set,
    composed_scores,
    embed_eval_set,
    metrics_by_group,
    score_embeddings,
)
from cirflow.models.metrics import average_fashioniq, cirr_submission
from cirflow.models.report import format_table, save_example_sheet
from cirflow.models.stem_cache import eval_stems

log = logging.getLogger(__name__)

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")


@dataclass(frozen=True)
class EvalJobConfig:
    checkpoint: Path
    out_dir: Path
    kind: str | None = None  # dataset kind; None = the one the checkpoint was trained on
    root: Path | None = None
    splits: tuple[str, ...] = ()  # () = the training config's eval_splits
    sheet_queries: int = 8  # example queries drawn per split; 0 = no example sheets
    seed: int = 0  # picks the example queries

    def __post_init__(self) -> None:
        check_non_negative(self, "sheet_queries", "seed")


def run_eval(config: EvalJobConfig) -> dict[str, dict[str, dict[str, float]]]:
    """Evaluate and write `metrics.json` (split -> query mode -> metric) into out_dir; returns it."""
    ckpt = load_checkpoint(config.checkpoint)
    kind = config.kind or ckpt.config.data.kind
    root = config.root or Path(ckpt.config.data.root)
    splits = config.splits or ckpt.config.data.eval_splits
    # "fashioniq" evaluates every category and their average, as the published tables report it.
    kinds = [f"fashioniq/{c}" for c in FASHIONIQ_CATEGORIES] if kind == "fashioniq" else [kind]
    config.out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    by_edit: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for split_name in splits:
        for k in kinds:
            split = load_split(k, root, split_name)
            data = build_eval_set(split, ckpt.config.preprocess)
            # Frozen stems run once per distinct image or caption, and not again in a later eval of the same
            # split when the training config names a stem store.
            stems = eval_stems(ckpt.model, data.pixels, [q.caption for q in split.queries], ckpt.tokenizer,
                               ckpt.config.preprocess, ckpt.config.stem_cache_dir or None)
            emb = embed_eval_set(TorchEncoders(ckpt.model, stems), data, ckpt.tokenizer, ckpt.config.preprocess)
            if stems is not None:
                stems.save()
            if not split.has_targets:
                _write_submission(split.name, composed_scores(emb), split, data.names, config.out_dir)
                continue
            result = score_embeddings(emb, data)
            results[split.name] = result.metrics
            edit_kinds = shapes_edit_kinds(root, split_name) if k == "shapes" else None
            if edit_kinds:
                by_edit[split.name] = metrics_by_group(emb, data, edit_kinds)
                print(format_edit_kinds(by_edit[split.name], f"{split.name} by edit kind (R@1)"))
            if config.sheet_queries:
                _write_sheet(config, split, data.names, result.top_k)
            print(format_table(result.metrics, f"{split.name} ({len(split.queries)} queries)"))
        if kind == "fashioniq" and all(f"{k}/{split_name}" in results for k in kinds):
            avg = {m: average_fashioniq({k: results[f"{k}/{split_name}"][m] for k in kinds}) for m in QUERY_MODES}
            results[f"fashioniq/average/{split_name}"] = avg
            print(format_table(avg, f"fashioniq average ({split_name})"))
    write_json_atomic(config.out_dir / "metrics.json", {"checkpoint": str(config.checkpoint), "results": results,
                                                        "by_edit_kind": by_edit})
    return results


def shapes_edit_kinds(root: Path, split: str) -> dict[int, str] | None:
    """pair id -> modification kind (add, remove, colour, shape, size, move) from the generator's scene file;
    None when the dataset has none (older generations)."""
    path = Path(root) / "scenes" / f"scenes.{split}.json"
    if not path.is_file():
        return None
    return {int(pair): kind for pair, kind in json.loads(path.read_text()).get("modifications", {}).items()}


def format_edit_kinds(by_kind: dict[str, dict[str, dict[str, float]]], title: str) -> str:
    modes = [m for m in QUERY_MODES if all(m in v for v in by_kind.values())]
    lines = [title, "| edit | queries | " + " | ".join(modes) + " |", "|---|---:|" + "---:|" * len(modes)]
    for kind, v in by_kind.items():
        lines.append(f"| {kind} | {int(v['queries']['count'])} | "
                     + " | ".join(f"{v[m]['R@1']:.3f}" for m in modes) + " |")
    return "\n".join(lines)


def _write_sheet(config: EvalJobConfig, split: CIRSplit, names: list[str], top_k: np.ndarray) -> None:
    rng = np.random.default_rng(config.seed)
    picks = sorted(rng.choice(len(split.queries), min(config.sheet_queries, len(split.queries)),
                              replace=False).tolist())
    save_example_sheet(split, names, top_k, picks, config.out_dir / f"examples-{split.name.replace('/', '-')}.png")


def _write_submission(name: str, scores: np.ndarray, split, names: list[str], out_dir: Path) -> None:
    recall, subset = cirr_submission(scores, split, names)
    stem = name.replace("/", "-")
    write_json_atomic(out_dir / f"submission-{stem}-recall.json", recall)
    write_json_atomic(out_dir / f"submission-{stem}-recall_subset.json", subset)
    log.info("%s has no targets: wrote test-server submission files to %s", name, out_dir)

"""Evaluate a model on a loaded split: composed queries and the image-only / text-only baselines.

Everything goes through one path: encode gallery and queries, score by cosine, then `models.metrics`.
The baselines use the same evaluator with q = v (reference image) and q = t (text).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

from models.cir_model import CIRModel
from models.data.types import CIRSplit
from models.metrics import evaluate_scores, rank_gallery
from models.preprocess import PreprocessConfig, load_uint8_images, normalize_uint8
from models.tokenizer import encode_texts

log = logging.getLogger(__name__)

QUERY_MODES = ("composed", "image-only", "text-only")


@dataclass
class EvalSet:
    """A split with its images decoded once, reusable across periodic validations."""

    split: CIRSplit
    names: list[str]  # gallery order
    pixels: np.ndarray  # (G + extra, H, W, 3) uint8: the gallery, then references missing from it
    ref_rows: np.ndarray  # (Q,) row of each query's reference in `pixels`


@dataclass
class Embeddings:
    gallery: np.ndarray  # (G, D)
    queries: dict[str, np.ndarray]  # mode -> (Q, D)


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]  # mode -> metric -> value
    top_k: np.ndarray  # (Q, k) gallery rows of the composed ranking, for example sheets


def build_eval_set(split: CIRSplit, preprocess: PreprocessConfig) -> EvalSet:
    names = list(split.images)
    row = {n: i for i, n in enumerate(names)}
    extra = sorted({q.reference for q in split.queries} - set(row))  # FashionIQ references may sit outside
    for n in extra:
        row[n] = len(row)
    paths = [split.images[n] for n in names] + [split.images[n] for n in extra]
    log.info("decoding %d images of %s", len(paths), split.name)
    pixels = load_uint8_images(paths, preprocess)
    return EvalSet(split, names, pixels, np.asarray([row[q.reference] for q in split.queries]))


@torch.inference_mode()
def embed_eval_set(model: CIRModel, data: EvalSet, tokenizer: Tokenizer, preprocess: PreprocessConfig,
                   batch_size: int = 500) -> Embeddings:
    was_training = model.training
    model.eval()
    g = len(data.names)
    gallery = [model.encode_image(_pixels(data.pixels[i:i + batch_size], preprocess))
               for i in range(0, g, batch_size)]
    out: dict[str, list[torch.Tensor]] = {m: [] for m in QUERY_MODES}
    queries = data.split.queries
    for i in range(0, len(queries), batch_size):
        ids, mask = encode_texts(tokenizer, [q.caption for q in queries[i:i + batch_size]])
        f = model.features(_pixels(data.pixels[data.ref_rows[i:i + batch_size]], preprocess),
                           torch.from_numpy(ids), torch.from_numpy(mask))
        out["composed"].append(model.compose_features(f))
        out["image-only"].append(f.v)
        out["text-only"].append(f.t)
    model.train(was_training)
    return Embeddings(torch.cat(gallery).numpy(), {m: torch.cat(v).numpy() for m, v in out.items()})


def score_embeddings(emb: Embeddings, data: EvalSet, modes: tuple[str, ...] = QUERY_MODES,
                     k: int = 50) -> EvalResult:
    """Metrics per query mode, computed by the one evaluator in models.metrics."""
    metrics = {}
    top_k = np.zeros((0, k), dtype=np.int64)
    for mode in modes:
        scores = emb.queries[mode] @ emb.gallery.T  # (Q, G) cosine: all vectors are unit length
        metrics[mode] = evaluate_scores(scores, data.split, data.names)
        if mode == "composed":
            exclude = _reference_rows(data) if data.split.remove_reference else None
            top_k = rank_gallery(scores, exclude, min(k, len(data.names)))
    return EvalResult(metrics, top_k)


def evaluate(model: CIRModel, data: EvalSet, tokenizer: Tokenizer, preprocess: PreprocessConfig,
             modes: tuple[str, ...] = QUERY_MODES) -> EvalResult:
    return score_embeddings(embed_eval_set(model, data, tokenizer, preprocess), data, modes)


def _reference_rows(data: EvalSet) -> np.ndarray:
    g = len(data.names)
    return np.where(data.ref_rows < g, data.ref_rows, -1)


def _pixels(rows: np.ndarray, preprocess: PreprocessConfig) -> torch.Tensor:
    return torch.from_numpy(normalize_uint8(rows, preprocess))

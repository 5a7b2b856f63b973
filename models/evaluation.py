"""Evaluate encoders on a loaded split: composed queries and the image-only / text-only baselines.

Everything goes through one path: encode gallery and queries, score by cosine, then `models.metrics`.
The baselines use the same evaluator with q = v (reference image) and q = t (text). The encoders are anything
with `encode_images` and `encode_queries` on numpy arrays: the PyTorch model (`TorchEncoders`) or an exported
bundle's ONNX Runtime session (export.runtime.BundleRuntime), so both are measured by the same code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch
from tokenizers import Tokenizer

from cirflow.models.cir_model import CIRModel, needs_rerank
from cirflow.models.data.types import CIRSplit
from cirflow.models.metrics import evaluate_scores, rank_gallery
from cirflow.models.preprocess import PreprocessConfig, load_uint8_images, normalize_uint8
from cirflow.models.rerank import DEFAULT_RERANK_N, Rescore, rerank_gallery
from cirflow.models.stem_cache import EvalStems, kept_modes
from cirflow.models.tokenizer import encode_texts

log = logging.getLogger(__name__)

QUERY_MODES = ("composed", "image-only", "text-only")


class Encoders(Protocol):
    """A model's encoders. `reranks`: its exact score is not the cosine of the query vector (ARTEMIS): then
    encode_query_features gives each query's features and rescore scores candidates exactly (models/rerank.py)."""

    reranks: bool

    def encode_images(self, pixels: np.ndarray) -> np.ndarray: ...  # (B, 3, H, W) -> (B, D) unit vectors

    def encode_queries(self, pixels: np.ndarray, input_ids: np.ndarray,
                       attention_mask: np.ndarray) -> np.ndarray: ...  # -> (B, D) unit query vectors

    def encode_query_features(self, pixels: np.ndarray, input_ids: np.ndarray,
                              attention_mask: np.ndarray) -> np.ndarray: ...  # -> (B, F, D)

    def rescore(self, features: np.ndarray, candidates: np.ndarray) -> np.ndarray: ...  # (B, N, D) -> (B, N)


class TorchEncoders:
    """The PyTorch model behind the Encoders protocol (eval mode, no autograd, fp32, on the model's device);
    adds the text-only baseline."""

    def __init__(self, model: CIRModel, stems: EvalStems | None = None) -> None:
        """stems: where the model's frozen stems' outputs are looked up by input content instead of recomputed
        (models.stem_cache.eval_stems for this model; None = always run the whole towers)."""
        if stems is not None:
            stems.check(model)
        self.model = model
        self.device = next(model.parameters()).device
        self.stems = stems
        self.reranks = needs_rerank(model.composer)

    def _tensors(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        return [torch.from_numpy(a).to(self.device) for a in arrays]

    def _image_stems(self, pixels: np.ndarray) -> torch.Tensor | None:
        return None if self.stems is None else self.stems.image(pixels, self.device)

    def _text_stems(self, ids: np.ndarray, mask: np.ndarray) -> torch.Tensor | None:
        return None if self.stems is None else self.stems.text(ids, mask, self.device)

    @torch.inference_mode()
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return self.model.eval().encode_image(*self._tensors(pixels), self._image_stems(pixels)).cpu().numpy()

    @torch.inference_mode()
    def encode_queries(self, pixels: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        model = self.model.eval()
        features = model.features(*self._tensors(pixels, input_ids, attention_mask), self._image_stems(pixels),
                                  self._text_stems(input_ids, attention_mask))
        return model.compose_features(features).cpu().numpy()

    @torch.inference_mode()
    def encode_query_features(self, pixels: np.ndarray, input_ids: np.ndarray,
                              attention_mask: np.ndarray) -> np.ndarray:
        model = self.model.eval()
        f = model.features(*self._tensors(pixels, input_ids, attention_mask), self._image_stems(pixels),
                           self._text_stems(input_ids, attention_mask))
        return model.composer.query_features(f.v, f.t).cpu().numpy()

    @torch.inference_mode()
    def rescore(self, features: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return self.model.eval().composer.score(*self._tensors(np.ascontiguousarray(features),
                                                               np.ascontiguousarray(candidates))).cpu().numpy()

    @torch.inference_mode()
    def encode_texts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.model.eval().encode_text(*self._tensors(input_ids, attention_mask),
                                             self._text_stems(input_ids, attention_mask)).cpu().numpy()


@dataclass
class EvalSet:
    """A split with its images decoded once, reusable across periodic validations."""

    split: CIRSplit
    names: list[str]  # gallery order
    pixels: np.ndarray  # (G, H, W, 3) uint8, in gallery order
    ref_rows: np.ndarray  # (Q,) gallery row of each query's reference


@dataclass
class Embeddings:
    gallery: np.ndarray  # (G, D)
    queries: dict[str, np.ndarray]  # mode -> (Q, D)
    # Encoders that re-rank (Encoders.reranks): the composed queries' features (Q, F, D) and the exact scorer
    features: np.ndarray | None = None
    rescore: Rescore | None = None

    def rows(self, rows: np.ndarray) -> Embeddings:
        """The same gallery with the queries of `rows` only."""
        return Embeddings(self.gallery, {m: v[rows] for m, v in self.queries.items()},
                          None if self.features is None else self.features[rows], self.rescore)


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]  # mode -> metric -> value
    top_k: np.ndarray  # (Q, k) gallery rows of the composed ranking, for example sheets


def build_eval_set(split: CIRSplit, preprocess: PreprocessConfig) -> EvalSet:
    """Decode the gallery. Every reference must be a gallery image, as every loader guarantees: CIRR removes the
    reference from its own ranking, and FashionIQ's protocol (CLIP4Cir's validation, which takes the reference
    features from the gallery's) keeps it in, so a reference outside the gallery has no place in either."""
    names = list(split.images)
    row = {n: i for i, n in enumerate(names)}
    outside = sorted({q.reference for q in split.queries} - set(row))
    if outside:
        raise ValueError(f"{split.name}: {len(outside)} reference image(s) are not in the split's gallery (e.g. "
                         f"{outside[:3]}); every reference must be a gallery image")
    log.info("decoding %d images of %s", len(names), split.name)
    pixels = load_uint8_images([split.images[n] for n in names], preprocess)
    return EvalSet(split, names, pixels, np.asarray([row[q.reference] for q in split.queries]))


def embed_eval_set(encoders: Encoders, data: EvalSet, tokenizer: Tokenizer, preprocess: PreprocessConfig,
                   modes: tuple[str, ...] = QUERY_MODES, batch_size: int = 500) -> Embeddings:
    """Gallery and query vectors for `modes`; text-only only where the encoders can embed text alone."""
    g = len(data.names)
    gallery = [encoders.encode_images(normalize_uint8(data.pixels[i:i + batch_size], preprocess))
               for i in range(0, g, batch_size)]
    text_only = "text-only" in modes and hasattr(encoders, "encode_texts")
    out: dict[str, list[np.ndarray]] = {m: [] for m in modes if m != "text-only" or text_only}
    reranks = "composed" in out and encoders.reranks
    features = []
    queries = data.split.queries
    for i in range(0, len(queries), batch_size):
        ids, mask = encode_texts(tokenizer, [q.caption for q in queries[i:i + batch_size]])
        pixels = normalize_uint8(data.pixels[data.ref_rows[i:i + batch_size]], preprocess)
        if "composed" in out:
            out["composed"].append(encoders.encode_queries(pixels, ids, mask))
        if reranks:
            features.append(encoders.encode_query_features(pixels, ids, mask))
        if "image-only" in out:
            out["image-only"].append(encoders.encode_images(pixels))  # q = v: the reference's gallery vector
        if text_only:
            out["text-only"].append(encoders.encode_texts(ids, mask))  # type: ignore[attr-defined]
    return Embeddings(np.concatenate(gallery), {m: np.concatenate(v) for m, v in out.items()},
                      np.concatenate(features) if reranks else None, encoders.rescore if reranks else None)


def score_embeddings(emb: Embeddings, data: EvalSet, modes: tuple[str, ...] = QUERY_MODES, k: int = 50,
                     rerank_n: int | None = DEFAULT_RERANK_N) -> EvalResult:
    """Metrics per query mode, computed by the one evaluator in models.metrics. Composed queries of encoders
    that re-rank are ranked in two stages (models/rerank.py): the top `rerank_n` of the query vector re-scored
    exactly (None: the exact score of the whole gallery; 0: the query vector alone, no re-rank)."""
    metrics = {}
    top_k = np.zeros((0, k), dtype=np.int64)
    for mode in (m for m in modes if m in emb.queries):
        scores = composed_scores(emb, rerank_n) if mode == "composed" else emb.queries[mode] @ emb.gallery.T
        metrics[mode] = evaluate_scores(scores, data.split, data.names)
        if mode == "composed":
            exclude = data.ref_rows if data.split.remove_reference else None
            available = len(data.names) - (exclude is not None)  # a gallery smaller than k keeps them all
            top_k = rank_gallery(scores, exclude, min(k, available))
    return EvalResult(metrics, top_k)


def composed_scores(emb: Embeddings, rerank_n: int | None = DEFAULT_RERANK_N) -> np.ndarray:
    """(Q, G) scores of the composed queries whose ranking is the model's: the cosine of the query vectors (all
    unit length), or for encoders that re-rank the two-stage ranking at rerank_n (score_embeddings)."""
    scores = emb.queries["composed"] @ emb.gallery.T
    if emb.features is None or emb.rescore is None or rerank_n == 0:
        return scores
    return rerank_gallery(scores, emb.features, emb.gallery, rerank_n, emb.rescore)


def metrics_by_group(emb: Embeddings, data: EvalSet, group_of: dict[int, str],
                     modes: tuple[str, ...] = QUERY_MODES) -> dict[str, dict[str, dict[str, float]]]:
    """The same metrics per group of queries (e.g. the shapes edit kind of each pair id): group -> mode -> metric,
    plus each group's query count under "queries". Galleries stay whole; only the queries are split."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    queries = data.split.queries
    for group in sorted(set(group_of[q.pair_id] for q in queries)):
        rows = np.asarray([i for i, q in enumerate(queries) if group_of[q.pair_id] == group])
        sub = EvalSet(replace(data.split, queries=[queries[i] for i in rows]), data.names, data.pixels,
                      data.ref_rows[rows])
        sub_emb = emb.rows(rows)
        out[group] = {**score_embeddings(sub_emb, sub, modes).metrics, "queries": {"count": float(len(rows))}}
    return out


def evaluate(model: CIRModel, data: EvalSet, tokenizer: Tokenizer, preprocess: PreprocessConfig,
             modes: tuple[str, ...] = QUERY_MODES, stems: EvalStems | None = None) -> EvalResult:
    """Evaluate the PyTorch model (periodic validation uses this; `stems` as in TorchEncoders). Each submodule
    gets back its own train/eval mode afterwards (models.stem_cache.kept_modes)."""
    with kept_modes(model):
        emb = embed_eval_set(TorchEncoders(model, stems), data, tokenizer, preprocess, modes)
    return score_embeddings(emb, data, modes)

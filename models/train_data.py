"""Training batches of (reference, caption, target[, hard negatives]) from any loaded CIR split.

All needed images are decoded once into a uint8 array; batches index into it and are normalised with the
shared preprocessing. Sampling is seeded per epoch, so a resumed run sees the same order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer

from models.data.types import CIRSplit, DatasetError
from models.preprocess import PreprocessConfig, load_uint8_images, normalize_uint8
from models.tokenizer import encode_texts

log = logging.getLogger(__name__)


@dataclass
class Batch:
    reference: torch.Tensor  # (B, 3, H, W)
    target: torch.Tensor  # (B, 3, H, W)
    ids: torch.Tensor  # (B, L)
    mask: torch.Tensor  # (B, L)
    negatives: torch.Tensor | None  # (B * k, 3, H, W) hard negatives, query i owns rows i*k .. i*k+k-1


class TripletBatches:
    def __init__(self, split: CIRSplit, tokenizer: Tokenizer, preprocess: PreprocessConfig,
                 hard_negatives: int, max_queries: int = 0) -> None:
        queries = [q for q in split.queries if q.target is not None]
        if not queries:
            raise DatasetError(f"{split.name}: no query has a target, nothing to train on")
        if max_queries:
            queries = queries[:max_queries]
        self.tokenizer, self.preprocess, self.k = tokenizer, preprocess, hard_negatives
        siblings = [[m for m in q.subset if m not in (q.reference, q.target)] for q in queries]
        if hard_negatives and min(len(s) for s in siblings) < hard_negatives:
            raise DatasetError(f"{split.name}: hard_negatives={hard_negatives} needs that many img_set siblings "
                               "per query (FashionIQ has none: set loss.hard_negatives=0)")
        names = sorted({n for q, s in zip(queries, siblings) for n in (q.reference, q.target, *s)})
        index = {n: i for i, n in enumerate(names)}
        log.info("decoding %d training images of %s", len(names), split.name)
        self.pixels = load_uint8_images([split.images[n] for n in names], preprocess)  # (N, H, W, 3)
        self.ref = np.asarray([index[q.reference] for q in queries])
        self.tgt = np.asarray([index[q.target] for q in queries])  # type: ignore[index]
        self.siblings = [np.asarray([index[n] for n in s]) for s in siblings]
        self.captions = [q.train_captions or (q.caption,) for q in queries]

    def __len__(self) -> int:
        return len(self.ref)

    def epoch(self, seed: int, epoch: int, batch_size: int, skip: int = 0) -> Iterator[Batch]:
        """Batches of one epoch (the last partial one dropped); `skip` resumes mid-epoch."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self))
        for b in range(skip, len(self) // batch_size):
            idx = order[b * batch_size:(b + 1) * batch_size]
            rng = np.random.default_rng([seed, epoch, b])  # per batch, so a resumed epoch draws the same
            texts = [c[rng.integers(len(c))] if len(c) > 1 else c[0] for c in (self.captions[i] for i in idx)]
            ids, mask = encode_texts(self.tokenizer, texts)
            negatives = None
            if self.k:
                neg = np.concatenate([rng.choice(self.siblings[i], self.k, replace=False) for i in idx])
                negatives = self._images(neg)
            yield Batch(self._images(self.ref[idx]), self._images(self.tgt[idx]),
                        torch.from_numpy(ids), torch.from_numpy(mask), negatives)

    def _images(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(normalize_uint8(self.pixels[rows], self.preprocess))

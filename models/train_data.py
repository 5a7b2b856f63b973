"""Training batches of (reference, caption, target) from any loaded CIR split.

Batches are built from whole image sets when the split has them (CIRR `img_set`, shapes): the queries of one
set share the reference and their targets are each other's siblings, so the in-batch negatives include the
hardest ones (what Recall_subset measures) at no extra cost, and each reference is encoded once. Images are
de-duplicated per batch: `images` holds each distinct image once and the row arrays index into it.
All needed images are decoded once into a uint8 array. Sampling is seeded per epoch and per batch, so a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer

from cirflow.models.data.types import CIRSplit, DatasetError
from cirflow.models.preprocess import PreprocessConfig, load_uint8_images, normalize_uint8
from cirflow.models.stem_cache import Stems, pad_stems
from cirflow.models.tokenizer import encode_texts

log = logging.getLogger(__name__)


@dataclass
class Batch:
    images: torch.Tensor  # (U, 3, H, W): every distinct image of the batch once (or their cached stems)
    reference: torch.Tensor  # (B,) row of each query's reference in `images`
    target: torch.Tensor  # (B,) row of each query's target
    ids: torch.Tensor  # (B, L)
    mask: torch.Tensor  # (B, L)
    image_stems: bool = False  # `images` holds the frozen image stem's outputs (models/stem_cache.py)
    text_stems: torch.Tensor | None = None  # (B, L, C) the frozen text stem's outputs, when cached

    def _map(self, fn) -> "Batch":
        return Batch(fn(self.images), fn(self.reference), fn(self.target), fn(self.ids), fn(self.mask),
                     self.image_stems, None if self.text_stems is None else fn(self.text_stems))

    def to(self, device: torch.device) -> "Batch":
        # non_blocking: from pinned memory (TripletBatches(pin=True)) the copy overlaps the GPU's work.
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())


class TripletBatches:
    def __init__(self, split: CIRSplit, tokenizer: Tokenizer, preprocess: PreprocessConfig,
                 hard_negatives: int, max_queries: int = 0, group_by_set: bool = True, pin: bool = False) -> None:
        """pin: batches in page-locked memory, for asynchronous copies to a GPU."""
        queries = [q for q in split.queries if q.target is not None]
        if not queries:
            raise DatasetError(f"{split.name}: no query has a target, nothing to train on")
        if max_queries:
            queries = queries[:max_queries]
        self.tokenizer, self.preprocess, self.k, self.pin = tokenizer, preprocess, hard_negatives, pin
        # Siblings are only ever used as drawn hard negatives: without those, decoding them is wasted work.
        siblings = [[m for m in q.subset if m not in (q.reference, q.target)] if hard_negatives else []
                    for q in queries]
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
        # Groups of query indices that share an image set (singletons where the format has no sets).
        keys = [tuple(sorted(q.subset)) if group_by_set and q.subset else (i,) for i, q in enumerate(queries)]
        groups: dict[tuple, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        self.groups = [np.asarray(g) for g in groups.values()]
        self.stems = Stems(None, None)

    def all_captions(self) -> list[str]:
        return [c for captions in self.captions for c in captions]

    def use_stems(self, stems: Stems) -> None:
        """Batches carry these cached stem outputs instead of pixels / only token ids (models/stem_cache.py)."""
        self.stems = stems

    def __len__(self) -> int:
        return len(self.ref)

    def epoch(self, seed: int, epoch: int, batch_size: int, skip: int = 0) -> Iterator[Batch]:
        """Batches of one epoch (the last partial one dropped); `skip` resumes mid-epoch."""
        rng = np.random.default_rng([seed, epoch])
        order = np.concatenate([rng.permutation(self.groups[g]) for g in rng.permutation(len(self.groups))])
        for b in range(skip, len(self) // batch_size):
            idx = order[b * batch_size:(b + 1) * batch_size]
            rng = np.random.default_rng([seed, epoch, b])  # per batch, so a resumed epoch draws the same
            texts = [c[rng.integers(len(c))] if len(c) > 1 else c[0] for c in (self.captions[i] for i in idx)]
            ids, mask = encode_texts(self.tokenizer, texts)
            rows = [self.ref[idx], self.tgt[idx]]
            if self.k:
                rows.append(np.concatenate([rng.choice(self.siblings[i], self.k, replace=False) for i in idx]))
            unique, inverse = np.unique(np.concatenate(rows), return_inverse=True)
            n = len(idx)
            if self.stems.images is not None:
                images = self.stems.images[torch.from_numpy(unique)]
            else:
                images = torch.from_numpy(normalize_uint8(self.pixels[unique], self.preprocess))
            text_stems = None if self.stems.texts is None else pad_stems([self.stems.texts[t] for t in texts])
            batch = Batch(images, torch.from_numpy(inverse[:n]), torch.from_numpy(inverse[n:2 * n]),
                          torch.from_numpy(ids), torch.from_numpy(mask), self.stems.images is not None, text_stems)
            yield batch.pin_memory() if self.pin else batch

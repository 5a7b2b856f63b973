"""Frozen pretrained stems, computed once per training image and caption instead of once per step.

A tower whose pretrained network is frozen (TowerPolicy train=frozen) is a fixed function followed by small
trainable layers: `tower.stem(x)` then `tower.head(stem)`. Its stem outputs are computed here, in eval mode and
fp32 on the training device, and the batches carry them in place of pixels or token ids; the heads then see
exactly what the uncached path would give them. Epochs after the first cost only the trainable layers.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch

from cirflow.core.files import write_atomic
from cirflow.models.cir_model import CIRModel
from cirflow.models.preprocess import PreprocessConfig, normalize_uint8
from cirflow.models.tokenizer import encode_texts

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Stems:
    images: torch.Tensor | None  # (N, ...) stem output per image row of the training pixels, on the CPU
    texts: dict[str, torch.Tensor] | None  # caption -> (L, C) stem output of its real tokens, on the CPU


@torch.inference_mode()
def image_stems(model: CIRModel, pixels: np.ndarray, preprocess: PreprocessConfig, device: torch.device,
                batch_size: int = 256) -> torch.Tensor:
    tower = model.image_encoder.eval()
    out = [tower.stem(torch.from_numpy(normalize_uint8(pixels[i:i + batch_size], preprocess)).to(device)).cpu()
           for i in range(0, len(pixels), batch_size)]
    return torch.cat(out)


@torch.inference_mode()
def text_stems(model: CIRModel, captions: list[str], tokenizer, device: torch.device,
               batch_size: int = 256) -> dict[str, torch.Tensor]:
    tower = model.text_encoder.eval()
    unique = sorted(set(captions), key=len)  # similar lengths together: little padding per batch
    out: dict[str, torch.Tensor] = {}
    for i in range(0, len(unique), batch_size):
        texts = unique[i:i + batch_size]
        ids, mask = encode_texts(tokenizer, texts)
        hidden = tower.stem(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)).cpu()
        for text, h, n in zip(texts, hidden, mask.sum(1)):
            out[text] = h[:n].clone()  # real tokens only; the clone drops the batch's storage
    return out


def compute_stems(model: CIRModel, pixels: np.ndarray, captions: list[str], tokenizer,
                  preprocess: PreprocessConfig, device: torch.device, images: bool = True,
                  store: Path | None = None) -> Stems:
    """Stems of every cacheable tower (None for the others). images=False leaves the image tower uncached
    (TMCIR's IACMA stage encodes pseudo-target pixels with the whole tower). store: a directory where stems are
    kept between runs, named by a hash of everything they depend on (the frozen weights, the preprocessing or
    tokenizer, the decoded pixels or the captions), so runs that differ only in what trains share them."""
    started = time.monotonic()
    modes = [(m, m.training) for m in model.modules()]
    image_cache = text_cache = None
    if images and getattr(model.image_encoder, "cacheable", False):
        key = _digest(_weights_digest(model.image_encoder.backbone), repr(preprocess), pixels.shape, pixels)
        image_cache = _stored(store, f"image-{key}.pt", lambda: image_stems(model, pixels, preprocess, device))
    if getattr(model.text_encoder, "cacheable", False):
        unique = sorted(set(captions))
        key = _digest(_weights_digest(model.text_encoder.backbone), tokenizer.to_str(), "\n".join(unique))
        text_cache = _stored(store, f"text-{key}.pt", lambda: text_stems(model, unique, tokenizer, device))
    for module, training in modes:
        module.training = training
    if image_cache is not None or text_cache is not None:
        log.info("frozen stems cached in %.1f s: %s images, %s captions", time.monotonic() - started,
                 "no" if image_cache is None else len(image_cache), "no" if text_cache is None else len(text_cache))
    return Stems(image_cache, text_cache)


def _weights_digest(module: torch.nn.Module) -> str:
    return _digest(*((name, tensor.detach().cpu().contiguous().numpy()) for name, tensor in
                     module.state_dict().items()))


def _digest(*parts: object) -> str:
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, tuple):
            digest.update(_digest(*part).encode())
        elif isinstance(part, np.ndarray):
            digest.update(np.ascontiguousarray(part).view(np.uint8).data)
        else:
            digest.update(str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def _stored(store: Path | None, name: str, compute: Callable[[], T]) -> T:
    """`compute()`, or its earlier result from `store/name` (written atomically after computing)."""
    if store is None:
        return compute()
    path = Path(store) / name
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged cache file is recomputed, never trusted
            log.warning("stem cache %s unreadable (%s); recomputing", path, e)
    value = compute()
    write_atomic(path, lambda tmp: torch.save(value, tmp))
    log.info("stem cache written: %s", path)
    return value


class StemMemo:
    """A frozen stem's outputs by input content, for evaluation: a gallery image that is also a reference, the
    same gallery and captions under test and novel, every periodic validation and (with a store) every later run
    of a bench cost one pass of the pretrained network. Keys hash each input (normalised pixels, or a caption's
    real token ids); the store's file name hashes the frozen weights."""

    def __init__(self, kind: str, tower: torch.nn.Module, store: Path | None = None) -> None:
        self.tower = tower
        self.path = Path(store) / f"eval-{kind}-{_weights_digest(tower.backbone)}.pt" if store else None
        self.memo: dict[str, torch.Tensor] = self._load() if self.path is not None and self.path.is_file() else {}
        self.added = 0

    def _load(self) -> dict[str, torch.Tensor]:
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged cache file is recomputed, never trusted
            log.warning("stem cache %s unreadable (%s); recomputing", self.path, e)
            return {}

    def lookup(self, keys: list[str], compute: Callable[[list[int]], list[torch.Tensor]]) -> list[torch.Tensor]:
        """The stem output of each key; compute(rows) gives those of the rows not seen before (CPU tensors)."""
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # each new input computed once
        missing = sorted(i for k, i in first.items() if k not in self.memo)
        if missing:
            modes = [(m, m.training) for m in self.tower.modules()]
            self.tower.eval()
            with torch.inference_mode():
                computed = compute(missing)
            for module, mode in modes:
                module.training = mode
            for i, stem in zip(missing, computed):
                self.memo[keys[i]] = stem.clone()
            self.added += len(missing)
        return [self.memo[k] for k in keys]

    def save(self) -> None:
        """Write the memo to the store when this run added to it (atomically: a killed save leaves the old)."""
        if self.path is not None and self.added:
            write_atomic(self.path, lambda tmp: torch.save(self.memo, tmp))
            log.info("stem cache written: %s (%d entries)", self.path, len(self.memo))
            self.added = 0


@dataclass
class EvalStems:
    """Memos of the model's frozen stems (None for a tower that trains)."""

    images: StemMemo | None
    texts: StemMemo | None

    def image(self, pixels: torch.Tensor) -> torch.Tensor | None:
        """(B, 3, H, W) normalised pixels -> their stem outputs on the same device; None without a memo."""
        if self.images is None:
            return None
        keys = [_content_key(p) for p in pixels.cpu().numpy()]
        stems = self.images.lookup(keys, lambda rows: list(self.images.tower.stem(pixels[rows]).cpu()))
        return torch.stack(stems).to(pixels.device)

    def text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """(B, L) token ids and mask -> (B, L, C) stem outputs, zeros past each caption's end; None without a
        memo. A caption's stem does not depend on the padding around it (attention masks it out)."""
        if self.texts is None:
            return None
        lengths = mask.sum(1).tolist()
        keys = [_content_key(row[:n]) for row, n in zip(ids.cpu().numpy(), lengths)]

        def compute(rows: list[int]) -> list[torch.Tensor]:
            hidden = self.texts.tower.stem(ids[rows], mask[rows]).cpu()
            return [h[:lengths[r]] for h, r in zip(hidden, rows)]

        stems = pad_stems(self.texts.lookup(keys, compute))
        return torch.nn.functional.pad(stems, (0, 0, 0, ids.shape[1] - stems.shape[1])).to(ids.device)

    def save(self) -> None:
        for memo in (self.images, self.texts):
            if memo is not None:
                memo.save()


def eval_stems(model: CIRModel, store: Path | str | None = None) -> EvalStems | None:
    """Memos for the model's frozen stems; None when neither tower's stem is frozen. A text tower that reads the
    reference image (fuses_image) has no stem of its own to keep."""
    store = Path(store) if store else None
    image, text = model.image_encoder, model.text_encoder
    images = StemMemo("image", image, store) if getattr(image, "cacheable", False) else None
    texts = (StemMemo("text", text, store) if getattr(text, "cacheable", False) and not model.fuses_image
             else None)
    return None if images is None and texts is None else EvalStems(images, texts)


def _content_key(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).view(np.uint8).data).hexdigest()


def pad_stems(stems: list[torch.Tensor]) -> torch.Tensor:
    """[(L_i, C)] -> (B, max L_i, C), zeros after each text's end (its mask row is 0 there)."""
    return torch.nn.utils.rnn.pad_sequence(stems, batch_first=True)

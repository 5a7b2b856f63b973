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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

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
                  preprocess: PreprocessConfig, device: torch.device, store: Path | None = None) -> Stems:
    """Stems of every cacheable tower (None for the others). store: a directory where stems are
    kept between runs, named by a hash of everything they depend on (the frozen weights, the preprocessing or
    tokenizer, the decoded pixels or the captions), so runs that differ only in what trains share them."""
    started = time.monotonic()
    image_cache = text_cache = None
    with kept_modes(model):
        if getattr(model.image_encoder, "cacheable", False):
            key = _digest(_weights_digest(model.image_encoder.backbone), repr(preprocess), pixels.shape, pixels)
            image_cache = _stored(store, f"image-{key}.pt", lambda: image_stems(model, pixels, preprocess, device))
        if getattr(model.text_encoder, "cacheable", False):
            unique = sorted(set(captions))
            key = _digest(_weights_digest(model.text_encoder.backbone), tokenizer.to_str(), "\n".join(unique))
            text_cache = _stored(store, f"text-{key}.pt", lambda: text_stems(model, unique, tokenizer, device))
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


def _load(path: Path) -> Any:
    """What torch.save wrote at `path`; None when there is no such file or it cannot be read (a damaged cache
    file is recomputed, never trusted)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        log.warning("stem cache %s unreadable (%s); recomputing", path, e)
        return None


def _stored(store: Path | None, name: str, compute: Callable[[], T]) -> T:
    """`compute()`, or its earlier result from `store/name` (written atomically after computing)."""
    if store is None:
        return compute()
    path = Path(store) / name
    value = _load(path)
    if value is not None:
        return value
    value = compute()
    write_atomic(path, lambda tmp: torch.save(value, tmp))
    log.info("stem cache written: %s", path)
    return value


class StemMemo:
    """A frozen stem's outputs by input content, for evaluating one split: a gallery image that is also a
    reference, a caption asked twice, every periodic validation and (with a store file) every later evaluation
    of the same inputs cost one pass of the pretrained network. Keys hash each input (normalised pixels, or a
    caption's real token ids); the file name hashes the frozen weights and the split's inputs, so a memo holds
    one split's stems and no more."""

    def __init__(self, tower: torch.nn.Module, path: Path | None = None) -> None:
        self.tower = tower
        self.path = path
        self.memo: dict[str, torch.Tensor] = (_load(path) if path is not None else None) or {}
        self.added = 0

    def lookup(self, keys: list[str], compute: Callable[[list[int]], list[torch.Tensor]]) -> list[torch.Tensor]:
        """The stem output of each key; compute(rows) gives those of the rows not seen before (CPU tensors)."""
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # each new input computed once
        missing = sorted(i for k, i in first.items() if k not in self.memo)
        if missing:
            with kept_modes(self.tower), torch.inference_mode():
                computed = compute(missing)
            for i, stem in zip(missing, computed):
                self.memo[keys[i]] = stem.clone()
            self.added += len(missing)
        return [self.memo[k] for k in keys]

    def save(self) -> None:
        """Write the memo to its store file when this run added to it (atomically). A store that cannot be
        written costs the next run the time, never this run's results: a warning, not an error."""
        if self.path is None or not self.added:
            return
        try:
            write_atomic(self.path, lambda tmp: torch.save(self.memo, tmp))
        except OSError as e:
            log.warning("stem cache %s not written (%s); the next evaluation recomputes it", self.path, e)
            return
        log.info("stem cache written: %s (%d entries)", self.path, len(self.memo))
        self.added = 0


@dataclass
class EvalStems:
    """Memos of one model's frozen stems for one split (None for a tower that trains)."""

    images: StemMemo | None
    texts: StemMemo | None

    def image(self, pixels: np.ndarray, device: torch.device) -> torch.Tensor | None:
        """(B, 3, H, W) normalised pixels -> their stem outputs on `device`; None without a memo."""
        if self.images is None:
            return None
        tower = self.images.tower
        keys = [_content_key(p) for p in pixels]
        stems = self.images.lookup(keys, lambda rows: list(tower.stem(torch.from_numpy(pixels[rows]).to(device))
                                                             .cpu()))
        return torch.stack(stems).to(device)

    def text(self, ids: np.ndarray, mask: np.ndarray, device: torch.device) -> torch.Tensor | None:
        """(B, L) token ids and right-padded mask -> (B, L, C) stem outputs on `device`, zeros past each
        caption's end; None without a memo. A caption's stem does not depend on the padding around it
        (attention masks it out), so one entry serves it at any batch width."""
        if self.texts is None:
            return None
        lengths = mask.sum(1)
        for row, n in enumerate(lengths):
            if not mask[row, :n].all():
                raise ValueError(f"attention mask row {row} is not right-padded ({mask[row].tolist()}): cached "
                                 "text stems key a caption by its leading real tokens")
        tower = self.texts.tower
        keys = [_content_key(row[:n]) for row, n in zip(ids, lengths)]

        def compute(rows: list[int]) -> list[torch.Tensor]:
            hidden = tower.stem(torch.from_numpy(ids[rows]).to(device), torch.from_numpy(mask[rows]).to(device))
            return [h[:lengths[r]] for h, r in zip(hidden.cpu(), rows)]

        stems = pad_stems(self.texts.lookup(keys, compute))
        return torch.nn.functional.pad(stems, (0, 0, 0, ids.shape[1] - stems.shape[1])).to(device)

    def check(self, model: CIRModel) -> None:
        """Memos serve only the towers they were made from (their keys do not cover the weights)."""
        for memo, tower, name in ((self.images, model.image_encoder, "image"),
                                  (self.texts, model.text_encoder, "text")):
            if memo is not None and memo.tower is not tower:
                raise ValueError(f"these {name} stems were made for another model's {name} tower")

    def save(self) -> None:
        for memo in (self.images, self.texts):
            if memo is not None:
                memo.save()


def eval_stems(model: CIRModel, pixels: np.ndarray, captions: list[str], tokenizer,
               preprocess: PreprocessConfig, store: Path | str | None = None) -> EvalStems | None:
    """Memos for the model's frozen stems over one split (its decoded gallery and its captions); None when
    neither tower's stem is frozen. A text tower that reads the reference image (fuses_image) has no stem of its
    own to keep. store: a directory whose files keep them between runs, named like compute_stems' by the frozen
    weights and the inputs; build after loading the weights that will be evaluated."""
    store = Path(store) if store else None
    image, text = model.image_encoder, model.text_encoder
    images = texts = None
    if getattr(image, "cacheable", False):
        key = _digest(_weights_digest(image.backbone), repr(preprocess), pixels.shape, pixels)
        images = StemMemo(image, store / f"eval-image-{key}.pt" if store else None)
    if getattr(text, "cacheable", False) and not model.fuses_image:
        key = _digest(_weights_digest(text.backbone), tokenizer.to_str(), "\n".join(sorted(set(captions))))
        texts = StemMemo(text, store / f"eval-text-{key}.pt" if store else None)
    return None if images is None and texts is None else EvalStems(images, texts)


@contextmanager
def kept_modes(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The module in eval mode inside; every submodule's own train/eval mode restored after. `module.train()`
    would also switch towers a policy keeps frozen (in eval mode) back to training mode, and their BatchNorm
    statistics would drift."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield module.eval()
    finally:
        for m, training in modes:
            m.training = training


def _content_key(array: np.ndarray) -> str:
    digest = hashlib.sha1(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).view(np.uint8).data)
    return digest.hexdigest()


def pad_stems(stems: list[torch.Tensor]) -> torch.Tensor:
    """[(L_i, C)] -> (B, max L_i, C), zeros after each text's end (its mask row is 0 there)."""
    return torch.nn.utils.rnn.pad_sequence(stems, batch_first=True)

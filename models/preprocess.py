"""Image preprocessing shared by training, evaluation and the exported runtime.

One implementation on purpose: the exported bundle records a `PreprocessConfig`, and its runtime calls these
same functions, so training and serving cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from cirflow.core.config import check_choice, check_positive
from cirflow.models.images import ImageError, load_image  # the decoding gate; callers import them from here too

MODES = ("stretch", "center_crop", "targetpad")
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class PreprocessConfig:
    size: int = 64  # square side the encoder sees; shapes images are rendered at this size
    # Per-channel statistics of the shapes benchmark (light background): centres inputs near zero.
    mean: tuple[float, float, float] = (0.85, 0.85, 0.85)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    resize: str = "bilinear"  # the resampling filter
    # How a non-square image becomes size x size. stretch: resize both sides (the shapes images are square);
    # center_crop: shorter side to `size`, then the centre (CLIP's); targetpad: CLIP4Cir's, pad with black to
    # an aspect ratio of at most target_ratio first, then center_crop, so wide garments are not cut off.
    mode: str = "stretch"
    target_ratio: float = 1.25

    def __post_init__(self) -> None:
        check_choice(self.resize, "resize", sorted(RESAMPLE))
        check_choice(self.mode, "mode", MODES)
        check_positive(self, "size")
        if self.target_ratio < 1:
            raise ValueError(f"target_ratio={self.target_ratio} must be at least 1 (long side / short side)")
        if not all(s > 0 for s in self.std):  # normalisation divides by it
            raise ValueError(f"std={list(self.std)} must be positive in every channel")


def resize_uint8(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """RGB image -> (H, W, 3) uint8 at the encoder's size."""
    if image.mode != "RGB":
        raise ImageError(f"image mode {image.mode!r} is not RGB; decode with load_image first")
    if config.mode == "targetpad":
        image = _pad_to_ratio(image, config.target_ratio)
    if image.size != (config.size, config.size):
        if config.mode == "stretch":
            image = image.resize((config.size, config.size), RESAMPLE[config.resize])
        else:
            image = _resize_center_crop(image, config.size, RESAMPLE[config.resize])
    return np.asarray(image, dtype=np.uint8)


def _pad_to_ratio(image: Image.Image, ratio: float) -> Image.Image:
    """Pad the short side symmetrically (black) until long / short <= ratio (CLIP4Cir's TargetPad)."""
    w, h = image.size
    if max(w, h) / min(w, h) < ratio:
        return image
    side = max(w, h) / ratio
    pad_w, pad_h = max(int((side - w) / 2), 0), max(int((side - h) / 2), 0)
    out = Image.new("RGB", (w + 2 * pad_w, h + 2 * pad_h))
    out.paste(image, (pad_w, pad_h))
    return out


def _resize_center_crop(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def normalize_uint8(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 normalised pixel values, the encoders' input."""
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ImageError(f"expected (B, H, W, 3) uint8 pixels, got {pixels.dtype} {pixels.shape}")
    if pixels.shape[1:3] != (config.size, config.size):
        raise ImageError(f"expected {config.size}x{config.size} pixels, got {pixels.shape[1]}x{pixels.shape[2]}")
    mean = np.asarray(config.mean, dtype=np.float32) * 255.0
    scale = 1.0 / (np.asarray(config.std, dtype=np.float32) * 255.0)
    out = (pixels.astype(np.float32) - mean) * scale  # (B, H, W, 3)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))  # (B, 3, H, W)


def preprocess_images(images: Sequence[Image.Image], config: PreprocessConfig) -> np.ndarray:
    """Decoded RGB images -> (B, 3, H, W) float32 encoder input."""
    return normalize_uint8(np.stack([resize_uint8(img, config) for img in images]), config)


def load_uint8_images(paths: Sequence[Path], config: PreprocessConfig, workers: int = 2) -> np.ndarray:
    """Decode and resize files into one (N, H, W, 3) uint8 array (4x smaller than float, normalised per batch)."""
    from concurrent.futures import ThreadPoolExecutor

    out = np.empty((len(paths), config.size, config.size, 3), dtype=np.uint8)

    def fill(i: int) -> None:
        out[i] = resize_uint8(load_image(Path(paths[i])), config)

    # PIL releases the GIL while decoding, so threads overlap the work without copying arrays between processes.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(fill, range(len(paths))))
    return out

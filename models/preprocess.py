"""Image preprocessing shared by training, evaluation and the exported runtime.

One implementation on purpose: the exported bundle records a `PreprocessConfig`, and its runtime calls these
same functions, so training and serving cannot drift apart.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from cirflow.core.config import check_positive

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class PreprocessConfig:
    size: int = 64  # square side the encoder sees; shapes images are rendered at this size
    # Per-channel statistics of the shapes benchmark (light background): centres inputs near zero.
    mean: tuple[float, float, float] = (0.85, 0.85, 0.85)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    resize: str = "bilinear"

    def __post_init__(self) -> None:
        if self.resize not in RESAMPLE:
            raise ValueError(f"resize={self.resize!r} is not one of {sorted(RESAMPLE)}")
        check_positive(self, "size")
        if not all(s > 0 for s in self.std):  # normalisation divides by it
            raise ValueError(f"std={list(self.std)} must be positive in every channel")


class ImageError(ValueError):
    """An image cannot be decoded; the message names the file and the reason."""


def load_image(source: Path | bytes, name: str | None = None) -> Image.Image:
    """Decode a file path or encoded bytes into an RGB PIL image, or raise ImageError naming the input."""
    label = name or (str(source) if isinstance(source, Path) else "<bytes>")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that, and then decodes (hundreds of MB): refuse
            # those as well, from the header.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
                img.load()
                return img.convert("RGB")
    except FileNotFoundError as e:
        raise ImageError(f"image {label}: file not found") from e
    except UnidentifiedImageError as e:  # its message holds the input's repr (a BytesIO address): not stable
        raise ImageError(f"image {label}: cannot decode (not a recognised image format)") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # from the header, no pixels
        raise ImageError(f"image {label}: too large to decode ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"image {label}: cannot decode ({e})") from e


def resize_uint8(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """RGB image -> (H, W, 3) uint8 at the encoder's size."""
    if image.mode != "RGB":
        raise ImageError(f"image mode {image.mode!r} is not RGB; decode with load_image first")
    if image.size != (config.size, config.size):
        image = image.resize((config.size, config.size), RESAMPLE[config.resize])
    return np.asarray(image, dtype=np.uint8)


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

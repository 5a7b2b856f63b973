"""The worker side of the embedding job: read + decode (Ray tasks) and embed (an actor per model copy).

Both stages pass every row on: a row whose image cannot be read carries its reason in `error` (and zero
pixels), so the driver can account for every catalog entry of a shard before writing it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cirflow.indexing.catalog import read_bytes
from cirflow.models.preprocess import ImageError, PreprocessConfig, load_image, normalize_uint8, resize_uint8

log = logging.getLogger(__name__)


def read_image(uri: str, preprocess: PreprocessConfig) -> np.ndarray:
    """(H, W, 3) uint8 at the bundle's size; raises ImageError with a one-line reason."""
    try:
        data = read_bytes(uri)
    except FileNotFoundError as e:  # also a dangling symlink
        raise ImageError("file not found") from e
    except OSError as e:  # a directory, a symlink loop, permissions: the reason alone, the row has the uri
        raise ImageError(f"cannot read ({e.strerror or e})") from e
    except Exception as e:  # any other filesystem's failure (network, unknown scheme) is this row's error too
        raise ImageError(f"cannot read: {type(e).__name__}: {e}") from e
    if not data:
        raise ImageError("empty file (0 bytes)")
    return resize_uint8(load_image(data, name=uri), preprocess)


def decode_batch(batch: dict[str, np.ndarray], preprocess: PreprocessConfig) -> dict[str, np.ndarray]:
    """Rows (id, uri, shard) -> + pixels (B, H, W, 3) uint8 and error (str, "" when decoded)."""
    n, size = len(batch["id"]), preprocess.size
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    for i, uri in enumerate(batch["uri"]):
        try:
            pixels[i] = read_image(str(uri), preprocess)
        except ImageError as e:
            errors[i] = str(e)
    return {**batch, "pixels": pixels, "error": errors}


class ImageEmbedder:
    """Holds one bundle runtime (loaded once per actor) and embeds the decoded rows of each batch."""

    def __init__(self, bundle_dir: str, providers: str, require_gpu: bool, threads: int) -> None:
        from cirflow.export.runtime import BundleRuntime  # onnxruntime loads in the actor, not in the driver

        self.runtime = BundleRuntime.load(Path(bundle_dir), providers=providers, require_gpu=require_gpu,
                                          intra_op_threads=threads)
        self.preprocess = self.runtime.preprocess

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        vectors = np.zeros((len(ok), self.runtime.embed_dim), dtype=np.float32)
        if ok.any():
            vectors[ok] = self.runtime.encode_images(normalize_uint8(batch["pixels"][ok], self.preprocess))
        return {"id": batch["id"], "uri": batch["uri"], "shard": batch["shard"], "embedding": vectors,
                "error": batch["error"]}

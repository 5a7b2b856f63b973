"""Run a model bundle with ONNX Runtime: checksums first, then sessions on the best available provider.

Preprocessing and tokenisation happen outside the graphs, through `models.preprocess` and `models.tokenizer`
(the functions training and evaluation call), configured by the bundle's preprocess.json and tokenizer.json.

Over-long texts are truncated to the bundle's max_text_length with a logged warning, not rejected: training
and evaluation truncate the same way, and the one query path must reproduce the evaluator's results exactly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer

from cirflow.core.config import check_choice
from cirflow.export.manifest import (
    IMAGE,
    QUERY,
    QUERY_FEATURES,
    RERANKER,
    TEXT,
    TOKENIZER,
    BundleError,
    read_preprocess,
    resolve_bundle_dir,
    verify_bundle,
)
from cirflow.models.preprocess import PreprocessConfig, load_image, preprocess_images
from cirflow.models.tokenizer import encode_texts, tokenizer_from_json

log = logging.getLogger(__name__)

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
GPU_PROVIDERS = (TRT, CUDA)
# Priority lists per choice; each is filtered by what the installed onnxruntime offers.
PROVIDERS = {"auto": (TRT, CUDA, CPU), "tensorrt": (TRT, CUDA, CPU), "cuda": (CUDA, CPU), "cpu": (CPU,)}

ImageInput = Union[Image.Image, bytes, os.PathLike, np.ndarray]


class InputError(ValueError):
    """Bad runtime input (dtype, shape, size, mode, empty text, batch mismatch); the message names it."""


class GPUUnavailableError(RuntimeError):
    """A GPU was required but the sessions run on the CPU."""


def select_providers(choice: str, available: Sequence[str]) -> list[str]:
    """The priority list for `choice`, restricted to `available`; logs when it falls back to another provider."""
    check_choice(choice, "providers", sorted(PROVIDERS))
    chosen = [p for p in PROVIDERS[choice] if p in available or p == CPU]
    if choice != "cpu" and chosen == [CPU]:
        # ORT itself would only warn and run on CPU; say it once, plainly, with the way out.
        level = logging.INFO if choice == "auto" else logging.WARNING
        log.log(level, "providers=%r: no GPU execution provider in this onnxruntime (available: %s); running on "
                "CPU (install onnxruntime-gpu on a CUDA machine for GPU)", choice, list(available))
    elif choice == "tensorrt" and TRT not in chosen:
        log.warning("providers='tensorrt': TensorRT execution provider unavailable (available: %s); using %s",
                    list(available), chosen[0])
    return chosen


@dataclass
class BundleRuntime:
    bundle_dir: Path
    manifest: dict[str, Any]
    preprocess: PreprocessConfig
    tokenizer: Tokenizer
    query_session: ort.InferenceSession
    image_session: ort.InferenceSession
    text_session: ort.InferenceSession
    rerank_session: ort.InferenceSession | None = None  # the bundle's reranker.onnx, where it has one

    @classmethod
    def load(cls, bundle_dir: Path, providers: str = "auto", require_gpu: bool = False,
             intra_op_threads: int = 0) -> "BundleRuntime":
        """Verify the bundle's checksums, then open the three encoders.

        providers: "auto" / "tensorrt" (TensorRT -> CUDA -> CPU), "cuda" (CUDA -> CPU) or "cpu", each limited
        to what the installed onnxruntime offers. require_gpu: raise GPUUnavailableError instead of running on
        the CPU. intra_op_threads: 0 lets ORT choose (one per physical core).
        """
        bundle_dir = resolve_bundle_dir(bundle_dir)
        if require_gpu and providers == "cpu":
            raise ValueError("require_gpu=True contradicts providers='cpu'")
        # Before anything in the directory is parsed or executed. TensorRT plans are not checked: this runtime
        # never loads them, and hashing hundreds of MB in every embedding actor and searcher start costs time.
        manifest = verify_bundle(bundle_dir, engines=False)
        available = ort.get_available_providers()
        chosen = select_providers(providers, available)
        if require_gpu and not any(p in GPU_PROVIDERS for p in chosen):
            raise GPUUnavailableError(f"a GPU was required but onnxruntime offers no GPU provider for "
                                      f"providers={providers!r} (available: {available}); install onnxruntime-gpu "
                                      "on a machine with a CUDA GPU, or drop require_gpu")
        preprocess = read_preprocess(bundle_dir)
        try:
            tokenizer = tokenizer_from_json((bundle_dir / TOKENIZER).read_text())
        except Exception as e:  # OSError, or tokenizers' own exception type
            raise BundleError(f"bundle {bundle_dir}: cannot read {TOKENIZER}: {e}") from e

        options = ort.SessionOptions()
        # ALL (layout and fusion passes: attention, GELU, LayerNorm) is ORT's current default; stated so that a
        # changed default cannot slow serving down unnoticed.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        specs = (QUERY, IMAGE, TEXT, *((RERANKER,) if "reranker" in manifest else ()))
        sessions = {spec.file: ort.InferenceSession(str(bundle_dir / spec.file), options, providers=chosen)
                    for spec in specs}
        used = {name: session.get_providers() for name, session in sessions.items()}
        on_cpu = [name for name, providers in used.items() if not any(p in GPU_PROVIDERS for p in providers)]
        if require_gpu and on_cpu:
            # The provider was offered but could not start (driver, CUDA libraries, or memory for the second
            # session): ORT fell back silently, per session, so each one is checked.
            names = on_cpu[0] if len(on_cpu) == 1 else f"{', '.join(on_cpu[:-1])} and {on_cpu[-1]}"
            raise GPUUnavailableError(f"a GPU was required but {names} "
                                      f"{'runs' if len(on_cpu) == 1 else 'run'} on the CPU (providers per graph: "
                                      f"{used}; requested {chosen}); check the CUDA driver and libraries that "
                                      "onnxruntime-gpu needs")
        log.info("bundle %s (bundle_id %s) on %s", bundle_dir, manifest["bundle_id"], used)
        return cls(bundle_dir, manifest, preprocess, tokenizer, sessions[QUERY.file], sessions[IMAGE.file],
                   sessions[TEXT.file], sessions.get(RERANKER.file))

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def reranks(self) -> bool:
        """The bundle carries a re-ranker: its query vectors rank approximately, the re-ranker's scores exactly
        (models/rerank.py); search re-scores the index's top candidates with it."""
        return self.rerank_session is not None

    @property
    def rerank_n(self) -> int:
        """Candidates re-scored per query unless a search says otherwise (the bundle's default)."""
        return int(self.manifest["reranker"]["n"]) if self.reranks else 0

    @property
    def providers(self) -> list[str]:
        return self.query_session.get_providers()

    # --- arrays in, arrays out -------------------------------------------------------------------------------

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 normalised pixels -> (B, D) float32 unit gallery vectors."""
        pixels = self._check_pixels(pixels)
        if len(pixels) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return self.image_session.run([IMAGE.output], {"pixel_values": pixels})[0]

    def encode_queries(self, pixels: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Reference pixels (B, 3, H, W) float32 + token ids and mask (B, L) int64 -> (B, D) unit query vectors."""
        return self._run_query([QUERY.output], pixels, input_ids, attention_mask)[0]

    def encode_queries_with_features(self, pixels: np.ndarray, input_ids: np.ndarray,
                                     attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As encode_queries, with each query's features for the re-ranker (B, F, D), from the same run."""
        self._check_reranks()
        query, features = self._run_query([QUERY.output, QUERY_FEATURES], pixels, input_ids, attention_mask)
        return query, features

    def encode_query_features(self, pixels: np.ndarray, input_ids: np.ndarray,
                              attention_mask: np.ndarray) -> np.ndarray:
        """The re-ranker's features of each query (B, F, D)."""
        self._check_reranks()
        return self._run_query([QUERY_FEATURES], pixels, input_ids, attention_mask)[0]

    def rescore(self, features: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """The exact scores (B, N) of each query's candidates: features (B, F, D) from the query graph, candidates
        (B, N, D) their catalog vectors."""
        self._check_reranks()
        features = np.ascontiguousarray(features, dtype=np.float32)
        candidates = np.ascontiguousarray(candidates, dtype=np.float32)
        spec = self.manifest["reranker"]
        if features.ndim != 3 or features.shape[1:] != (int(spec["features"]), self.embed_dim):
            raise InputError(f"query_features must be (B, {spec['features']}, {self.embed_dim}), got "
                             f"{features.shape}")
        if candidates.ndim != 3 or len(candidates) != len(features) or candidates.shape[2] != self.embed_dim:
            raise InputError(f"candidates must be ({len(features)}, N, {self.embed_dim}), got {candidates.shape}")
        if candidates.shape[1] == 0 or len(features) == 0:
            return np.zeros(candidates.shape[:2], dtype=np.float32)
        assert self.rerank_session is not None
        return self.rerank_session.run([RERANKER.output], {RERANKER.inputs[0]: features,
                                                           RERANKER.inputs[1]: candidates})[0]

    def _run_query(self, outputs: list[str], pixels: np.ndarray, input_ids: np.ndarray,
                   attention_mask: np.ndarray) -> list[np.ndarray]:
        pixels = self._check_pixels(pixels)
        ids, mask = self._check_tokens(input_ids, attention_mask)
        if len(pixels) != len(ids):
            raise InputError(f"batch mismatch: {len(pixels)} images but {len(ids)} token rows")
        if len(pixels) == 0:
            shapes = {QUERY.output: (0, self.embed_dim)}
            if self.reranks:
                shapes[QUERY_FEATURES] = (0, int(self.manifest["reranker"]["features"]), self.embed_dim)
            return [np.zeros(shapes[name], dtype=np.float32) for name in outputs]
        return self.query_session.run(outputs, {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask})

    def _check_reranks(self) -> None:
        if not self.reranks:
            raise InputError(f"bundle {self.bundle_id} has no re-ranker: its query vectors rank exactly")

    def encode_texts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Token ids and mask (B, L) int64 -> (B, D) unit text vectors (the text-only baseline's queries)."""
        ids, mask = self._check_tokens(input_ids, attention_mask)
        if len(ids) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return self.text_session.run([TEXT.output], {"input_ids": ids, "attention_mask": mask})[0]

    # --- images and texts in: the same preprocessing and tokenisation as training ---------------------------

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Images (PIL RGB, encoded bytes, file paths or (H, W, 3) uint8 RGB arrays) -> (N, D) unit vectors."""
        return self.encode_images(self._pixels(images))

    def embed_queries(self, images: Sequence[ImageInput], texts: Sequence[str]) -> np.ndarray:
        """Reference images + modification texts -> (N, D) unit query vectors."""
        if len(images) != len(texts):
            raise InputError(f"batch mismatch: {len(images)} images but {len(texts)} texts")
        ids, mask = self._tokenize(texts)
        return self.encode_queries(self._pixels(images), ids, mask)

    def embed_queries_with_features(self, images: Sequence[ImageInput],
                                    texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """As embed_queries, with each query's features for the re-ranker (encode_queries_with_features)."""
        if len(images) != len(texts):
            raise InputError(f"batch mismatch: {len(images)} images but {len(texts)} texts")
        ids, mask = self._tokenize(texts)
        return self.encode_queries_with_features(self._pixels(images), ids, mask)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts alone -> (N, D) unit vectors in the gallery space (text-only search)."""
        return self.encode_texts(*self._tokenize(texts))

    def _pixels(self, images: Sequence[ImageInput]) -> np.ndarray:
        size = self.preprocess.size
        if len(images) == 0:
            return np.zeros((0, 3, size, size), dtype=np.float32)
        return preprocess_images([_decode(image, i) for i, image in enumerate(images)], self.preprocess)

    def _tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"texts[{i}] is {type(text).__name__}, expected str")
            if not text.strip():
                raise InputError(f"texts[{i}] is empty; a modification text is required")
        if len(texts) == 0:
            return np.zeros((0, 1), dtype=np.int64), np.ones((0, 1), dtype=np.int64)
        ids, mask = encode_texts(self.tokenizer, texts)
        lengths = mask.sum(axis=1)
        limit = int(self.manifest["max_text_length"])
        for i in np.flatnonzero(lengths <= 2):  # [CLS] [SEP] only: nothing the tokenizer could read
            raise InputError(f"texts[{i}] {texts[i]!r} has no tokens after normalisation")
        for i in np.flatnonzero(lengths >= limit):  # only full rows can have been cut; re-encode just those
            if self.tokenizer.encode(texts[i]).overflowing:
                log.warning("texts[%d] is longer than max_text_length=%d tokens; truncated as in training: %.60r",
                            i, limit, texts[i])
        return ids, mask

    # --- validation ------------------------------------------------------------------------------------------

    def _check_pixels(self, pixels: np.ndarray) -> np.ndarray:
        size = self.preprocess.size
        if not isinstance(pixels, np.ndarray):
            raise InputError(f"pixel_values must be a numpy array, got {type(pixels).__name__}")
        if pixels.dtype != np.float32:
            raise InputError(f"pixel_values must be float32, got {pixels.dtype}; normalise uint8 images with "
                             "models.preprocess.normalize_uint8, or call embed_images")
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise InputError(f"pixel_values must be (B, 3, {size}, {size}), got shape {pixels.shape}")
        if pixels.shape[2:] != (size, size):
            raise InputError(f"pixel_values must be {size}x{size} (the bundle's preprocess size), got "
                             f"{pixels.shape[2]}x{pixels.shape[3]}")
        return np.ascontiguousarray(pixels)

    def _check_tokens(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        for name, a in (("input_ids", ids), ("attention_mask", mask)):
            if not isinstance(a, np.ndarray) or a.dtype != np.int64 or a.ndim != 2:
                got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise InputError(f"{name} must be a (B, L) int64 array, got {got}")
        if ids.shape != mask.shape:
            raise InputError(f"input_ids {ids.shape} and attention_mask {mask.shape} differ in shape")
        max_length = int(self.manifest["max_sequence_length"])
        if ids.size and not 1 <= ids.shape[1] <= max_length:
            raise InputError(f"sequence length {ids.shape[1]} is outside 1..{max_length} (the model's max_length)")
        vocab = int(self.manifest["vocab_size"])
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise InputError(f"input_ids must lie in [0, {vocab}), got values in [{ids.min()}, {ids.max()}]")
        if mask.size and (not np.isin(mask, (0, 1)).all() or not mask.any(axis=1).all()):
            raise InputError("attention_mask must hold 0/1 with at least one 1 per row")
        return np.ascontiguousarray(ids), np.ascontiguousarray(mask)


def _decode(image: ImageInput, i: int) -> Image.Image:
    """One input -> an RGB PIL image, by the training decoder (load_image) where the input is encoded."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise InputError(f"images[{i}]: mode {image.mode!r} is not RGB; pass image.convert('RGB'), or the "
                             "encoded bytes / file path (decoded as in training)")
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"images[{i}]: an array must be (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
        return Image.fromarray(image)  # (H, W, 3) uint8 is RGB
    if isinstance(image, (bytes, bytearray)):
        return load_image(bytes(image), name=f"images[{i}]")
    if isinstance(image, os.PathLike):
        return load_image(Path(image))
    hint = "; wrap file paths in pathlib.Path" if isinstance(image, str) else ""
    raise InputError(f"images[{i}] is {type(image).__name__}; expected a PIL image, bytes, a Path or a uint8 "
                     f"array{hint}")

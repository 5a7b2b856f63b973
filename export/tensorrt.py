"""Build TensorRT engines (`<graph>.plan`) from a bundle's ONNX graphs, on the GPU that will run them.

`tensorrt` is imported only inside `build_engines`: the rest of export/ works without it, and without it (or
without a usable GPU) `build_engines` raises TensorRTUnavailable with the reason. Engines are recorded in the
manifest's separate "engines" section: they are derived, GPU-specific artifacts, so the bundle_id (the content
hash of the ONNX bundle) does not change.

Precision: TensorRT 10 takes fp16 as a builder flag (BuilderFlag.FP16, fp32 kept where TensorRT prefers it).
TensorRT >= 11 builds strongly typed networks only and removed that flag, so the ONNX graph is converted to
fp16 first (export/fp16.py) and the network is built as typed.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cirflow.core.files import sha256_file, write_bytes_atomic, write_json_atomic
from cirflow.export.fp16 import convert_to_fp16
from cirflow.export.manifest import GRAPHS, MANIFEST, read_manifest, verify_bundle

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 4 << 30  # builder scratch memory; tactics that need more are skipped, none of ours do


class TensorRTUnavailable(RuntimeError):
    """TensorRT cannot build here: the module is missing, too old, or finds no usable CUDA GPU."""


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: per input, (min, opt, max) shapes. TensorRT tunes kernels for opt."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_dict(self) -> dict[str, dict[str, list[int]]]:
        return {name: {"min": list(mn), "opt": list(opt), "max": list(mx)}
                for name, (mn, opt, mx) in self.shapes.items()}


def profiles(image_size: int, max_batch: int, max_seq: int) -> dict[str, Profile]:
    """Shapes per graph. The query encoder serves one query at a time (opt batch 1, a typical caption of half
    the maximum length); the image encoder embeds catalogs in full batches (opt batch = max)."""
    s, b, half = image_size, max_batch, max(1, (max_seq + 1) // 2)

    def pixels(opt: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        return (1, 3, s, s), (opt, 3, s, s), (b, 3, s, s)

    tokens = ((1, 1), (1, half), (b, max_seq))
    return {"query_encoder": Profile({"pixel_values": pixels(1), "input_ids": tokens, "attention_mask": tokens}),
            "image_encoder": Profile({"pixel_values": pixels(b)})}


def build_engines(bundle_dir: Path, fp16: bool = True, max_batch: int = 64, max_seq: int | None = None) -> dict:
    """Build `<graph>.plan` for both encoders, record them in the manifest and return its "engines" section.

    max_seq defaults to the bundle's max_text_length (what the tokenizer emits) and may not exceed the
    graphs' max_sequence_length.
    """
    bundle_dir = Path(bundle_dir)
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    manifest = verify_bundle(bundle_dir)
    limit = int(manifest["max_sequence_length"])
    max_seq = int(manifest["max_text_length"]) if max_seq is None else max_seq
    if not 1 <= max_seq <= limit:
        raise ValueError(f"max_seq={max_seq} is outside 1..{limit} (the bundle's max_sequence_length)")

    trt = _import_tensorrt()
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old; 10 or newer is required")
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as e:  # CUDA initialisation failures surface as assorted exception types
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} cannot create a builder (no usable CUDA GPU?): "
                                  f"{e}") from e
    if builder is None:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} cannot create a builder (no usable CUDA GPU?)")
    method = None if not fp16 else ("builder flag FP16" if major == 10 else "ONNX converted to fp16 (strongly typed)")
    shapes = profiles(int(manifest["image_size"]), max_batch, max_seq)

    engines: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cirflow-trt-") as work:
        for name, spec in GRAPHS.items():
            onnx_path = bundle_dir / spec.file
            if fp16 and major >= 11:
                onnx_path = convert_to_fp16(onnx_path, Path(work) / spec.file)
            log.info("building TensorRT engine %s (%s)", name, method or "fp32")
            plan = _build_plan(trt, builder, logger, onnx_path, shapes[name], fp16_flag=fp16 and major == 10,
                               strongly_typed=major >= 11)
            path = bundle_dir / f"{name}.plan"
            write_bytes_atomic(path, plan)
            engines[name] = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                             "profile": shapes[name].to_dict()}
    section = {"tensorrt": trt.__version__, "gpu": _gpu_name(), "precision": "fp16" if fp16 else "fp32",
               "fp16_method": method, "max_batch": max_batch, "max_seq": max_seq, "engines": engines}
    manifest = read_manifest(bundle_dir)  # re-read: only the engines section changes
    manifest["engines"] = section
    write_json_atomic(bundle_dir / MANIFEST, manifest, sort_keys=True)
    log.info("TensorRT engines for bundle %s written to %s", manifest["bundle_id"], bundle_dir)
    return section


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt  # lazily: most machines (and CI) have no TensorRT
    except ImportError as e:
        raise TensorRTUnavailable("the tensorrt Python module is not installed; TensorRT engines are built on a "
                                  "machine with an NVIDIA GPU and TensorRT >= 10 (NVIDIA's pip index or "
                                  "container). The ONNX bundle itself runs anywhere with onnxruntime") from e
    return trt


def _build_plan(trt: Any, builder: Any, logger: Any, onnx_path: Path, profile: Profile, fp16_flag: bool,
                strongly_typed: bool) -> bytes:
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # always on in 11; harmless to ask
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # by path: external weights resolve beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in profile.shapes.items():
        opt_profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    return bytes(serialized)


def _gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown GPU"

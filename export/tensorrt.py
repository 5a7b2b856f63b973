"""Build TensorRT engines (`<graph>.plan`) from a bundle's ONNX graphs, on the GPU that will run them.

`tensorrt` is imported only inside `build_engines`: the rest of export/ works without it, and without it (or
without a usable GPU) `build_engines` raises TensorRTUnavailable with the reason. Engines are recorded in the
manifest's separate "engines" section: they are derived, GPU-specific artifacts, so the bundle_id (the content
hash of the ONNX bundle) does not change.

Precision: TensorRT 10 takes fp16 as a builder flag (BuilderFlag.FP16, fp32 kept where TensorRT prefers it).
TensorRT >= 11 builds strongly typed networks only and removed that flag, so the ONNX graph is converted to
fp16 first (`convert_to_fp16`, onnxconverter-common's converter) and the network is built as typed.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from cirflow.core.files import sha256_file, write_bytes_atomic, write_json_atomic
from cirflow.export.manifest import GRAPHS, MANIFEST, read_manifest, resolve_bundle_dir, verify_bundle

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 4 << 30  # builder scratch memory; tactics that need more are skipped, none of ours do
# Ops computed in fp32 between casts in the fp16 graph: the converter's defaults (ops without dependable fp16
# kernels) and ReduceL2, F.normalize's norm, whose sum of squares of raw embeddings can exceed fp16's 65504.
FP32_OPS = (*DEFAULT_OP_BLOCK_LIST, "ReduceL2")


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
    """Shapes per graph. The query and text encoders serve one query at a time (opt batch 1, a typical caption
    of half the maximum length); the image encoder embeds catalogs in full batches (opt batch = max)."""
    s, b, half = image_size, max_batch, max(1, (max_seq + 1) // 2)

    def pixels(opt: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        return (1, 3, s, s), (opt, 3, s, s), (b, 3, s, s)

    tokens = ((1, 1), (1, half), (b, max_seq))
    return {"query_encoder": Profile({"pixel_values": pixels(1), "input_ids": tokens, "attention_mask": tokens}),
            "image_encoder": Profile({"pixel_values": pixels(b)}),
            "text_encoder": Profile({"input_ids": tokens, "attention_mask": tokens})}


def build_engines(bundle_dir: Path, fp16: bool = True, max_batch: int = 64, max_seq: int | None = None) -> dict:
    """Build `<graph>.plan` for every encoder, record them in the manifest and return its "engines" section.

    max_seq defaults to the bundle's max_text_length (what the tokenizer emits) and may not exceed the
    graphs' max_sequence_length.
    """
    bundle_dir = resolve_bundle_dir(bundle_dir)  # a bundles directory: its CURRENT bundle
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    manifest = verify_bundle(bundle_dir, engines=False)  # the engines are what this replaces
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

    plans: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="cirflow-trt-") as work:
        for name, spec in GRAPHS.items():
            onnx_path = bundle_dir / spec.file
            if fp16 and major >= 11:
                onnx_path = convert_to_fp16(onnx_path, Path(work) / spec.file)
            log.info("building TensorRT engine %s (%s)", name, method or "fp32")
            plans[name] = _build_plan(trt, builder, logger, onnx_path, shapes[name],
                                      fp16_flag=fp16 and major == 10, strongly_typed=major >= 11)

    # Old engines leave the manifest before their files are replaced: a crash in between leaves a valid bundle
    # without engines, never a manifest whose recorded engines do not match the files.
    manifest = read_manifest(bundle_dir)  # re-read: only the engines section changes
    if manifest.pop("engines", None) is not None:
        write_json_atomic(bundle_dir / MANIFEST, manifest, sort_keys=True)
    engines: dict[str, Any] = {}
    for name, plan in plans.items():
        path = write_bytes_atomic(bundle_dir / f"{name}.plan", plan)
        engines[name] = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                         "profile": shapes[name].to_dict()}
    section = {"tensorrt": trt.__version__, "gpu": _gpu_name(), "precision": "fp16" if fp16 else "fp32",
               "fp16_method": method, "max_batch": max_batch, "max_seq": max_seq, "engines": engines}
    manifest["engines"] = section
    write_json_atomic(bundle_dir / MANIFEST, manifest, sort_keys=True)
    log.info("TensorRT engines for bundle %s written to %s", manifest["bundle_id"], bundle_dir)
    return section


def convert_to_fp16(src: Path, dst: Path) -> Path:
    """Write an fp16 copy of the ONNX graph `src` to `dst` (weights as external data `dst.name + ".data"`),
    with fp32 inputs and outputs so that callers feed it the same arrays as the fp32 bundle; FP32_OPS stay fp32.

    onnxconverter-common's converter does the work. It leaves Cast(to=float) nodes as they are while typing
    their outputs fp16 (its issue #320: the graph no longer type-checks), so those nodes are kept in fp32
    through its node block list. The result is checked by path: a conversion that does not type-check is a
    ValueError naming the problem (the file stays at `dst` for inspection), never a silently wrong engine.
    """
    model = onnx.load(str(src))  # with its external data
    ir_version = model.ir_version
    casts_to_fp32 = []
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in node.attribute):
            node.name = node.name or f"cast_to_fp32_{i}"  # the block list matches by name; "" would match many
            casts_to_fp32.append(node.name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS,
                                         node_block_list=casts_to_fp32)
    for warning in caught:
        # Mostly constants clamped into [1e-7, 1e4] (headroom below fp16's 65504, so that mask additions cannot
        # overflow to -inf): masks' float32 minimum and normalize's eps are expected. Logged, not silenced, so
        # that a clamped weight would show.
        log.info("fp16 conversion of %s: %s", src.name, warning.message)
    model.ir_version = ir_version  # never newer than the source: ORT rejects newer IR versions (stack.md)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst), save_as_external_data=True, location=f"{dst.name}.data")
    try:
        onnx.checker.check_model(str(dst), full_check=True)  # by path: external data and strict type inference
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ValueError(f"{src.name}: the fp16 conversion ({dst}) does not type-check: {e}; an op here needs "
                         "fp32: add it to FP32_OPS") from e
    return dst


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

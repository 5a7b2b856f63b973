"""The GPU check in one command: bf16 training, catalog embedding and every GPU provider of ours, each against the CPU.

    make gpu-check OUT=DIR [GPU_CHECK_ARGS="--steps 500 --images 2048"]
    python3 bench/gpu_check.py --out DIR [--device auto|cpu] [--steps N] [--images N] [--deadline-minutes M]
        [--model default|tiny] [--workdir DIR]        # with cirflow importable: docs/benchmarks-guide.md, "GPU check"

Made for a machine with an NVIDIA GPU and its own Python with torch but not our pinned environment (stack.md, "The
GPU test machine"); `make gpu-check` puts the source tree (and any wheels from `make gpu-wheels`) on PYTHONPATH,
installing nothing. The parts, each timed and each recorded even when skipped, with the reason:

  environment       GPU, driver, CUDA, torch, Python; which optional modules, and which of our modules, import
  data              a small shapes dataset (models/data/shapes.py); its image files are also the catalog
  train_gpu         models.train.train for --steps steps (no time budget, validation at the end only) in bf16
                    autocast on the GPU: samples/s from its metrics.json, val recall (bf16 training learns)
  train_cpu         the same steps in fp32 on the CPU: samples/s (the GPU/CPU ratio is the report's summary), val recall
  embedding         --images catalog files read and decoded by the embedding job's decode_batch, encoded by the
                    trained image tower on the GPU (fp32 with TF32 off, and bf16) against the CPU: images/s, max abs
                    difference of the unit vectors, top-1 neighbour agreement
  export            the trained checkpoint as an ONNX bundle (export/bundle.py; needs onnxscript)
  ort_cpu           export.runtime.BundleRuntime on the CPU against torch on the CPU
  ort_cuda, ort_tensorrt   the same through the CUDA / TensorRT execution providers (onnxruntime-gpu only)
  faiss_gpu         indexing/search/placement.py: a flat index searched on the GPU against the same index on the CPU
  tensorrt_engines  export/tensorrt.py's engine build (build only: running a plan needs a CUDA binding we lack)

Parts run in that order under one deadline (--deadline-minutes, from the start): a part that would not fit what is
left is skipped with "deadline", and the two training runs are capped by it (a capped run says so). A part that
raises is recorded as failed and the others still run. --device cpu runs the GPU side on the CPU, so that every
path except the device itself is exercised where there is no GPU (the tests). Writes OUT/gpu_check.json and
OUT/gpu_check.md (a section to paste into docs/benchmarks.md). Without a GPU (no torch, a CPU build of torch, no
device visible) it prints "no GPU" with the reason, writes a report saying so and exits 0; otherwise it exits 1
when a part failed or a parity exceeded its tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("gpu_check")

PARTS = ("environment", "data", "train_gpu", "train_cpu", "embedding", "export", "ort_cpu", "ort_cuda", "ort_tensorrt",
         "faiss_gpu", "tensorrt_engines")
# Seconds a part needs at least; it is skipped when less is left before the deadline. Rough figures for the
# GPU machine (16 cores) at the default sizes: a guard against overrunning, not a prediction.
NEEDS_S = {"environment": 0, "data": 10, "train_gpu": 20, "train_cpu": 40, "embedding": 20, "export": 30,
           "ort_cpu": 5, "ort_cuda": 10, "ort_tensorrt": 60, "faiss_gpu": 5, "tensorrt_engines": 120}
AFTER_TRAINING_S = 90  # kept free for the parts after training when the training runs are capped
# Modules whose presence decides what can run; imported, not just looked up, so that a broken install shows.
MODULES = ("numpy", "PIL", "yaml", "tqdm", "tokenizers", "pyarrow", "onnx", "onnxruntime", "onnxscript", "onnx_ir",
           "onnxconverter_common", "faiss", "tensorrt", "ray")
OURS = ("cirflow.models.train", "cirflow.indexing.embedding.embed_stages", "cirflow.export.bundle", "cirflow.export.runtime",
        "cirflow.indexing.search.placement", "cirflow.export.tensorrt")
FP32_ATOL = 1e-4  # fp32 against fp32 (export/bundle.py's PARITY_ATOL); CUDA with TF32 off gave 1.5e-7 on an H200
GPU_EP_ATOL = 1e-3  # ORT's GPU providers choose their own kernels and math modes (TF32 among them)
TIE_TOL = 1e-4  # neighbour picks whose similarities differ by less than this count as the same pick
PROBE = 64  # images and queries that every ONNX Runtime provider encodes


@dataclass(frozen=True)
class ModelPreset:
    """Which model trains and on how much data. tiny: models.tiny.TINY_MODEL (batch 16, seconds on a CPU)."""

    tiny: bool
    train_triplets: int
    val_queries: int


# default: TrainConfig's own model (backbone tiny, 1.5M parameters, batch 256). The demo trains tiny-minilm, whose
# pretrained text tower comes from an 88 MB package the GPU machine does not have (no network there).
MODELS = {"default": ModelPreset(False, 3000, 300), "tiny": ModelPreset(True, 160, 40)}


@dataclass(frozen=True)
class CheckConfig:
    out: Path
    device: str = "auto"  # auto: the GPU when torch sees one, else "no GPU"; cpu: the GPU side simulated on the CPU
    model: str = "default"  # a key of MODELS
    # 500 steps at batch 256: about 75 s on the GPU machine's 16-core CPU (about 190 s on 2 cores here), a few
    # seconds on its GPU; enough for val R@1 to show that bf16 training learns as fp32 does.
    steps: int = 500
    images: int = 2048
    batch: int = 256  # embedding batch
    deadline_minutes: float = 8.0
    workdir: Path | None = None  # None: a temporary folder, removed at the end

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu"):
            raise ValueError(f"device={self.device!r} is not one of ['auto', 'cpu']")
        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r} is not one of {sorted(MODELS)}")
        for name in ("steps", "images", "batch", "deadline_minutes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


class Skipped(Exception):
    """A part that cannot run here; the message is the reason recorded."""


@dataclass(frozen=True)
class Deadline:
    end: float  # time.monotonic()

    def left(self) -> float:
        return self.end - time.monotonic()


@dataclass(frozen=True)
class Data:
    root: Path  # the shapes dataset
    catalog: list[Path]  # its image files, sorted, --images of them


@dataclass(frozen=True)
class Probe:
    """A few catalog images and val queries, with torch's CPU answer: what the GPU's query encoder and every
    ONNX Runtime provider are held against."""

    pixels: np.ndarray  # (P, 3, H, W) float32: catalog images
    query_pixels: np.ndarray  # (Q, 3, H, W) float32: val queries' reference images
    ids: np.ndarray  # (Q, L) int64: their captions
    mask: np.ndarray
    images: np.ndarray  # (P, D) torch on the CPU
    queries: np.ndarray  # (Q, D)


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # (N, D) the catalog on the CPU: the FAISS check's data
    probe: Probe


# --- where it runs ---------------------------------------------------------------------------------------------


def find_device(choice: str) -> tuple[str | None, str]:
    """("cuda" | "cpu" | None, why). None: no GPU here, for the reason given."""
    if choice == "cpu":
        return "cpu", "--device cpu: the GPU side runs on the CPU (a simulation; no GPU is used)"
    try:
        import torch
    except ImportError as e:
        return None, f"torch is not installed ({e})"
    if not torch.backends.cuda.is_built():
        return None, f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return None, (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device "
                      f"(CUDA_VISIBLE_DEVICES={visible!r})")
    return "cuda", torch.cuda.get_device_name(0)


def environment(device: str | None) -> dict[str, Any]:
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_name(),
           "cores": len(os.sched_getaffinity(0)), "load_average": round(os.getloadavg()[0], 2), "torch": torch_info(),
           "gpu": gpu_info() if device == "cuda" else None,
           "modules": {name: probe_import(name) for name in MODULES}, "ours": {}}
    if env["modules"]["onnxruntime"]["ok"]:
        env["onnxruntime_providers"] = import_module("onnxruntime").get_available_providers()
    if env["modules"]["faiss"]["ok"]:
        faiss = import_module("faiss")
        env["faiss_gpus"] = int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0
    if env["torch"].get("version"):  # our modules all import torch: without it each would say only that
        env["ours"] = {name: probe_import(name) for name in OURS}
    return env


def probe_import(name: str) -> dict[str, Any]:
    try:
        module = import_module(name)
    except Exception as e:  # ImportError, or whatever a broken install raises while importing
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return {"ok": True, "version": str(getattr(module, "__version__", "")), "file": getattr(module, "__file__", None)}


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def torch_info() -> dict[str, Any]:
    try:
        import torch
    except ImportError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"version": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads()}


def gpu_info() -> dict[str, Any]:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "count": torch.cuda.device_count(), "memory_mib": props.total_memory // 2**20,
            "capability": f"{props.major}.{props.minor}", "bf16": torch.cuda.is_bf16_supported(),
            "driver": nvidia_smi("driver_version")}


def nvidia_smi(field: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --- parts -----------------------------------------------------------------------------------------------------


def require(value: Any, part: str) -> Any:
    if value is None:
        raise Skipped(f"needs the {part} part, which did not complete")
    return value


def model_overrides(name: str) -> list[str]:
    if not MODELS[name].tiny:
        return []
    from cirflow.models.tiny import TINY_MODEL

    return list(TINY_MODEL)


def make_data(config: CheckConfig, root: Path) -> tuple[dict, Data]:
    from cirflow.core.config import load_config
    from cirflow.models.data.shapes import ShapesConfig, generate_shapes
    from cirflow.models.train_config import TrainConfig

    preset = MODELS[config.model]
    size = load_config(TrainConfig, None, [*model_overrides(config.model), "optim.max_steps=1"]).preprocess.size
    # At least one training triplet per catalog image: an image set holds ~1.4 images per query.
    shapes = ShapesConfig(seed=0, image_size=size, train_triplets=max(preset.train_triplets, config.images),
                          val_queries=preset.val_queries, test_queries=1, workers=min(8, os.cpu_count() or 1))
    generate_shapes(shapes, root)
    images = sorted(root.glob("images/*/*.png"))
    if len(images) < config.images:
        raise ValueError(f"--images {config.images}: the dataset has {len(images)} images")
    result = {"train_triplets": shapes.train_triplets, "val_queries": shapes.val_queries, "image_size": size,
              "images_on_disk": len(images), "catalog_images": config.images}
    return result, Data(root, images[:config.images])


def train_run(config: CheckConfig, data_root: Path, device: str, precision: str, run_dir: Path,
              cap_s: float) -> tuple[dict, Path]:
    """One models.train.train run of config.steps steps. The deadline enters as optim.max_minutes, which ends
    the run early only where it would not fit: the schedule follows whichever budget is further along, and a run
    that keeps pace with its steps stays ahead of its time budget."""
    import torch

    from cirflow.core.config import load_config
    from cirflow.models.train import train
    from cirflow.models.train_config import TrainConfig

    if cap_s < 1:
        raise Skipped(f"deadline: no time left for the {device} training run")
    overrides = [*model_overrides(config.model), f"data.root={data_root}", f"optim.max_steps={config.steps}",
                 f"optim.max_minutes={cap_s / 60:.3f}", "val_every_minutes=0", f"device={device}",
                 f"precision={precision}"]
    train_config = load_config(TrainConfig, None, overrides)
    log.info("training on %s (%s) for %d steps", device, precision, config.steps)
    checkpoint = train(train_config, run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    run = {"device": metrics["device"], "precision": "bf16 autocast" if metrics["bf16"] else "fp32",
           "steps": metrics["history"][-1]["step"], "batch_size": train_config.optim.batch_size,
           "samples_per_s": round(metrics["samples_per_s"], 1), "steady_samples_per_s": steady_rate(run_dir),
           "train_seconds": round(metrics["train_seconds"], 2),
           "wall_seconds": round(metrics["wall_seconds"], 2), "parameters": metrics["parameters"],
           "val": {k: round(metrics["val"][k], 4) for k in ("R@1", "R@5", "Rsubset@1")}}
    if device == "cpu":
        run["threads"] = torch.get_num_threads()
    if run["steps"] < config.steps:
        run["note"] = (f"stopped at step {run['steps']} of {config.steps}: the deadline capped it (its samples/s "
                       "still compare; its val recall does not)")
    return run, checkpoint


def steady_rate(run_dir: Path) -> float | None:
    """Median samples/s of train_log.jsonl's windows after the first (log_every_steps each): the rate without
    the first steps' one-off costs (CUDA context, kernel choice), which metrics.json's average includes."""
    path = run_dir / "train_log.jsonl"
    rates = [json.loads(line).get("samples_per_s") for line in path.read_text().splitlines()] if path.exists() else []
    rates = [r for r in rates[1:] if r is not None]
    return round(float(np.median(rates)), 1) if rates else None


def embedding(config: CheckConfig, data: Data, checkpoint: Path, device: str,
              trained: str) -> tuple[dict, Embedded]:
    """The catalog through the embedding job's reader and the trained image tower on the GPU against the CPU;
    the query encoder (compose) on the probe's queries too."""
    import torch

    from cirflow.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    probe = make_probe(loaded, data)
    preprocess = loaded.config.preprocess
    started = time.perf_counter()
    pixels = decode([str(p) for p in data.catalog], preprocess, config.batch)
    decode_s = time.perf_counter() - started
    reference, cpu_s = encode_images(loaded.model, pixels, preprocess, "cpu", config.batch, bf16=False)
    n = len(pixels)
    result = {"model": f"trained by {trained}", "images": n, "batch": config.batch,
              "decode": {"images_per_s": round(n / decode_s, 1), "seconds": round(decode_s, 2)},
              "cpu_fp32": {"device": "cpu", "images_per_s": round(n / cpu_s, 1), "threads": torch.get_num_threads()}}
    for name, bf16 in (("gpu_fp32", False), ("gpu_bf16", True)):
        if bf16 and device != "cuda":
            result[name] = {"skipped": "bf16 autocast needs CUDA (--device cpu)"}
            continue
        model = copy.deepcopy(loaded.model)
        vectors, seconds = encode_images(model, pixels, preprocess, device, config.batch, bf16)
        queries = encode_queries(model, probe, device, bf16)
        result[name] = {"device": device, "images_per_s": round(n / seconds, 1),
                        "max_abs_diff": float(np.abs(vectors - reference).max()),
                        "top1_neighbour_agreement": neighbour_agreement(reference, vectors),
                        "query_max_abs_diff": float(np.abs(queries - probe.queries).max())}
    fp32 = result["gpu_fp32"]
    result["tolerance"] = FP32_ATOL
    result["within_tolerance"] = max(fp32["max_abs_diff"], fp32["query_max_abs_diff"]) <= FP32_ATOL
    return result, Embedded(reference, probe)


def decode(uris: list[str], preprocess: Any, batch: int) -> np.ndarray:
    """(N, H, W, 3) uint8, read and decoded in batches by the embedding job's decode_batch."""
    from cirflow.indexing.embedding.embed_stages import decode_batch

    out = []
    for start in range(0, len(uris), batch):
        chunk = np.array(uris[start:start + batch], dtype=object)
        rows = decode_batch({"id": np.arange(len(chunk)), "uri": chunk, "shard": np.zeros(len(chunk))}, preprocess)
        bad = [f"{uri}: {error}" for uri, error in zip(chunk, rows["error"]) if error]
        if bad:
            raise ValueError(f"{len(bad)} catalog images did not decode, e.g. {bad[0]}")
        out.append(rows["pixels"])
    return np.concatenate(out)


def encode_images(model: Any, pixels: np.ndarray, preprocess: Any, device: str, batch: int,
                  bf16: bool) -> tuple[np.ndarray, float]:
    """(N, H, W, 3) uint8 -> (N, D) unit vectors and the seconds they took (normalisation and copies included),
    after one untimed warm-up batch (CUDA context, kernel choice)."""
    import torch

    from cirflow.models.preprocess import normalize_uint8

    model = model.to(device).eval()

    def run(chunk: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(normalize_uint8(chunk, preprocess)).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            return model.encode_image(x).float().cpu().numpy()

    with torch.inference_mode(), full_fp32():
        run(pixels[:batch])
        started = time.perf_counter()
        vectors = np.concatenate([run(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])
        return vectors, time.perf_counter() - started


def encode_queries(model: Any, probe: Probe, device: str, bf16: bool) -> np.ndarray:
    """The probe's queries through compose: (Q, D) unit vectors."""
    import torch

    with torch.inference_mode(), full_fp32(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        args = (torch.from_numpy(a).to(device) for a in (probe.query_pixels, probe.ids, probe.mask))
        return model.to(device).eval().compose(*args).float().cpu().numpy()


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """TF32 off, so that CUDA's fp32 is the CPU's fp32 and a difference means a bug, not a math mode."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def neighbour_agreement(reference: np.ndarray, other: np.ndarray, tol: float = TIE_TOL, chunk: int = 1024) -> float:
    """Share of rows whose nearest other row (itself excluded) under `other` is nearest under `reference` too, up
    to ties: a pick counts when its reference similarity is within `tol` of the reference's best."""
    agree = 0
    for start in range(0, len(reference), chunk):
        rows = np.arange(start, min(start + chunk, len(reference)))
        ref, oth = reference[rows] @ reference.T, other[rows] @ other.T
        ref[np.arange(len(rows)), rows] = oth[np.arange(len(rows)), rows] = -np.inf
        picked = ref[np.arange(len(rows)), oth.argmax(axis=1)]
        agree += int((picked >= ref.max(axis=1) - tol).sum())
    return round(agree / len(reference), 4)


def export(checkpoint: Path, work: Path) -> tuple[dict, Path]:
    """The checkpoint's ONNX bundle (export/bundle.py checks each graph against torch on random inputs)."""
    try:
        import onnxscript
    except ImportError as e:
        raise Skipped(f"onnxscript is not importable ({e}): torch's ONNX exporter needs it; `make gpu-wheels` "
                      "brings it") from e
    from cirflow.export.bundle import export_bundle

    started = time.perf_counter()
    bundle = export_bundle(checkpoint, work / "bundle")
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in bundle.iterdir())
    return {"seconds": round(seconds, 2), "megabytes": round(size / 2**20, 1),
            "onnxscript": onnxscript.__version__}, bundle


def make_probe(loaded: Any, data: Data) -> Probe:
    """PROBE catalog images and val queries (reference image + caption), read by the embedding job's read_image
    and tokenised by the checkpoint's tokenizer, with torch's CPU vectors for them."""
    import torch

    from cirflow.indexing.embedding.embed_stages import read_image
    from cirflow.models.data.loaders import load_split
    from cirflow.models.preprocess import normalize_uint8
    from cirflow.models.tokenizer import encode_texts

    preprocess = loaded.config.preprocess

    def pixels(paths: list[Path]) -> np.ndarray:
        return normalize_uint8(np.stack([read_image(str(p), preprocess) for p in paths]), preprocess)

    split = load_split(loaded.config.data.kind, data.root, loaded.config.data.val_split)
    queries = split.queries[:PROBE]
    ids, mask = encode_texts(loaded.tokenizer, [q.caption for q in queries])
    probe = {"pixels": pixels(data.catalog[:PROBE]), "ids": ids, "mask": mask,
             "query_pixels": pixels([split.images[q.reference] for q in queries])}
    with torch.inference_mode():
        images = loaded.model.eval().encode_image(torch.from_numpy(probe["pixels"])).numpy()
        composed = loaded.model.compose(*(torch.from_numpy(probe[k]) for k in ("query_pixels", "ids", "mask")))
    return Probe(**probe, images=images, queries=composed.numpy())


def ort_parity(bundle: Path, probe: Probe, providers: str, require_gpu: bool, atol: float) -> dict:
    """The bundle through BundleRuntime on `providers` against torch on the CPU."""
    from cirflow.export.runtime import BundleRuntime

    started = time.perf_counter()
    runtime = BundleRuntime.load(bundle, providers=providers, require_gpu=require_gpu)
    load_s = time.perf_counter() - started
    images = runtime.encode_images(probe.pixels)
    queries = runtime.encode_queries(probe.query_pixels, probe.ids, probe.mask)
    diffs = {"image_max_abs_diff": float(np.abs(images - probe.images).max()),
             "query_max_abs_diff": float(np.abs(queries - probe.queries).max())}
    return {"providers": runtime.providers, "load_seconds": round(load_s, 2), **diffs, "tolerance": atol,
            "within_tolerance": max(diffs.values()) <= atol}


def ort_gpu(bundle: Path | None, probe: Probe | None, choice: str, on_gpu: bool) -> dict:
    """An ORT GPU provider against torch on the CPU, where this onnxruntime has it."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise Skipped(f"onnxruntime is not importable ({e})") from e
    from cirflow.export.runtime import CUDA, TRT

    provider = {"cuda": CUDA, "tensorrt": TRT}[choice]
    available = ort.get_available_providers()
    if provider not in available:
        raise Skipped(f"not available: onnxruntime {ort.__version__} offers no {provider} (it offers {available}): "
                      "a CPU-only build; the GPU build is onnxruntime-gpu (requirements-gpu.txt)")
    if not on_gpu:
        raise Skipped("--device cpu: GPU providers are not run in a simulation")
    result = ort_parity(require(bundle, "export"), require(probe, "embedding"), choice, require_gpu=True,
                        atol=GPU_EP_ATOL)
    if result["providers"][0] != provider:
        raise RuntimeError(f"asked for {provider}, the sessions run on {result['providers']}")
    return result


def faiss_gpu(vectors: np.ndarray | None, on_gpu: bool, k: int = 10, queries: int = 256) -> dict:
    """indexing/search/placement.py's GPU copy of a flat index against the CPU index, on the catalog's CPU vectors."""
    try:
        import faiss

        from cirflow.indexing.search.placement import gpu_count, to_gpu
    except ImportError as e:
        raise Skipped(f"not importable: {e} (faiss-gpu is a 135 MB wheel, stack.md)") from e
    if gpu_count() == 0:
        kind = "a CPU build (no StandardGpuResources)" if not hasattr(faiss, "StandardGpuResources") else "no device"
        raise Skipped(f"faiss {faiss.__version__} sees no GPU: {kind}")
    if not on_gpu:
        raise Skipped("--device cpu: FAISS GPU is not run in a simulation")
    vectors = np.ascontiguousarray(require(vectors, "embedding"), dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    q = vectors[:queries]
    cpu_d, cpu_i = index.search(q, k)
    gpu_d, gpu_i = to_gpu(index, "flat").search(q, k)
    top1 = (gpu_i[:, 0] == cpu_i[:, 0]) | (np.abs(gpu_d[:, 0] - cpu_d[:, 0]) <= TIE_TOL)
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(cpu_i, gpu_i)])
    diff = float(np.abs(gpu_d - cpu_d).max())
    return {"vectors": len(vectors), "queries": len(q), "k": k, "distance_max_abs_diff": diff,
            "top1_agreement": round(float(top1.mean()), 4), "overlap_at_k": round(float(overlap), 4),
            "tolerance": FP32_ATOL, "within_tolerance": diff <= FP32_ATOL}


def tensorrt_engines(bundle: Path | None, work: Path, on_gpu: bool) -> dict:
    try:
        import tensorrt  # noqa: F401  (only whether it imports)
    except ImportError as e:
        raise Skipped(f"not importable: tensorrt ({e}); it installs from NVIDIA's index or container only") from e
    try:
        from cirflow.export.tensorrt import build_engines
    except ImportError as e:
        raise Skipped(f"export/tensorrt.py is not importable: {e}") from e
    if not on_gpu:
        raise Skipped("--device cpu: TensorRT is not run in a simulation")
    copy_dir = work / "bundle-trt"  # build_engines records the engines in the manifest: a copy keeps the original
    shutil.copytree(require(bundle, "export"), copy_dir)
    section = build_engines(copy_dir, fp16=True, max_batch=256)
    return {"tensorrt": section["tensorrt"], "precision": section["precision"], "fp16_method": section["fp16_method"],
            "megabytes": round(sum(e["bytes"] for e in section["engines"].values()) / 2**20, 1),
            "parity": "not measured: build only (running a plan needs a CUDA binding this check does not bring)"}


# --- running and reporting -------------------------------------------------------------------------------------


def run_part(name: str, deadline: Deadline, work: Callable[[], tuple[dict, Any]]) -> tuple[dict, Any]:
    """Run one part: its record (status ok / mismatch / skipped / failed, reason, seconds, result) and its value
    for the parts after it (None unless ok)."""
    record = {"name": name, "status": "skipped", "reason": "", "seconds": 0.0, "result": {}}
    left, needs = deadline.left(), NEEDS_S[name]
    if left < needs:
        record["reason"] = f"deadline: {max(left, 0):.0f} s left, this part needs about {needs} s"
        return record, None
    log.info("part %s ...", name)
    started, value = time.monotonic(), None
    try:
        result, value = work()
        ok = result.get("within_tolerance", True)
        record.update(status="ok" if ok else "mismatch", result=result,
                      reason="" if ok else "a parity exceeds its tolerance")
    except Skipped as e:
        record["reason"] = str(e)
    except Exception as e:  # one part's failure is a line in the report; the other parts still run
        log.exception("part %s failed", name)
        record.update(status="failed", reason=f"{type(e).__name__}: {e}")
    record["seconds"] = round(time.monotonic() - started, 2)
    log.info("part %s: %s in %.1f s%s", name, record["status"], record["seconds"],
             f" ({record['reason']})" if record["reason"] else "")
    return record, value


def run_check(config: CheckConfig, device: str, work: Path, deadline: Deadline) -> list[dict]:
    on_gpu = device == "cuda"
    records: list[dict] = []

    def part(name: str, work_fn: Callable[[], tuple[dict, Any]]) -> Any:
        record, value = run_part(name, deadline, work_fn)
        records.append(record)
        return value

    part("environment", lambda: (environment(device), None))
    data = part("data", lambda: make_data(config, work / "data"))
    precision = "bf16" if on_gpu else "fp32"
    # The GPU run gets a third of what the parts after training leave, the CPU run (the slow one) the rest.
    gpu = part("train_gpu", lambda: train_run(config, require(data, "data").root, device, precision,
                                              work / "train-gpu", (deadline.left() - AFTER_TRAINING_S) / 3))
    cpu = part("train_cpu", lambda: train_run(config, require(data, "data").root, "cpu", "fp32", work / "train-cpu",
                                              deadline.left() - AFTER_TRAINING_S))
    # A failed GPU run leaves the later parts the CPU run's model: their parities hold for any model.
    checkpoint, trained = (gpu, "train_gpu") if gpu else (cpu, "train_cpu")
    embedded = part("embedding", lambda: embedding(config, require(data, "data"), require(checkpoint, trained),
                                                   device, trained))
    probe = embedded.probe if embedded else None
    bundle = part("export", lambda: export(require(checkpoint, trained), work))
    part("ort_cpu", lambda: (ort_parity(require(bundle, "export"), require(probe, "embedding"), "cpu", False,
                                        FP32_ATOL), None))
    part("ort_cuda", lambda: (ort_gpu(bundle, probe, "cuda", on_gpu), None))
    part("ort_tensorrt", lambda: (ort_gpu(bundle, probe, "tensorrt", on_gpu), None))
    part("faiss_gpu", lambda: (faiss_gpu(embedded.vectors if embedded else None, on_gpu), None))
    part("tensorrt_engines", lambda: (tensorrt_engines(bundle, work, on_gpu), None))
    return records


def no_gpu_records(reason: str, deadline: Deadline, device: str | None) -> list[dict]:
    env, _ = run_part("environment", deadline, lambda: (environment(device), None))
    return [env, *({"name": name, "status": "skipped", "reason": f"no GPU: {reason}", "seconds": 0.0, "result": {}}
                   for name in PARTS[1:])]


def build_report(config: CheckConfig, device: str | None, reason: str, records: list[dict], command: str,
                 date: str, seconds: float) -> dict:
    return {"check": "gpu_check", "date": date, "command": command, "device": device, "device_note": reason,
            "no_gpu": device is None, "simulated": device == "cpu",
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
            "parts": records, "training_speedup": training_speedup(records), "seconds": round(seconds, 1),
            "load_average_end": round(os.getloadavg()[0], 2)}  # other jobs skew every timing: a busy end shows


def training_speedup(records: list[dict]) -> dict | None:
    """GPU side over CPU samples/s, when both runs finished."""
    runs = {p["name"]: p["result"] for p in records if p["name"] in ("train_gpu", "train_cpu") and p["status"] == "ok"}
    if len(runs) < 2:
        return None
    gpu, cpu = runs["train_gpu"], runs["train_cpu"]
    steady = (round(gpu["steady_samples_per_s"] / cpu["steady_samples_per_s"], 2)
              if gpu["steady_samples_per_s"] and cpu["steady_samples_per_s"] else None)
    return {"samples_per_s": round(gpu["samples_per_s"] / cpu["samples_per_s"], 2), "steady": steady}


def markdown(report: dict) -> str:
    parts = {p["name"]: p for p in report["parts"]}
    env = parts["environment"]["result"]
    gpu = (env or {}).get("gpu")
    title = gpu["name"] if gpu else "no GPU" if report["no_gpu"] else "CPU simulation"
    settings = report["settings"]
    lines = [f"## GPU check: {title}", "",
             f"- date: {report['date']}; machine: {machine_line(env)}",
             f"- command: `{report['command']}` ({report['seconds']:.0f} s; load average "
             f"{report['load_average_end']} at the end)",
             f"- settings: model {settings['model']}, {settings['steps']} training steps, {settings['images']} catalog "
             f"images, deadline {settings['deadline_minutes']:g} min"]
    if report["no_gpu"]:
        lines.append(f"- **no GPU**: {report['device_note']}. Nothing ran on a GPU.")
    elif report["simulated"]:
        lines.append("- **simulated**: --device cpu ran the GPU side on the CPU; no number here is a GPU's.")
    lines += ["", "| part | status | seconds | result |", "|---|---|---|---|"]
    for p in report["parts"]:
        text = SUMMARIES[p["name"]](p["result"]) if p["status"] in ("ok", "mismatch") else p["reason"]
        lines.append(f"| {p['name']} | {p['status']} | {p['seconds']:.1f} | {text.replace('|', '/')} |")
    if any(parts[name]["status"] == "ok" for name in ("train_gpu", "train_cpu")):
        lines += ["", training_table(parts, report["training_speedup"])]
    if parts["embedding"]["status"] in ("ok", "mismatch"):
        lines += ["", embedding_table(parts["embedding"]["result"])]
    return "\n".join(lines) + "\n"


def machine_line(env: dict | None) -> str:
    if not env:
        return "unknown"
    gpu = env.get("gpu")
    gpu_text = (f"{gpu['name']} ({gpu['memory_mib']:,} MiB, driver {gpu['driver']}, CUDA {env['torch']['cuda']})"
                if gpu else "no GPU")
    torch_text = f"torch {env['torch']['version']}" if env["torch"].get("version") else "no torch"
    return (f"{env['cpu']}, {env['cores']} cores, {gpu_text}; Python {env['python']}, {torch_text}; load average "
            f"{env['load_average']} at the start")


def training_table(parts: dict[str, dict], speedup: dict | None) -> str:
    rows = ["| run | device | precision | steps | samples/s (steady) | val R@1 | val Rsubset@1 |",
            "|---|---|---|---|---|---|---|"]
    runs = [(name, parts[name]["result"]) for name in ("train_gpu", "train_cpu") if parts[name]["status"] == "ok"]
    for name, run in runs:
        threads = f", {run['threads']} threads" if "threads" in run else ""
        steady = f" ({run['steady_samples_per_s']:,.0f})" if run["steady_samples_per_s"] else ""
        rows.append(f"| {name} | {run['device']}{threads} | {run['precision']} | {run['steps']} | "
                    f"{run['samples_per_s']:,.0f}{steady} | {run['val']['R@1']:.3f} | {run['val']['Rsubset@1']:.3f} |")
    rows.append("\nsamples/s: metrics.json's (training steps only, the first ones included); steady: the median of "
                "train_log.jsonl's windows after the first.")
    if speedup:
        steady = f" (steady {speedup['steady']:.2f}x)" if speedup["steady"] else ""
        rows.append(f"GPU side / CPU samples/s: {speedup['samples_per_s']:.2f}x{steady}.")
    return "\n".join(rows + [f"{name}: {run['note']}" for name, run in runs if "note" in run])


def embedding_table(result: dict) -> str:
    rows = ["| encoder | device | images/s | max abs diff vs CPU: images / queries | top-1 neighbour agreement |",
            "|---|---|---|---|---|"]
    rows.append(f"| decode (decode_batch) | cpu, 1 process | {result['decode']['images_per_s']:,.0f} | | |")
    rows.append(f"| CPU fp32 (reference) | cpu, {result['cpu_fp32']['threads']} threads | "
                f"{result['cpu_fp32']['images_per_s']:,.0f} | | |")
    for name, label in (("gpu_fp32", "GPU fp32, TF32 off"), ("gpu_bf16", "GPU bf16 autocast")):
        run = result[name]
        if "skipped" in run:
            rows.append(f"| {label} | skipped: {run['skipped']} | | | |")
        else:
            rows.append(f"| {label} | {run['device']} | {run['images_per_s']:,.0f} | {run['max_abs_diff']:.1e} / "
                        f"{run['query_max_abs_diff']:.1e} | {run['top1_neighbour_agreement']:.4f} |")
    return "\n".join(rows)


def _environment_summary(r: dict) -> str:
    missing = [name for name, m in r["modules"].items() if not m["ok"]]
    ours = [name.removeprefix("cirflow.") for name, m in r["ours"].items() if not m["ok"]]
    providers = r.get("onnxruntime_providers", "no onnxruntime")
    return (f"torch {r['torch'].get('version', 'missing')}, CUDA {r['torch'].get('cuda')}; ORT providers "
            f"{providers}; not importable: {', '.join(missing) or 'none'}; ours not importable: "
            f"{', '.join(ours) or 'none'}")


def _train_summary(r: dict) -> str:
    return (f"{r['samples_per_s']:,.0f} samples/s on {r['device']} ({r['precision']}), {r['steps']} steps; val R@1 "
            f"{r['val']['R@1']:.3f}" + (f"; {r['note']}" if "note" in r else ""))


def _embedding_summary(r: dict) -> str:
    g = r["gpu_fp32"]
    return (f"{r['images']} images: CPU {r['cpu_fp32']['images_per_s']:,.0f}/s, {g['device']} fp32 "
            f"{g['images_per_s']:,.0f}/s, max abs diff {g['max_abs_diff']:.1e} (queries "
            f"{g['query_max_abs_diff']:.1e}), top-1 neighbour agreement {g['top1_neighbour_agreement']:.4f}")


def _ort_summary(r: dict) -> str:
    return (f"{r['providers'][0]}: max abs diff vs torch CPU {r['image_max_abs_diff']:.1e} (images), "
            f"{r['query_max_abs_diff']:.1e} (queries); tolerance {r['tolerance']:g}")


SUMMARIES: dict[str, Callable[[dict], str]] = {
    "environment": _environment_summary,
    "data": lambda r: f"{r['train_triplets']:,} train triplets, {r['val_queries']} val queries, "
                      f"{r['images_on_disk']:,} images ({r['image_size']} px)",
    "train_gpu": _train_summary,
    "train_cpu": _train_summary,
    "embedding": _embedding_summary,
    "export": lambda r: f"bundle {r['megabytes']} MB in {r['seconds']:.1f} s (onnxscript {r['onnxscript']})",
    "ort_cpu": _ort_summary,
    "ort_cuda": _ort_summary,
    "ort_tensorrt": _ort_summary,
    "faiss_gpu": lambda r: f"top-1 agreement {r['top1_agreement']:.4f}, overlap@{r['k']} {r['overlap_at_k']:.4f}, "
                           f"distance max abs diff {r['distance_max_abs_diff']:.1e}",
    "tensorrt_engines": lambda r: f"TensorRT {r['tensorrt']} {r['precision']} engines, {r['megabytes']} MB; "
                                  f"{r['parity']}",
}


def write_report(out: Path, report: dict) -> None:
    from cirflow.core.files import write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "gpu_check.json", report)
    write_text_atomic(out / "gpu_check.md", markdown(report))


@contextlib.contextmanager
def work_dir(path: Path | None) -> Iterator[Path]:
    if path is None:
        with tempfile.TemporaryDirectory(prefix="cirflow-gpu-check-") as tmp:
            yield Path(tmp)
        return
    if path.exists() and any(path.iterdir()):
        # train() hands back a finished run at once: its numbers would be an old run's, not this one's.
        raise SystemExit(f"--workdir {path} is not empty; give a new or empty folder")
    path.mkdir(parents=True, exist_ok=True)
    yield path


def parse_args(argv: list[str] | None) -> CheckConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="auto: the GPU torch sees, else report 'no GPU'; cpu: simulate the GPU side on the CPU")
    parser.add_argument("--steps", type=int, default=CheckConfig.steps, help="training steps, on each device")
    parser.add_argument("--images", type=int, default=CheckConfig.images, help="catalog images to embed")
    parser.add_argument("--deadline-minutes", type=float, default=CheckConfig.deadline_minutes)
    parser.add_argument("--model", choices=sorted(MODELS), default=CheckConfig.model,
                        help="default: TrainConfig's model; tiny: models.tiny.TINY_MODEL (tests)")
    parser.add_argument("--workdir", type=Path, help="keep data, runs and bundle here (new or empty folder)")
    args = parser.parse_args(argv)
    try:
        return CheckConfig(out=args.out, device=args.device, model=args.model, steps=args.steps, images=args.images,
                           deadline_minutes=args.deadline_minutes, workdir=args.workdir)
    except ValueError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    started = time.monotonic()
    deadline = Deadline(started + 60 * config.deadline_minutes)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from report import today
    except ImportError as e:
        raise SystemExit(f"cirflow does not import here ({e}): run `make gpu-check`, or put the source tree on "
                         "PYTHONPATH as docs/benchmarks-guide.md's 'GPU check' shows") from e
    command = shlex.join(["python3", "bench/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    device, reason = find_device(config.device)
    if device is None:
        print(f"no GPU: {reason}; nothing to check on a GPU (report in {config.out})", flush=True)
        records = no_gpu_records(reason, deadline, device)
    else:
        print(f"GPU check on {reason}" if device == "cuda" else reason, flush=True)
        with work_dir(config.workdir) as work:
            records = run_check(config, device, work, deadline)
    report = build_report(config, device, reason, records, command, today(), time.monotonic() - started)
    write_report(config.out, report)
    counts = {s: sum(p["status"] == s for p in records) for s in ("ok", "mismatch", "skipped", "failed")}
    print(f"gpu check: {', '.join(f'{n} {s}' for s, n in counts.items())} in {report['seconds']:.0f} s; "
          f"report: {config.out / 'gpu_check.md'}", flush=True)
    return 1 if counts["failed"] or counts["mismatch"] else 0


if __name__ == "__main__":
    sys.exit(main())

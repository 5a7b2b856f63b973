"""Where FAISS runs: GPU when the installed faiss sees one (and the index type has a GPU version), else CPU.

faiss-cpu and faiss-gpu share the import name; only a GPU build has `StandardGpuResources`. faiss's GPU
cloner (gpu/GpuCloner.cpp) moves IndexFlat, IndexIVFFlat and IndexIVFPQ to the GPU and recurses into
IndexIDMap; HNSW has no GPU version (only CAGRA, with cuVS), so HNSW always stays on the CPU.
"""

from __future__ import annotations

import logging

import faiss

from cirflow.core.config import check_choice

log = logging.getLogger(__name__)

USE_GPU = ("auto", "never", "require")
GPU_TYPES = ("flat", "ivf_flat", "ivf_pq")
GPU_MAX_K = 2048  # faiss GPU k-selection limit, for k and nprobe alike


class FaissGpuUnavailableError(RuntimeError):
    """use_gpu="require" but faiss sees no GPU (a faiss-cpu build, or no CUDA device)."""


def gpu_count() -> int:
    if not hasattr(faiss, "StandardGpuResources"):
        return 0  # faiss-cpu: get_num_gpus exists there too, but the GPU classes do not
    return int(faiss.get_num_gpus())


def resolve_gpu(use_gpu: str, index_type: str, what: str) -> bool:
    """Whether `what` ("build", "search") of an `index_type` index runs on GPU; logs the choice once."""
    check_choice(use_gpu, "use_gpu", USE_GPU)
    if use_gpu == "never":
        log.info("faiss %s of %s on CPU (use_gpu='never')", what, index_type)
        return False
    count = gpu_count()
    if count == 0:
        if use_gpu == "require":
            raise FaissGpuUnavailableError(
                f"use_gpu='require' but faiss {faiss.__version__} sees no GPU (a faiss-cpu build, or no CUDA "
                "device); install a faiss GPU build (requirements-gpu.txt) on a CUDA machine, or use 'auto'")
        log.info("faiss %s of %s on CPU: faiss %s sees no GPU", what, index_type, faiss.__version__)
        return False
    if index_type not in GPU_TYPES:
        log.info("faiss %s of %s on CPU: faiss has no GPU %s index (%d GPU(s) unused)", what, index_type,
                 index_type, count)
        return False
    log.info("faiss %s of %s on %d GPU(s)", what, index_type, count)
    return True


def to_gpu(index: faiss.Index, index_type: str) -> faiss.Index:
    """A GPU copy of a CPU index on every visible GPU (replicas: each holds the whole index)."""
    options = faiss.GpuMultipleClonerOptions()
    # For IVF-PQ this only switches the lookup tables to float16, which GPU IVF-PQ needs for many sub-quantizers
    # (the per-query tables must fit in shared memory); for Flat it would store the vectors in float16.
    options.useFloat16 = index_type == "ivf_pq"
    return faiss.index_cpu_to_all_gpus(index, co=options)


def to_cpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index)


def set_search_param(index: faiss.Index, name: str, value: int, on_gpu: bool) -> None:
    """Set nprobe / efSearch through faiss's parameter spaces, which reach through IndexIDMap, IndexShards and
    (GPU) replicas."""
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    space.set_index_parameter(index, name, value)

"""Data-parallel training on Ray Train: where `train()` goes when distributed.workers > 1 or an address is set.

The driver (the calling process) writes the run's tokenizer and config.yaml, joins or starts Ray
(cirflow.core.ray_local), checks that the cluster can hold the workers, and runs a TorchTrainer: DDP over gloo
on CPUs, NCCL on GPUs, one GPU per worker. Every worker runs the one recipe (models/train_recipe.py `run_recipe`)
on its share of each global batch (models/data_parallel.py). The leader (rank 0) writes the run directory as a
single process would and hands each checkpoint to Ray Train (`ray.train.report`), which keeps the latest in its
storage (distributed.storage, default <run dir>/ray). A rerun of an unfinished run resumes from the more
advanced of that and checkpoints/last.pt, so a run may also switch between single-process and distributed.
Ray is imported on this path only: models/ imports without it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cirflow.core.files import link_or_copy, write_atomic
from cirflow.core.logs import configure_logging
from cirflow.core.ray_local import check_job_paths, connect_ray
from cirflow.models.data_parallel import Worker
from cirflow.models.device import DeviceError, resolve
from cirflow.models.tokenizer import tokenizer_from_json
from cirflow.models.train_config import DistributedConfig, TrainConfig
from cirflow.models.train_loop import Run
from cirflow.models.train_recipe import load_train_split, run_recipe
from cirflow.models.train_run_dir import FINAL, METRICS, prepare_run, read_last

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """The Ray cluster cannot hold the configured workers (Ray itself would wait for them forever)."""


def train_distributed(config: TrainConfig, run_dir: Path) -> Path:
    """`train()` on Ray Train workers; returns the final checkpoint's path (the same files as a single process)."""
    try:
        import ray
        from ray.train import CheckpointConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as e:
        raise ImportError(f"distributed training (distributed.workers={config.distributed.workers}, address="
                          f"{config.distributed.address!r}) runs on Ray Train: install ray[train] ({e})") from e

    spec = config.distributed
    # A job submitted with a working_dir runs in Ray's temporary copy of it: relative paths would land there.
    check_job_paths({"run_dir (cirflow train --workdir)": str(run_dir), "data.root": config.data.root,
                     "distributed.storage": spec.storage,
                     "stem_cache_dir": config.stem_cache_dir})
    run_dir = run_dir.resolve()  # workers run in Ray Train's own working directories
    # A local instance gets a dashboard: Ray Train's placement-group cleaner asks its state API every second
    # whether the run's controller still lives, and logs a warning each time it cannot.
    connected = connect_ray(spec.address or None, spec.workers * spec.cpus_per_worker, include_dashboard=True)
    try:
        use_gpu = workers_use_gpu(config.device, spec, ray.cluster_resources())
        config, tokenizer = prepare_run(config, load_train_split(config), run_dir)
        storage = spec.storage if "://" in spec.storage else str(Path(spec.storage or run_dir / "ray").resolve())
        log.info("training %s on %d Ray Train workers (%s, %s), checkpoints in %s/%s", run_dir, spec.workers,
                 "GPUs" if use_gpu else "CPUs", "nccl" if use_gpu else "gloo", storage, run_dir.name)
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"config": config, "tokenizer": tokenizer.to_str(), "run_dir": str(run_dir),
                               "cwd": os.getcwd(), "use_gpu": use_gpu,
                               "log_level": logging.getLogger("cirflow").getEffectiveLevel()},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": spec.cpus_per_worker}),
            # Ray Train finds the run's checkpoints again by storage and name: a rerun resumes.
            run_config=RunConfig(name=run_dir.name, storage_path=storage,
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)))
        result = trainer.fit()
        final = run_dir / FINAL
        if not final.exists():  # the leader ran where this run_dir is not: take the files from storage
            _copy_from(result.checkpoint, [run_dir / METRICS, final])
    finally:
        if connected:
            ray.shutdown()
    return final


def workers_use_gpu(device: str, spec: DistributedConfig, resources: dict[str, float]) -> bool:
    """Whether the workers train on GPUs (one each), from `device` and the cluster's resources. Checked before
    anything starts: Ray waits forever for resources a cluster does not have."""
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if cpus < spec.workers * spec.cpus_per_worker:
        raise ClusterError(f"distributed.workers={spec.workers} x cpus_per_worker={spec.cpus_per_worker} need "
                           f"{spec.workers * spec.cpus_per_worker} CPUs; the Ray cluster has {cpus:g}")
    if device == "cpu":
        return False
    if gpus >= spec.workers:
        return True
    if device == "cuda":
        raise DeviceError(f"device=cuda trains each of the distributed.workers={spec.workers} workers on a GPU of "
                          f"its own, and the Ray cluster has {gpus:g} GPUs; use device=cpu or auto, fewer "
                          "workers, or a cluster with GPUs")
    log.info("device=auto: the Ray cluster has %g GPUs for %d workers, training on CPUs", gpus, spec.workers)
    return False


def _worker(args: dict[str, Any]) -> None:
    """One Ray Train worker: the recipe on this worker's share of every global batch."""
    import ray.train
    from ray.train.torch import get_device

    configure_logging(logging.WARNING)  # a Ray worker process: log as the driver does (a no-op where configured)
    logging.getLogger("cirflow").setLevel(args["log_level"])
    if os.path.isdir(args["cwd"]):
        os.chdir(args["cwd"])  # relative paths of the config (data.root, ...) are the driver's
    config: TrainConfig = args["config"]
    run_dir = Path(args["run_dir"])
    use_gpu = args["use_gpu"]
    placement = resolve("cuda" if use_gpu else "cpu", config.precision if use_gpu else "fp32")
    if placement.cuda:
        placement = replace(placement, device=get_device())  # this worker's own GPU, not cuda:0
        torch.cuda.set_device(placement.device)
    context = ray.train.get_context()
    worker = Worker(context.get_world_rank(), context.get_world_size(), placement.device)
    started = time.monotonic()
    resume = _newest(read_last(run_dir), _reported_last(ray.train.get_checkpoint()))
    progress = _progress_of(resume)
    if worker.agree(*progress) != progress:
        raise RuntimeError(f"worker {worker.rank} would resume {run_dir} at (stage, step) {progress}, rank 0 "
                           f"elsewhere: the run directory must be on storage that every worker sees")
    run_recipe(config, tokenizer_from_json(args["tokenizer"]), load_train_split(config), resume,
               Run(run_dir, placement, started, worker, _report))


def _newest(*payloads: dict[str, Any] | None) -> dict[str, Any] | None:
    """The most advanced of the last.pt payloads found (None: none)."""
    return max((p for p in payloads if p is not None), key=_progress_of, default=None)


def _progress_of(payload: dict[str, Any] | None) -> tuple[int, int]:
    return (-1, -1) if payload is None else (payload["state"]["stage"], payload["state"]["step"])


def _reported_last(checkpoint: Any) -> dict[str, Any] | None:
    """last.pt of the latest checkpoint Ray Train holds for this run (a restart, or a rerun of a killed one)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        path = Path(directory) / "last.pt"
        return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def _report(metrics: dict[str, Any], files: list[Path]) -> None:
    """Every worker reports (Ray Train's report is a barrier); the leader's files become the checkpoint."""
    import ray.train

    if not files:
        ray.train.report(metrics)
        return
    # Ray copies the checkpoint directory into its storage: links to the files written, not a second write.
    with tempfile.TemporaryDirectory(dir=files[0].parent, prefix=".report-") as tmp:
        for path in files:
            link_or_copy(path, Path(tmp) / path.name)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         delete_local_checkpoint_after_upload=False)


def _copy_from(checkpoint: Any, targets: list[Path]) -> None:
    """The final files from Ray Train's latest checkpoint (the final one) into the run directory, each written
    atomically and model.pt last: its presence marks a finished run."""
    if checkpoint is None:
        raise RuntimeError(f"distributed training ended without a checkpoint; expected {targets[0]}")
    with checkpoint.as_directory() as directory:
        for target in sorted(targets, key=lambda t: t.name == "model.pt"):
            source = Path(directory) / target.name
            write_atomic(target, lambda tmp, source=source: shutil.copyfile(source, tmp))

"""Distributed training on Ray Train: two workers on a local Ray instance train the tiny model as one process does
(same global batch, steps and seed) and write the same run directory, also when the run's driver is killed and the
run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cirflow.core.config import load_config
from cirflow.models.checkpoint import load_checkpoint
from cirflow.models.device import DeviceError
from cirflow.models.tiny import TINY_MODEL
from cirflow.models.train import train
from cirflow.models.train_config import TrainConfig

pytest.importorskip("ray.train", reason="distributed training needs ray[train]")

STEPS = 40  # as tests/models/test_train.py: enough to move R@10 well above an untrained model's
COMPARED = (f"optim.max_steps={STEPS}", "optim.lr=3e-3", "log_every_steps=1")  # the single and distributed runs
CHECKPOINT_EVERY = "checkpoint_every_minutes=0.01"  # the distributed run's driver is killed at its first checkpoint


def config(overrides: list[str], *extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, [*overrides, *extra])


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """One local Ray instance (2 CPUs, 127.0.0.1) for the module: train() joins a Ray it finds connected instead
    of starting its own, and a subprocess joins it by address."""
    import ray

    from cirflow.core.ray_local import start_local_ray

    with pytest.MonkeyPatch.context() as env:
        # Ray Train's controller polls its workers every 2 s: a run would end up to 2 s after its last step.
        env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        start_local_ray(2)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def killed_and_resumed(tiny_shapes: Path, ray_address: str,
                       tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int, float]:
    """A distributed run (two workers) of the compared config whose driver, the `cirflow train` command in a process
    of its own joined to this module's Ray instance, is killed at its first checkpoint, then rerun here (no
    address: the connected instance) on the same run directory: (run directory, final checkpoint, step the rerun
    resumed from, seconds the rerun took). The two tests below check it: each Ray Train run pays 10-15 s of
    worker start on 2 cores, and a separate uninterrupted run would pay it a third time."""
    import ray

    tmp_path = tmp_path_factory.mktemp("distributed")
    run, workdir = tmp_path / "work" / "runs" / "killed", tmp_path / "work"
    overrides = [f"data.root={tiny_shapes}", *TINY_MODEL, *COMPARED, CHECKPOINT_EVERY, "distributed.workers=2"]
    with (tmp_path / "driver.log").open("w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "cirflow.flows.cli", "train", "--workdir", str(workdir),
                                   "--run-id", "killed", *overrides, f"distributed.address={ray_address}"],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "last.pt").exists():
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and anything it started itself (nothing, here)
        driver.wait()
    # Ray ends the dead driver's controller and workers: their CPUs come back.
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2:
        assert time.monotonic() < deadline, f"the killed run's workers still hold {ray.available_resources()}"
        time.sleep(0.2)
    assert not (run / "checkpoints" / "model.pt").exists()
    killed_at = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["state"]["step"]
    assert 0 < killed_at < STEPS
    assert list((run / "ray" / "killed").glob("checkpoint_*/last.pt"))  # Ray Train's copy of it
    started = time.monotonic()
    final = train(config(overrides), run)
    return run, final, killed_at, time.monotonic() - started


def last_entry_per_step(log: list[dict]) -> list[dict]:
    """The log's entries in step order, the latest of each step: a killed driver may have logged steps after its
    last checkpoint, which the rerun logs again."""
    return list({e["step"]: e for e in log}.values())


def test_two_workers_train_as_one_process(tiny_overrides: list[str], killed_and_resumed: tuple[Path, Path, int, float],
                                          tmp_path: Path) -> None:
    run, dist, _, seconds = killed_and_resumed
    single = train(config(tiny_overrides, *COMPARED), tmp_path / "single")
    assert dist == run / "checkpoints" / "model.pt"

    # Gathered features and global BatchNorm statistics: the two workers compute the single process's loss and
    # gradient, so the runs differ only by floating-point summation order (measured: 1e-6 at step 1, 5e-4 at
    # step 40; the same R@k). The combiner's dropout masks agree too: both draw them from one seeded generator,
    # whose state a resumed run restores.
    single_log, dist_log = read_log(tmp_path / "single"), last_entry_per_step(read_log(run))
    assert [e["step"] for e in dist_log] == list(range(1, STEPS + 1))
    for a, b in zip(single_log[:5], dist_log[:5]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
    for a, b in zip(single_log, dist_log):
        assert b["loss"] == pytest.approx(a["loss"], abs=0.02), (a["step"], a["loss"], b["loss"])
    single_metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["workers"], single_metrics["workers"]) == (2, 1)
    assert metrics["train_samples"] == single_metrics["train_samples"] == STEPS * 16
    # 40 val queries: R@10 moves in steps of 0.025; an untrained model scores 0.10.
    for key in ("R@10", "R@50", "Rsubset@1"):
        assert metrics["val"][key] == pytest.approx(single_metrics["val"][key], abs=0.05), key
    assert metrics["val"]["R@10"] > 0.3

    # The same checkpoint format: it loads alone, with the single process's keys and (nearly) its weights.
    a, b = load_checkpoint(single), load_checkpoint(dist)
    assert b.payload["metrics"]["val"] == metrics["val"]
    assert a.model.state_dict().keys() == b.model.state_dict().keys()
    for name, tensor in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[name].float(), tensor.float(), atol=0.02, rtol=0.02,
                                   msg=name)
    # Ray Train kept the final checkpoint in its storage (in the run directory by default), the run's own files
    # by hard link or copy. Before it (names sort by time) there may still be the killed driver's last one.
    stored = sorted(p for p in (run / "ray" / "killed").glob("checkpoint_*") if p.is_dir())
    files = [sorted(p.name for p in d.iterdir()) for d in stored]
    assert files[-1] == ["metrics.json", "model.pt"] and all(f == ["last.pt"] for f in files[:-1]), files
    # A finished run is returned at once, whatever the worker count (where it ran is not what it computed).
    again = time.monotonic()
    assert train(config(tiny_overrides, *COMPARED, CHECKPOINT_EVERY), run) == dist
    assert time.monotonic() - again < 1.0 < seconds


def test_killed_distributed_run_resumes(killed_and_resumed: tuple[Path, Path, int, float]) -> None:
    run, final, killed_at, _ = killed_and_resumed
    steps_logged = [e["step"] for e in read_log(run)]
    assert steps_logged[killed_at - STEPS:] == list(range(killed_at + 1, STEPS + 1))  # the rerun's steps
    assert steps_logged.count(1) == 1 and set(steps_logged) == set(range(1, STEPS + 1))  # none from scratch
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_samples"] == STEPS * 16 and metrics["workers"] == 2
    assert load_checkpoint(final).payload["metrics"]["val"] == metrics["val"]


def test_bad_distributed_configs_are_refused(tiny_overrides: list[str], ray_address: str, tmp_path: Path) -> None:
    # A GPU per worker on a cluster without GPUs: an error at once, where Ray would wait forever.
    with pytest.raises(DeviceError, match=r"device=cuda trains each of the distributed.workers=2 workers on a GPU "
                                          r"of its own, and the Ray cluster has 0 GPUs"):
        train(config(tiny_overrides, "optim.max_steps=1", "distributed.workers=2", "device=cuda"), tmp_path / "gpu")
    from cirflow.models.train_ray import ClusterError

    with pytest.raises(ClusterError, match="distributed.workers=4 x cpus_per_worker=1 need 4 CPUs; the Ray cluster "
                                           "has 2"):
        train(config(tiny_overrides, "optim.max_steps=1", "distributed.workers=4"), tmp_path / "cpus")
    assert not (tmp_path / "gpu").exists() and not (tmp_path / "cpus").exists()  # refused before writing
    # Submitted as a Ray job with a working_dir: a relative run directory would be written into Ray's copy of it.
    from cirflow.core.ray_local import JOB_CONFIG_ENV, RayJobPathError

    with pytest.MonkeyPatch.context() as env:
        env.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "/tmp/job"}}))
        with pytest.raises(RayJobPathError, match=r"run_dir \(cirflow train --workdir\)='workdir/runs/x' is a "
                                                  "relative path"):
            train(config(tiny_overrides, "optim.max_steps=1", "distributed.workers=2"), Path("workdir/runs/x"))
    assert not Path("workdir/runs/x").exists()


def test_the_rayjob_manifest_trains_one_worker_per_gpu_pod() -> None:
    """deploy/ray/rayjob-train.yaml: its entrypoint is `cirflow train` with a config that loads strictly, one
    Ray Train worker per GPU pod, absolute paths only (a Ray job runs in a copy of its working dir)."""
    import shlex

    import yaml

    repo = Path(__file__).resolve().parents[2]
    rayjob = yaml.safe_load((repo / "deploy" / "ray" / "rayjob-train.yaml").read_text())
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["cirflow", "train"]
    flags = dict(zip(argv[2::2], argv[3::2]))
    assert flags["--config"] == "/data/configs/shapes_demo.yaml" and flags["--workdir"].startswith("/")
    overrides = [a for a in argv[2:] if "=" in a and not a.startswith("--")]
    job = load_config(TrainConfig, repo / "configs" / "shapes_demo.yaml", overrides)
    assert job.data.root.startswith("/") and job.device == "cuda"
    assert job.optim.batch_size % job.distributed.workers == 0
    [workers] = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert workers["replicas"] == workers["minReplicas"] == job.distributed.workers and gpus == "1"

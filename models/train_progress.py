"""What a training run says about itself: per-step progress (bar, train_log.jsonl, log lines), validation
results in its history, and the summary that becomes metrics.json."""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from cirflow.models.device import Placement

log = logging.getLogger(__name__)

HISTORY_KEYS = ("stage", "step", "minutes", "train_seconds")  # a history entry's other keys are val metrics


class StepLog:
    """One stage's steps: a progress bar (the leader's, on a terminal), and every `every` steps a line of
    train_log.jsonl and of the log, with the throughput since the previous one (the leader's only)."""

    def __init__(self, path: Path, stage: str, step: int, every: int, leader: bool) -> None:
        self.path, self.stage, self.every, self.leader = path, stage, every, leader
        self.bar = tqdm(desc=stage, unit="step", disable=not (leader and sys.stderr.isatty()), initial=step)
        self.window_start, self.window_samples = time.monotonic(), 0

    def record(self, step: int, samples: int, loss: float, lr: float, scale: Callable[[], torch.Tensor],
               elapsed: float, terms: dict) -> None:
        """Step `step` done on `samples` training samples; `scale` is read only when a line is written."""
        self.window_samples += samples
        self.bar.update()
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if step % self.every == 0 and self.leader:
            rate = self.window_samples / (time.monotonic() - self.window_start)
            with self.path.open("a") as f:
                f.write(json.dumps({"stage": self.stage, "step": step, "loss": loss, "lr": lr,
                                    "scale": scale().item(), "samples_per_s": rate, "elapsed": elapsed,
                                    **terms}) + "\n")
            log.info("%s step %d loss %.4f lr %.2e scale %.1f %.0f samples/s", self.stage, step, loss, lr,
                     scale().item(), rate)
            self.window_start, self.window_samples = time.monotonic(), 0

    def close(self) -> None:
        self.bar.close()


def record_validation(state: dict, stage: str, metrics: dict[str, float]) -> None:
    """A validation's composed-query metrics as the next entry of the run's history."""
    state["history"].append({"stage": stage, "step": state["step"], "minutes": state["elapsed"] / 60, **metrics})
    log.info("val %s step %d (%.1f min): R@1 %.4f R@5 %.4f Rsubset@1 %.4f", stage, state["step"],
             state["elapsed"] / 60, metrics["R@1"], metrics["R@5"], metrics["Rsubset@1"])


def run_metrics(state: dict, placement: Placement, method: str, workers: int, parameters: int,
                started: float) -> dict[str, Any]:
    """metrics.json of a finished run, from the training loop's final `state` (the leader's)."""
    # The last stage ended with a validation of this very model: its metrics, not a second pass over val.
    last_val = {k: v for k, v in state["history"][-1].items() if k not in HISTORY_KEYS}
    metrics = {"device": str(placement.device), "bf16": placement.bf16, "val": last_val,
               "method": method, "history": state["history"], "workers": workers,
               "parameters": parameters, "train_samples": state["samples"],
               "train_seconds": sum(h["train_seconds"] for h in state["history"] if "train_seconds" in h),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # the leader's
               "wall_seconds": time.monotonic() - started}  # the whole job: decoding and validation too
    metrics["samples_per_s"] = metrics["train_samples"] / max(metrics["train_seconds"], 1e-9)
    return metrics

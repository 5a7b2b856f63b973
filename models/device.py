"""Where training runs: `device` auto / cpu / cuda and `precision` fp32 / bf16, resolved once at job start.

auto picks CUDA only when torch was built with it and sees a GPU: a CPU-only machine never initialises CUDA.
An explicit `cuda` without a GPU is an error at once, before any data is read. bf16 is autocast on CUDA (the
weights and the optimiser stay fp32); where auto lands on the CPU it falls back to fp32 with a log line.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, TypeVar

import torch

from cirflow.core.config import check_choice

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
T = TypeVar("T")


class DeviceError(RuntimeError):
    pass


@dataclass(frozen=True)
class Placement:
    device: torch.device
    bf16: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16) if self.cuda else \
            torch.autocast("cpu", enabled=False)


def cuda_usable() -> bool:
    """True only where torch has CUDA built in and sees a device; checks the build first, so a CPU wheel
    never touches a CUDA runtime."""
    return torch.backends.cuda.is_built() and torch.cuda.is_available()


def resolve(device: str, precision: str) -> Placement:
    check_choice(device, "device", DEVICES, error=DeviceError)
    check_choice(precision, "precision", PRECISIONS, error=DeviceError)
    if device == "cpu" and precision == "bf16":
        raise DeviceError("precision=bf16 is autocast on a CUDA GPU; with device=cpu use precision=fp32")
    if device == "cuda" and not cuda_usable():
        why = ("this torch build has no CUDA" if not torch.backends.cuda.is_built()
               else f"torch sees no CUDA device (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        raise DeviceError(f"device=cuda but {why}; use device=auto or device=cpu")
    if device == "cpu" or (device == "auto" and not cuda_usable()):
        if precision == "bf16":
            log.warning("device=auto found no CUDA GPU: training on the CPU in fp32 (bf16 autocast needs a GPU)")
        elif device == "auto":
            log.info("device=auto: no CUDA GPU, training on the CPU")
        return Placement(torch.device("cpu"), False)
    placement = Placement(torch.device("cuda"), precision == "bf16")
    log.info("training on %s (%s)%s", torch.cuda.get_device_name(0), placement.device,
             ", bf16 autocast" if placement.bf16 else "")
    return placement


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Produce the next `depth` items in a background thread while the caller computes: batch assembly
    (numpy, tokenisation, pinned copies) overlaps the GPU's work instead of idling it between steps."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def fill() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put(item)
        except BaseException as e:  # re-raised in the consumer, which owns the error
            slots.put(e)
        slots.put(done)

    thread = threading.Thread(target=fill, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while (item := slots.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # The consumer may stop early (a budget ran out): let a producer blocked on a full queue finish its
        # item and see `stop`, so no thread is left holding batches.
        stop.set()
        while thread.is_alive():
            try:
                slots.get(timeout=0.1)
            except queue.Empty:
                pass

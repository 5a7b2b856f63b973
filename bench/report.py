"""Shared by the bench scripts: machine description and writing a marked section of docs/benchmarks.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

from cirflow.core.files import write_text_atomic
from cirflow.export.manifest import BundleError, resolve_bundle_dir

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cores = len(os.sched_getaffinity(0))
    return f"{cpu}, {cores} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}"


QUIET_LOAD = 0.5  # load average above which other jobs share the cores with a bench


def progress() -> Callable[[str], None]:
    """A print function that stamps each line with the seconds since this call."""
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", flush=True)

    return say


def warn_if_busy(say: Callable[[str], None], quick: bool) -> float:
    """The load average now, with a warning when a real (not --quick) run starts on a busy machine."""
    load = os.getloadavg()[0]
    if not quick and load > QUIET_LOAD:
        cores = len(os.sched_getaffinity(0))
        say(f"warning: load average {load:.1f} on {cores} cores: other jobs skew every timing here")
    return load


def today() -> str:
    return dt.date.today().isoformat()


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the section between `<!-- begin NAME -->` and `<!-- end NAME -->` markers."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    write_text_atomic(doc, text)


def default_bundle() -> Path:
    """The registered bundle, workdir/bundles/CURRENT (the demo registers the one it exports)."""
    try:
        return resolve_bundle_dir(Path("workdir/bundles"))
    except BundleError as e:
        raise SystemExit(f"{e}; run the demo (`make demo`) or pass --bundle") from e

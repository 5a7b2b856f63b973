"""The container images as operators get them: built by deploy/docker/build.sh (what `make images` runs) with
buildah, then run with `buildah run` (chroot isolation: the container shares this machine's network, so a server
in it binds 127.0.0.1 like any other the tests start)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).parents[1]
BUILD = REPO / "deploy" / "docker" / "build.sh"
ENV = {**os.environ, "BUILDAH_ISOLATION": os.environ.get("BUILDAH_ISOLATION", "chroot")}


def unavailable() -> str | None:
    """Why images cannot be built and run on this machine, or None when they can."""
    if shutil.which("buildah") is None:
        return "buildah is not installed (Debian/Ubuntu: apt-get install buildah mmdebstrap)"
    info = subprocess.run(["buildah", "info"], capture_output=True, text=True, env=ENV)
    if info.returncode:
        last = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"buildah cannot start here (no user namespaces or storage?): {last}"
    if os.geteuid() != 0 and not _subordinate_ids():
        return "rootless buildah needs subordinate user ids for this user in /etc/subuid (usermod --add-subuids)"
    if not present("localhost/cirflow-python:3.11") and shutil.which("mmdebstrap") is None:
        return "the base image is missing and mmdebstrap, which makes it, is not installed"
    return None


def _subordinate_ids() -> bool:
    import pwd

    user = pwd.getpwuid(os.geteuid()).pw_name
    subuid = Path("/etc/subuid")
    return subuid.is_file() and any(line.split(":")[0] in (user, str(os.geteuid()))
                                    for line in subuid.read_text().splitlines())


def present(image: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", image], capture_output=True,
                          env=ENV).returncode == 0


def build(*names: str) -> None:
    """Build (or, with its layers cached, rebuild from the changed step on) and smoke-run the images named."""
    result = subprocess.run([str(BUILD), *names], capture_output=True, text=True, env=ENV, timeout=1800)
    if result.returncode:
        pytest.fail(f"{BUILD.name} {' '.join(names)} failed:\n{result.stdout[-2000:]}{result.stderr[-4000:]}")


@contextmanager
def container(image: str, mounts: dict[Path, str] | None = None) -> Iterator[list[str]]:
    """A fresh container of `image`; yields the command prefix that runs a command in it (with `mounts`,
    host path -> container path, read-only), and removes the container afterwards."""
    made = subprocess.run(["buildah", "from", "--quiet", image], capture_output=True, text=True, env=ENV,
                          check=True).stdout.strip()
    volumes = [arg for host, inside in (mounts or {}).items() for arg in ("-v", f"{host}:{inside}:ro")]
    try:
        yield ["buildah", "run", *volumes, made, "--"]
    finally:
        subprocess.run(["buildah", "rm", made], capture_output=True, env=ENV)


def stop_in_container(run: subprocess.Popen) -> None:
    """SIGTERM to the command `run` started in a container, as Kubernetes stops a pod: `buildah run` itself
    would SIGKILL it. Chroot isolation has no PID namespace, so the command is a process of this machine's
    (when it is gone already, `buildah run` gets the SIGTERM and kills what is left)."""
    def children(pid: int) -> list[int]:
        return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                for child in (task / "children").read_text().split()]

    todo, signalled = children(run.pid), 0  # buildah run -> buildah-chroot-runtime -> buildah-chroot-exec -> it
    while todo:
        pid = todo.pop()
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"buildah-chroot-exec":
                for command in children(pid):
                    os.kill(command, signal.SIGTERM)
                    signalled += 1
            else:
                todo.extend(children(pid))
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
    if not signalled:
        run.terminate()

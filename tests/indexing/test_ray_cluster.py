"""Local Ray bound to loopback, and the refusal of relative paths inside a job submitted with a working dir."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cirflow.core.ray_local import (
    JOB_CONFIG_ENV,
    SINGLE_MACHINE_ENV,
    RayJobPathError,
    check_job_paths,
    is_loopback,
    submitted_working_dir,
)
from cirflow.indexing.embedding.catalog import CatalogConfig
from cirflow.indexing.embedding.job import EmbedConfig, run_embed

REPO = Path(__file__).resolve().parents[2]
TCP_LISTEN = "0A"  # the state column of /proc/net/tcp{,6}

# Starts Ray the way the embedding job does (ray imported first, as indexing/embedding/job.py does, then connect_ray), runs a
# task so that a worker is up too, prints the GCS address and waits for stdin to close.
START_LOCAL = """
import sys
import ray
from cirflow.core.ray_local import connect_ray

assert connect_ray(None, 1)
ray.get(ray.remote(lambda: 1).remote())
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
"""


def process_tree(root: int) -> dict[int, str]:
    """pid -> command name of `root` and every process below it (from /proc; Ray's are all below the driver or
    the `ray start` that launched them)."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # exited meanwhile
                continue
            name, _, rest = stat.partition(" (")[2].rpartition(") ")
            parents[int(entry.name)] = (int(rest.split()[1]), name)
    tree, frontier = {root: parents.get(root, (0, "?"))[1]}, [root]
    while frontier:
        pid = frontier.pop()
        for child, (parent, name) in parents.items():
            if parent == pid and child not in tree:
                tree[child] = name
                frontier.append(child)
    return tree


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:  # exited meanwhile
        pass
    return inodes


def _address(hex_address: str) -> str:
    """/proc/net/tcp's local address (host byte order, 32-bit words) as an IP string."""
    raw = bytes.fromhex(hex_address)
    return str(ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))))


def listening_sockets(root: int) -> set[tuple[str, str, int]]:
    """(process name, IP, port) of every listening TCP socket of `root`'s process tree."""
    owners = {inode: name for pid, name in process_tree(root).items() for inode in _socket_inodes(pid)}
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == TCP_LISTEN and inode in owners:
                host, port = local.split(":")
                found.add((owners[inode], _address(host), int(port, 16)))
    return found


def exposed(sockets: set[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """The sockets reachable from outside this machine: any address but loopback (v4, v6, v4-mapped)."""
    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        mapped = getattr(address, "ipv4_mapped", None)
        return (mapped or address).is_loopback

    return sorted(s for s in sockets if not loopback(s[1]))


def wait_for_line(path: Path, proc: subprocess.Popen, seconds: float) -> str:
    """The first line the process writes to `path` (its stdout); fails with its stderr if it exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = path.read_text()
        if "\n" in text:
            return text.split("\n", 1)[0]
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    errors = path.with_suffix(".err")
    raise AssertionError(f"no line from {proc.args[:3]} (exit code {proc.poll()}):\n"
                         f"{errors.read_text()[-3000:] if errors.exists() else ''}")


def test_a_local_instance_listens_on_loopback_only(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", SINGLE_MACHINE_ENV)}
    out, err = tmp_path / "driver.out", tmp_path / "driver.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", START_LOCAL], cwd=REPO, env=env, start_new_session=True,
                                stdin=subprocess.PIPE, stdout=stdout, stderr=stderr)
    try:
        gcs_address = wait_for_line(out, proc, 120)
        sockets: set[tuple[str, str, int]] = set()
        for _ in range(12):  # agents and metrics servers open ports seconds after ray.init returns
            sockets |= listening_sockets(proc.pid)
            time.sleep(0.5)
        proc.stdin.close()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the probe saw Ray's servers, not nothing
    assert gcs_address.startswith("127.0.0.1:")
    assert not exposed(sockets), f"listening beyond loopback: {exposed(sockets)}"


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1:6379", True), ("localhost:6379", True), ("[::1]:6379", True), ("ray://127.0.0.1:10001", True),
    ("10.0.0.5:6379", False), ("head.example.com:6379", False), ("auto", False), ("[2001:db8::1]:6379", False)])
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def job_env(monkeypatch: pytest.MonkeyPatch, runtime_env: dict[str, object]) -> None:
    """This process as the entrypoint of a submitted Ray job, as Ray's job supervisor starts it."""
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": runtime_env, "metadata": {}}))


def test_working_dir_of_a_submitted_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    assert submitted_working_dir() is None  # not a Ray job
    job_env(monkeypatch, {"env_vars": {"A": "1"}})
    assert submitted_working_dir() is None  # a job without a working dir runs where it was started
    job_env(monkeypatch, {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"})
    assert submitted_working_dir() == "gcs://_ray_pkg_0123456789abcdef.zip"


def test_relative_paths_are_refused_only_in_a_job_with_a_working_dir(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    paths = {"workdir": "/abs/workdir", "bundle": "workdir/bundles", "catalog.manifest": None}
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    check_job_paths(paths)  # a plain run: relative to where it was started, as usual
    job_env(monkeypatch, {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"})
    monkeypatch.chdir(tmp_path)
    check_job_paths({"workdir": "/abs/workdir", "catalog.manifest": None})  # absolute ones and unset keys pass
    with pytest.raises(RayJobPathError) as refused:
        check_job_paths(paths)
    message = str(refused.value)
    assert "bundle='workdir/bundles' is a relative path" in message
    assert f"resolve to {tmp_path / 'workdir' / 'bundles'}" in message
    assert "Pass an absolute path" in message and "bundle=$PWD/workdir/bundles" in message


def test_run_embed_refuses_a_relative_workdir_in_a_job_before_writing(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """The job used to write its run into Ray's copy of the working dir, deleted with the job, and succeed."""
    job_env(monkeypatch, {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"})
    monkeypatch.chdir(tmp_path)
    config = EmbedConfig(catalog=CatalogConfig(name="shop", folder="/abs/images"), bundle="/abs/bundles",
                         workdir="workdir")
    with pytest.raises(RayJobPathError, match="workdir='workdir' is a relative path"):
        run_embed(config)
    assert not list(tmp_path.iterdir())

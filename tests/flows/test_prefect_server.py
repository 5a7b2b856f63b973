"""The flows' temporary Prefect server (flows/prefect_server.py): a flow process run without PREFECT_API_URL and
killed with SIGKILL takes its server with it; that server sends no analytics and logs no "database is locked"; a
whole `cirflow flow catalog` run leaves no server and no unsent logs; a configured server is used as it is."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads processes from /proc (Linux)")

START_SECONDS = 90  # the flow process's imports and the server's start: 10-20 s here, more on a loaded machine
GONE_SECONDS = 10  # the watchdog polls 4 times a second, then uvicorn stops (or is cut off after 3 s)


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (zombies count as gone)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def listening_ports(pid: int) -> set[int]:
    """TCP ports that `pid` listens on: its socket inodes in the LISTEN rows of /proc/net/tcp{,6}."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_a_killed_flow_process_takes_its_temporary_server_along(tmp_path: Path) -> None:
    config = tmp_path / "catalog_flow.yaml"
    os.mkfifo(config)  # nobody writes it: the flow blocks in its body, reading its config, with the server up
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    # Analytics on, as a user's machine has them by default: the temporary server must turn them off itself.
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "true"}
    log = tmp_path / "flow.log"
    with log.open("wb") as out:  # a file, not a pipe: a surviving server would hold a pipe open
        proc = subprocess.Popen([sys.executable, "-m", "cirflow.flows.cli", "flow", "catalog", "--config",
                                 str(config)], env=env, stdout=out, stderr=subprocess.STDOUT)
    started: list[int] = []
    try:
        deadline = time.monotonic() + START_SECONDS
        while "Beginning flow run" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None and "Beginning flow run" in log.read_text(), log.read_text()[-3000:]
        started = descendants(proc.pid)
        servers = {pid: ports for pid in started if (ports := listening_ports(pid))}
        assert len(servers) == 1, (started, servers)
        (server, ports), = servers.items()
        (port,) = ports
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as response:
            assert response.status == 200
        assert environ(server)["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"

        time.sleep(1)  # the server's start-up services have run (the analytics heartbeat ran at once when on)
        proc.kill()
        assert proc.wait() == -signal.SIGKILL
        deadline = time.monotonic() + GONE_SECONDS
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in started if alive(pid)], f"still running after {GONE_SECONDS} s"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in started:  # what this test started: leave no server behind, even when it failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    output = log.read_text()
    assert "database is locked" not in output and "telemetry" not in output.lower(), output[-3000:]


def test_cirflow_flow_catalog_runs_on_a_temporary_server_and_leaves_nothing(tiny_shapes: Path, tiny_bundle: Path,
                                                                           tmp_path: Path) -> None:
    shop = tmp_path / "shop"
    shop.mkdir()
    for image in sorted((tiny_shapes / "images" / "test").iterdir()):
        (shop / image.name).symlink_to(image)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "true"}
    overrides = [f"embed.workdir={tmp_path / 'wd'}", "embed.catalog.name=shop", f"embed.catalog.folder={shop}",
                 f"embed.bundle={tiny_bundle}", f"queries.root={tiny_shapes}", "min_recall=0.0"]
    done = subprocess.run([sys.executable, "-m", "cirflow.flows.cli", "flow", "catalog", *overrides], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["published"] is True
    url = done.stderr.split("temporary Prefect server on ", 1)[1].split()[0]  # as the run logged it
    with pytest.raises(OSError):  # stopped with the run
        urllib.request.urlopen(f"{url}/health", timeout=2)
    # Its logs and events were sent before it stopped; no analytics, no lock errors.
    for unwanted in ("Error logging to API", "database is locked", "telemetry"):
        assert unwanted not in done.stderr, done.stderr[-3000:]


def test_a_configured_server_is_used_and_nothing_is_started() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cirflow.flows.prefect_server import prefect_api

    configured = "http://127.0.0.1:9/api"  # never contacted
    before = set(children(os.getpid()))
    with temporary_settings(updates={PREFECT_API_URL: configured}), prefect_api() as url:
        assert url == configured and set(children(os.getpid())) == before

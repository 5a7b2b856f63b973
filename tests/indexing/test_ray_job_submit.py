"""The `ray job submit` lines of docs/catalogs-and-indexes.md ("The embedding job"), run as written (only paths
substituted) against a head node on this machine.

The head runs in a fresh HOME (no ~/.ray/auth_token until the doc's line makes one, whatever this machine
has) and a fresh RAY_TMPDIR (so `ray job submit` finds this head, not another); it is stopped through its own
`ray start --block` process, never `ray stop`, which would stop every Ray instance of this user.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cirflow.core.config import load_config
from cirflow.core.ray_local import SINGLE_MACHINE_ENV
from cirflow.export.manifest import register_bundle, resolve_bundle_dir
from cirflow.export.runtime import BundleRuntime
from cirflow.indexing.embedding import shards
from cirflow.indexing.embedding.job import EmbedConfig
from tests.indexing.test_ray_cluster import exposed, listening_sockets

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "catalogs-and-indexes.md"
CONFIG = REPO / "configs" / "embed_catalog.yaml"


def readme_commands() -> dict[str, str]:
    """The commands of the doc's embedding-job code block (continuations joined, comments dropped), by the words
    each starts with."""
    block = DOC.read_text().split("## The embedding job\n", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.replace("\\\n", " ").splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    found = {}
    for start in ("export", "ray get-auth-token", "ray start --head", "ray job submit", "ray stop"):
        matching = [c for c in commands if c.startswith(start)]
        assert len(matching) == 1, f"{DOC.name}'s embedding-job block has {len(matching)} `{start}` lines"
        found[start] = matching[0]
    return found


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass(frozen=True)
class Head:
    env: dict[str, str]
    commands: dict[str, str]
    gcs_port: int
    pid: int  # the `ray start --block` process: every Ray process of the head is below it
    ray_tmp: Path

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        """`command` in the doc's shell (its export line run first), from the repository root."""
        return subprocess.run(["bash", "-c", f"{self.commands['export']}\n{command}"], cwd=REPO, env=self.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    commands = readme_commands()
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path_factory.mktemp("home")), RAY_TMPDIR=str(ray_tmp),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `source .venv/bin/activate`
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", RAY_USAGE_STATS_ENABLED="0")
    # Own ports for what would otherwise take fixed ones another Ray instance on this machine may hold.
    gcs, agent, client = free_ports(3)
    start = (f"{commands['export']}\n{commands['ray get-auth-token']}\nexec {commands['ray start --head']} "
             f"--num-cpus=2 --port={gcs} --dashboard-agent-listen-port={agent} --ray-client-server-port={client} "
             "--block")
    log = ray_tmp / "head.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", "-c", start], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, f"no head node:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        yield Head(env, commands, gcs, proc.pid, ray_tmp)
    finally:
        proc.terminate()  # `ray start --block` stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_the_documented_command_writes_the_shards_where_the_readme_says(
        head: Head, tiny_runtime: BundleRuntime, tiny_shapes: Path, tmp_path: Path) -> None:
    # The doc's layout (what `make demo` leaves in ./workdir), under a temporary workdir.
    workdir = tmp_path / "workdir"
    register_bundle(shutil.copytree(tiny_runtime.bundle_dir, workdir / "bundles" / "tiny"))
    images = shutil.copytree(tiny_shapes / "images" / "test", workdir / "data" / "shapes" / "images" / "test")
    submit = head.commands["ray job submit"]
    assert "$PWD/workdir" in submit

    result = head.run(submit.replace("$PWD/workdir", str(workdir)))

    assert result.returncode == 0, result.stdout[-4000:]
    config = load_config(EmbedConfig, CONFIG)
    run = shards.open_snapshot(workdir / "embeddings" / config.catalog.name / tiny_runtime.bundle_id)  # the doc's place
    assert run.manifest["complete"] and run.manifest["errors"] == 0
    assert run.rows == len(list(images.iterdir())) > 0
    assert not list(head.ray_tmp.rglob("embeddings"))  # nothing landed in Ray's copy of the working dir
    # The shipped config names this very layout (what `make demo` leaves), relative to the repository root:
    # nothing in it is a placeholder to edit.
    root = workdir.parent
    assert (root / config.workdir, root / config.catalog.folder) == (workdir, images)
    assert resolve_bundle_dir(root / config.bundle) == workdir / "bundles" / "tiny"


def test_relative_paths_in_a_submitted_job_are_refused(head: Head) -> None:
    """The same command with the paths left relative used to "succeed" into Ray's copy of the working dir."""
    result = head.run(head.commands["ray job submit"].replace("$PWD/", ""))
    assert result.returncode != 0
    assert "workdir='workdir' is a relative path" in result.stdout, result.stdout[-4000:]
    assert "Pass an absolute path" in result.stdout


def test_the_head_listens_on_loopback_only(head: Head) -> None:
    sockets = listening_sockets(head.pid)
    assert {"gcs_server", "raylet"} <= {name for name, _, _ in sockets}, sockets
    assert not exposed(sockets), f"listening beyond loopback: {exposed(sockets)}"


def test_a_driver_outside_single_machine_mode_joins_the_head_by_its_address(head: Head) -> None:
    """Ray rewrites 127.0.0.1 to the machine's outward address, where this head does not listen: connect_ray
    joins a loopback address in single-machine mode itself."""
    env = {k: v for k, v in head.env.items() if k != SINGLE_MACHINE_ENV} | {"RAY_AUTH_MODE": "token"}
    script = ("import ray\nfrom cirflow.core.ray_local import connect_ray\n"
              f"assert connect_ray('127.0.0.1:{head.gcs_port}', None)\nprint(ray.cluster_resources()['CPU'])")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=90)
    assert result.returncode == 0 and result.stdout.strip().endswith("2.0"), result.stdout[-3000:]


def test_the_catalog_flow_submits_its_embedding_as_a_ray_job(head: Head, tiny_runtime: BundleRuntime,
                                                            tiny_shapes: Path, prefect_api_url: str,
                                                            tmp_path: Path) -> None:
    """`ray_job_address`: the catalog flow runs the embedding through Ray's job API on the head (the entry point
    of `ray job submit`), follows it to the end, and goes on to build, validate and publish the index. The flow
    runs on the session's Prefect server: a temporary one of its own would take another 10-20 s to start."""
    import json
    import shlex

    workdir, bundle = tmp_path / "wd", shutil.copytree(tiny_runtime.bundle_dir, tmp_path / "bundle")
    overrides = [f"embed.workdir={workdir}", "embed.catalog.name=shop",
                 f"embed.catalog.folder={tiny_shapes / 'images' / 'test'}", f"embed.bundle={bundle}",
                 f"queries.root={tiny_shapes}", "min_recall=0.5", "ray_job_address=http://127.0.0.1:8265"]
    script = ("import json\nfrom ray.job_submission import JobSubmissionClient\n"
              "from cirflow.flows.catalog_flow import catalog\n"
              f"result = catalog(overrides={overrides!r})\n"
              "jobs = JobSubmissionClient('http://127.0.0.1:8265').list_jobs()\n"
              "print('RESULT', json.dumps({'snapshot_dir': result['snapshot_dir'], 'index_dir': result['index_dir'], "
              "'jobs': [(j.entrypoint, j.status.value) for j in jobs]}))")
    env = head.env | {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                      "PREFECT_API_URL": prefect_api_url}
    result = subprocess.run(["bash", "-c", f"{head.commands['export']}\n{sys.executable} -c {shlex.quote(script)}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=400)
    assert result.returncode == 0, result.stdout[-4000:]
    found = json.loads(result.stdout.split("RESULT ", 1)[1].splitlines()[0])
    embeds = [(entry, status) for entry, status in found["jobs"] if "cirflow embed" in entry and str(bundle) in entry]
    assert embeds and all(status == "SUCCEEDED" for _, status in embeds), found["jobs"]
    run = shards.open_snapshot(Path(found["snapshot_dir"]))
    assert run.manifest["last_run"]["embedded_by"] == "ray" and run.rows == len(list((tiny_shapes / "images" /
                                                                                        "test").iterdir()))
    assert (workdir / "indexes" / "shop" / "CURRENT").read_text().strip() == Path(found["index_dir"]).name

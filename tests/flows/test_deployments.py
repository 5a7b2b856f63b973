"""deploy/prefect.yaml read the way `prefect deploy` reads it, and one run the way a schedule runs it: a Prefect
server, the process work pool, `prefect deploy`, a worker and `prefect deployment run`, all on 127.0.0.1.

The reader and schedule builder are prefect 3.8.8's own (prefect.cli.deploy), private but pinned: a change of
pinned version that moves them breaks here first, which is where it should. The end-to-end test is
test_server_worker_runs_catalog_deployment (select it with -k server_worker).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import prefect
import pytest
import yaml
from prefect.cli.deploy._config import _load_deploy_configs_and_actions
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.utilities.templating import apply_values
from prefect.workers.process import ProcessWorker
from rich.console import Console

from cirflow.core.files import follow_current
from tests.indexing.test_ray_cluster import exposed, listening_sockets, process_tree

REPO = Path(__file__).resolve().parents[2]
PREFECT_FILE = REPO / "deploy" / "prefect.yaml"
FLOWS_DOCKERFILE = REPO / "deploy" / "docker" / "flows.Dockerfile"
RAY_DOCKERFILE = REPO / "deploy" / "docker" / "ray-worker.Dockerfile"
RAYJOB = REPO / "deploy" / "ray" / "rayjob-embed.yaml"
POOL_TYPES = {"cirflow-process": "process", "cirflow-docker": "docker", "cirflow-k8s": "kubernetes"}
SUFFIXES = {"cirflow-process": "", "cirflow-docker": "-docker", "cirflow-k8s": "-k8s"}
# deployment name (process pool) -> (flow name, entrypoint, config parameter, cron or None)
FLOWS = {
    "nightly-catalog-refresh": ("catalog", "flows/catalog_flow.py:catalog", "configs/catalog_flow.yaml",
                                "0 2 * * *"),
    "weekly-training": ("training", "flows/training_flow.py:training", "configs/training_flow.yaml", "0 3 * * 0"),
    "pipeline": ("pipeline", "flows/pipeline_flow.py:pipeline", "configs/pipeline_flow.yaml", None),
}
SET_WORKING_DIRECTORY = "prefect.deployments.steps.set_working_directory"


def load_deployments(prefect_file: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(deployments, top-level actions) as `prefect deploy --prefect-file` gets them. Validated strictly first:
    on a validation error prefect only prints a warning and goes on with no deployments."""
    PrefectYamlModel.model_validate(yaml.safe_load(prefect_file.read_text()))
    return _load_deploy_configs_and_actions(prefect_file, console=Console(file=io.StringIO()))


def pull_steps(deployment: dict[str, Any], actions: dict[str, Any]) -> list[dict[str, Any]]:
    """The pull steps stored with the deployment: its own, else the file's (prefect.cli.deploy._core)."""
    return deployment.get("pull", actions.get("pull")) or []


def base_job_variables(pool_type: str) -> dict[str, Any]:
    """The variables schema of a pool type's default base job template, without prefect-docker or
    prefect-kubernetes installed: prefect's server ships their templates for `work-pool create --type`."""
    if pool_type == "process":
        return ProcessWorker.get_default_base_job_template()["variables"]
    metadata = Path(prefect.__file__).parent / "server/api/collections_data/views/aggregate-worker-metadata.json"
    for collection in json.loads(metadata.read_text()).values():
        for worker in collection.values():
            if isinstance(worker, dict) and worker.get("type") == pool_type:
                return worker["default_base_job_configuration"]["variables"]
    raise AssertionError(f"no {pool_type} worker in {metadata}")


@pytest.fixture(scope="module")
def deployments() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    return load_deployments(PREFECT_FILE)


def test_deployments_validate_with_unique_names_on_the_three_pools(deployments) -> None:
    configs, actions = deployments
    names = [d.get("name") for d in configs]
    assert len(names) == len(set(names)), f"duplicate deployment names: {names}"
    expected = {name + suffix for name in FLOWS for suffix in SUFFIXES.values()}
    assert set(names) == expected
    for d in configs:
        pool = d["work_pool"]["name"]
        assert pool in POOL_TYPES, f"{d['name']}: work pool {pool!r} is none of {sorted(POOL_TYPES)}"
        base = d["name"].removesuffix(SUFFIXES[pool])
        flow_name, entrypoint, config, cron = FLOWS[base]
        assert d["entrypoint"] == entrypoint, d["name"]
        assert d["parameters"] == {"config": config}, d["name"]
        assert (REPO / config).is_file(), f"{d['name']}: its config parameter {config} is not in the repository"
        assert not (actions["build"] or actions["push"] or d.get("build") or d.get("push")), "nothing to build"


def test_schedules_parse_as_cron_in_utc(deployments) -> None:
    configs, _ = deployments
    for d in configs:
        cron = FLOWS[d["name"].removesuffix(SUFFIXES[d["work_pool"]["name"]])][3]
        schedules = [_schedule_config_to_deployment_schedule(s)["schedule"] for s in d.get("schedules") or []]
        if cron is None:
            assert schedules == [], f"{d['name']} runs on demand only"
            continue
        assert len(schedules) == 1 and isinstance(schedules[0], CronSchedule), d["name"]
        assert (schedules[0].cron, schedules[0].timezone) == (cron, "UTC"), d["name"]


def test_job_variables_are_variables_of_the_pool_type(deployments) -> None:
    configs, _ = deployments
    for d in configs:
        pool_type = POOL_TYPES[d["work_pool"]["name"]]
        variables = base_job_variables(pool_type)
        for key, value in d["work_pool"].get("job_variables", {}).items():
            assert key in variables["properties"], f"{d['name']}: {key!r} is no {pool_type} job variable"
            schema = {**variables["properties"][key], "definitions": variables.get("definitions", {})}
            jsonschema.validate(value, schema)
        if pool_type != "process":
            assert d["work_pool"]["job_variables"]["image"] == "cirflow-flows:latest", d["name"]


def test_pull_steps_set_the_working_directory_where_the_flows_are(deployments,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Process pool: the repository, from CIRFLOW_HOME (resolved as a run's pull step resolves it); images: the
    flows image's WORKDIR. The entrypoints and config parameters are relative to it."""
    configs, actions = deployments
    monkeypatch.setenv("CIRFLOW_HOME", str(REPO))
    image_workdir = re.findall(r"^WORKDIR\s+(\S+)", FLOWS_DOCKERFILE.read_text(), re.MULTILINE)[-1]
    for d in configs:
        steps = pull_steps(d, actions)
        assert [list(step) for step in steps] == [[SET_WORKING_DIRECTORY]], d["name"]
        directory = apply_values(steps[0][SET_WORKING_DIRECTORY], os.environ)["directory"]
        if d["work_pool"]["name"] == "cirflow-process":
            assert steps[0][SET_WORKING_DIRECTORY]["directory"] == "{{ $CIRFLOW_HOME }}"
            assert directory == str(REPO)
        else:
            assert directory == image_workdir, d["name"]


def test_image_names_match_their_dockerfiles() -> None:
    """The images the work pools and the RayJob name are the ones the Dockerfiles' build lines tag."""
    def tags(dockerfile: Path) -> set[str]:
        return set(re.findall(r"docker build .*-t (\S+) -f deploy/docker/" + dockerfile.name, dockerfile.read_text()))

    assert tags(FLOWS_DOCKERFILE) == {"cirflow-flows:latest"}
    rayjob = RAYJOB.read_text()
    rayjob_images = set(re.findall(r"^\s*image:\s*(\S+)", rayjob, re.MULTILINE))
    assert rayjob_images and rayjob_images <= tags(RAY_DOCKERFILE), rayjob_images
    # One Ray version: the image's, the RayJob's and the project's pin.
    base = re.search(r"^ARG BASE=rayproject/ray:([\d.]+)-py311$", RAY_DOCKERFILE.read_text(), re.MULTILINE)
    pin = re.search(r'"ray\[[\w,]+\]==([\d.]+)"', (REPO / "pyproject.toml").read_text())
    assert base and pin and re.search(rf'rayVersion: "{re.escape(base[1])}"', rayjob) and base[1] == pin[1]


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_entrypoint_loads_the_flow(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `prefect deploy` does from the repository root and a worker's run does after its pull step."""
    flow_name, entrypoint, _, _ = FLOWS[name]
    assert (REPO / entrypoint.split(":")[0]).is_file(), f"{entrypoint} is missing"
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the loader prepends the script's folder and the cwd
    before = set(sys.modules)
    try:
        flow = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
    finally:
        for module in set(sys.modules) - before:
            if module == Path(entrypoint.split(":")[0]).stem or module.startswith("__prefect_loader_"):
                del sys.modules[module]
    assert isinstance(flow, Flow) and flow.name == flow_name
    assert set(flow.parameters.properties) == {"config", "overrides"}


# --- end to end: server, pool, deploy, worker, run ------------------------------------------------------------

RUN_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, grace: float) -> None:
    """End `proc` and everything below it (a worker's flow-run process may run in a session of its own)."""
    tree = process_tree(proc.pid)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A Prefect server on 127.0.0.1 with its database under tmp_path; yields the environment of its clients
    (no PREFECT_ or RAY_ settings of the caller's)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false",
               PREFECT_CLI_PROMPT="false", PREFECT_WORKER_QUERY_SECONDS="1")
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"the server exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no /api/health in 120 s:\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        assert not exposed(listening_sockets(proc.pid)), "the server listens beyond loopback"
        yield env
    finally:
        stop(proc, grace=20)


def prefect_cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    result = subprocess.run(["prefect", "--no-prompt", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout[-4000:]}"
    return result.stdout


def test_server_worker_runs_catalog_deployment(prefect_server: dict[str, str], tiny_shapes: Path,
                                               tiny_bundle: Path, tmp_path: Path) -> None:
    env = prefect_server
    bundle = tiny_bundle
    workdir, catalog = tmp_path / "workdir", "shapes-test-e2e"

    prefect_cli(env, "work-pool", "create", "cirflow-process", "--type", "process")
    # Deployed without CIRFLOW_HOME: the pull step keeps its placeholder, which the worker's environment fills.
    prefect_cli(env, "deploy", "--prefect-file", "deploy/prefect.yaml", "--name", "nightly-catalog-refresh")
    stored = json.loads(prefect_cli(env, "deployment", "inspect", "catalog/nightly-catalog-refresh",
                                    "--output", "json"))
    assert stored["pull_steps"] == [{SET_WORKING_DIRECTORY: {"directory": "{{ $CIRFLOW_HOME }}"}}]

    worker_log = tmp_path / "worker.log"
    with worker_log.open("w") as out:  # started elsewhere than the repository: the pull step must move the run
        worker = subprocess.Popen(["prefect", "worker", "start", "--pool", "cirflow-process"], cwd=tmp_path,
                                  env={**env, "CIRFLOW_HOME": str(REPO)}, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        overrides = [f"embed.workdir={workdir}", f"embed.catalog.name={catalog}",
                     f"embed.catalog.folder={tiny_shapes / 'images' / 'test'}", f"embed.bundle={bundle}",
                     "queries.kind=shapes", f"queries.root={tiny_shapes}", "queries.split=val",
                     "index.recall_target=0.5"]
        run = subprocess.run(["prefect", "--no-prompt", "deployment", "run", "catalog/nightly-catalog-refresh",
                              "--param", f"overrides={json.dumps(overrides)}", "--watch",
                              "--watch-timeout", str(RUN_TIMEOUT_S)],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=RUN_TIMEOUT_S + 60)
        assert run.returncode == 0 and "finished successfully in 'Completed'" in run.stdout, (
            f"{run.stdout[-3000:]}\n--- worker ---\n{worker_log.read_text()[-6000:]}")
    finally:
        stop(worker, grace=5)  # a process worker can hang on SIGTERM in prefect 3.8.8
    published = follow_current(workdir / "indexes" / catalog)
    assert published is not None and published.is_dir(), f"no CURRENT under {workdir / 'indexes' / catalog}"

"""The service's specs: the container's dependency subset suffices, the Kubernetes probes and arguments match
the app and the CLI, and the Ray Serve deployment serves the same answers on a local Ray cluster."""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
import yaml
from packaging.requirements import Requirement

from cirflow.indexing.service.app import create_app
from cirflow.indexing.service.state import ServiceConfig, ServiceError
from tests.indexing.service_setup import Shop, free_socket, wait_ready

REPO = Path(__file__).parents[2]
DOCKERFILE = REPO / "deploy" / "docker" / "search.Dockerfile"
K8S = REPO / "deploy" / "k8s" / "search-service.yaml"
SERVE_CONFIG = REPO / "deploy" / "ray" / "serve-search.yaml"


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, new_shop: Callable[..., tuple[Shop, Path]]) -> Shop:
    return new_shop(tmp_path_factory.mktemp("deploy"), count=24)[0]


def _dockerfile_subset() -> set[str]:
    match = re.search(r"keep = \{([^}]*)\}", DOCKERFILE.read_text())
    assert match, "search.Dockerfile lists the serving subset as keep = {...}"
    return {name.strip(" '\\\n") for name in match.group(1).split(",") if name.strip(" '\\\n")}


# Run in a fresh interpreter as if only the container's distributions were installed: importing a module that
# only other distributions provide fails as a missing package would (optional imports fall back, as in the
# image). Then load the service and answer a composed query.
_PROBE = """
import base64, importlib.abc, json, sys
from importlib.metadata import packages_distributions
from pathlib import Path
allowed = set(json.loads(sys.argv[3]))
owners = {name: {d.lower().replace("_", "-").replace(".", "-") for d in dists}
          for name, dists in packages_distributions().items()}

class OnlyTheImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        dists = owners.get(name.split(".")[0])
        if dists and not dists & allowed:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the image)", name=name)
        return None

sys.meta_path.insert(0, OnlyTheImage())
from cirflow.indexing.service.app import answer
from cirflow.indexing.service.requests import SearchRequest, check
from cirflow.indexing.service.state import Published, ServiceConfig
config = ServiceConfig(index=Path(sys.argv[1]), providers="cpu")
version = Published(config).load()
request = SearchRequest(image_base64=base64.b64encode(Path(sys.argv[2]).read_bytes()).decode(), text="make it red")
assert answer(version, check(request, None, config), config.images).results
print("served")
"""


def test_the_container_subset_of_dependencies_serves(shop: Shop, wheel_venv: Path) -> None:
    """On the installed wheel (the image runs `pip install --no-deps .`), with only the image's distributions."""
    from importlib.metadata import distribution, requires

    keep = _dockerfile_subset()
    pinned = {re.split(r"[=<>\[ ]", d)[0] for d in _pyproject_dependencies()}
    assert keep <= pinned, f"search.Dockerfile keeps {sorted(keep - pinned)}, which pyproject.toml does not pin"
    closure, todo = {"cirflow", "pip"}, [_norm(k) for k in keep]
    while todo:  # every distribution pip installs for the kept ones (on this Python, no extras)
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        for line in requires(distribution(name).metadata["Name"]) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(_norm(requirement.name))
    assert not {"torch", "ray", "prefect", "onnx"} & closure
    reference = shop.workdir / "shop" / "item 001.png"
    result = subprocess.run([str(wheel_venv / "bin" / "python"), "-I", "-c", _PROBE, str(shop.indexes),
                             str(reference), json.dumps(sorted(closure))], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "served", result.stderr[-3000:]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject_dependencies() -> list[str]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def test_kubernetes_probes_and_args_match_the_app_and_the_cli(shop: Shop) -> None:
    deployment, service = yaml.safe_load_all(K8S.read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    paths = {route.path for route in create_app(ServiceConfig(index=shop.indexes)).routes}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in paths
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    args = container["args"]
    assert args[0] == "serve" and args[args.index("--host") + 1] == "0.0.0.0"
    usage = subprocess.run([sys.executable, "-m", "cirflow.flows.cli", "serve", "--help"], capture_output=True,
                           text=True, check=True).stdout
    for flag in (a for a in args if a.startswith("--")):
        assert flag in usage, f"{flag} of {K8S.name} is not an option of cirflow serve"
    assert 'ENTRYPOINT ["cirflow"]' in DOCKERFILE.read_text()


def test_serve_app_builder_reads_the_config_file_args(shop: Shop) -> None:
    from cirflow.indexing.service.ray_serve import app_builder

    app = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]
    assert app["import_path"] == "cirflow.indexing.service.ray_serve:app_builder"
    built = app_builder({**app["args"], "index": str(shop.indexes)})
    assert built is not None
    with pytest.raises(ServiceError, match=r"unknown search deployment args \['idx'\]"):
        app_builder({"index": str(shop.indexes), "idx": "x"})
    with pytest.raises(ServiceError, match="needs args.index"):
        app_builder({})


@pytest.fixture(scope="module")
def ray_serve() -> Iterator[int]:
    import ray
    from ray import serve

    from cirflow.core.ray_local import start_local_ray

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    start_local_ray(2, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def test_ray_serve_deployment_answers_like_the_library(shop: Shop, ray_serve: int) -> None:
    from ray import serve

    from cirflow.indexing.service.ray_serve import deployment

    serve.run(deployment(ServiceConfig(index=shop.indexes, providers="cpu")), name="search", route_prefix="/")
    url = f"http://127.0.0.1:{ray_serve}"
    assert wait_ready(url, 120)
    image = shop.images[1003]
    expected = shop.searcher().search(image, "make it red", k=5)
    response = httpx.post(f"{url}/search", json={"image_base64": base64.b64encode(image).decode(),
                                                 "text": "make it red", "k": 5}, timeout=60)
    assert response.status_code == 200, response.text
    assert [int(r["id"]) for r in response.json()["results"]] == [int(i) for i in expected.ids]
    assert httpx.post(f"{url}/search", json={"k": 5}, timeout=60).status_code == 422


def test_cirflow_serve_serves_until_sigterm(shop: Shop, tmp_path: Path) -> None:
    """The command line as deployed: `cirflow serve` finds the bundle beside the index, answers (with the API key
    of --api-key-file, and the image limits of its flags) and logs each request once, and a SIGTERM (a rolling
    update) ends it cleanly."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    key_file = tmp_path / "api-key"
    key_file.write_text("0123456789abcdef0123456789abcdef\n")
    server = subprocess.Popen([sys.executable, "-m", "cirflow.flows.cli", "serve", "--index", str(shop.indexes),
                               "--port", str(port), "--reload-seconds", "0", "--api-key-file", str(key_file),
                               "--image-formats", "PNG,JPEG", "--max-image-pixels", "100000"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_ready(url, 120)
        body = {"text": "make it red", "k": 3}
        assert httpx.post(f"{url}/search", json=body, timeout=30).status_code == 401
        key = {"authorization": "Bearer 0123456789abcdef0123456789abcdef"}
        response = httpx.post(f"{url}/search", json=body, headers=key, timeout=30)
        assert response.status_code == 200 and len(response.json()["results"]) == 3
        limits = httpx.get(f"{url}/api/info", headers=key, timeout=30).json()["limits"]
        assert (limits["image_formats"], limits["max_image_pixels"]) == (["PNG", "JPEG"], 100_000)
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=60)
    # uvicorn finishes the shutdown, then re-raises the signal it caught: the exit status says "terminated".
    assert server.returncode in (0, -signal.SIGTERM), out[-2000:]
    assert "Application shutdown complete" in out
    # One access-log line per request, in uvicorn's words (the app writes it, after the response; uvicorn's is off).
    searches = [line.split("service.access: ", 1)[1] for line in out.splitlines()
                if "service.access: " in line and "/search" in line]
    assert [line.split(" - ", 1)[1] for line in searches] == ['"POST /search HTTP/1.1" 401',
                                                              '"POST /search HTTP/1.1" 200'], out[-2000:]


@pytest.mark.parametrize("flags, message", [
    (["--api-key-file", "/nonexistent/key"], "API key file /nonexistent/key: cannot read it"),
    (["--image-formats", "PNG,NOPE"], "NOPE"), (["--max-image-bytes", "0"], "max_bytes")])
def test_cirflow_serve_names_a_bad_security_setting_in_one_line(shop: Shop, flags: list[str], message: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    from cirflow.flows.cli import main

    assert main(["serve", "--index", str(shop.indexes), *flags]) == 2  # before any port opens
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        next(r.getMessage() for r in caplog.records if message in r.getMessage())]


def test_cirflow_serve_names_a_bad_index_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "cirflow.flows.cli", "serve", "--index", str(tmp_path / "none")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "neither an index directory" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def search_image() -> str:
    from tests import container_images

    if reason := container_images.unavailable():
        pytest.skip(f"the search image is not built here: {reason}")
    container_images.build("search")
    return "localhost/cirflow-search:latest"


def test_the_search_image_serves_a_published_index_like_the_library(shop: Shop, search_image: str) -> None:
    """The image as deployed (its own user, the workdir mounted read-only at the path the index's catalog uris
    name, as every pod of the manifest mounts one volume): ready, then the same answers as the library."""
    from tests.container_images import container, stop_in_container

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    # The test's temporary folders are private to root; the image's user (uid 1000) only needs to read them.
    for path in (shop.workdir, *shop.workdir.rglob("*")):
        path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
    with container(search_image, {shop.workdir: str(shop.workdir)}) as run:
        server = subprocess.Popen([*run, "cirflow", "serve", "--index", str(shop.indexes), "--bundle",
                                   str(shop.workdir / "bundles"), "--host", "127.0.0.1", "--port", str(port)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            assert wait_ready(url, 120), server.stdout.read() if server.poll() is not None else "not ready"
            image = shop.images[1003]
            expected = shop.searcher().search(image, "make it red", k=5)
            response = httpx.post(f"{url}/search", json={"image_base64": base64.b64encode(image).decode(),
                                                         "text": "make it red", "k": 5}, timeout=60)
            assert response.status_code == 200, response.text
            results = response.json()["results"]
            assert [int(r["id"]) for r in results] == [int(i) for i in expected.ids]
            assert [r["score"] for r in results] == pytest.approx([float(s) for s in expected.scores], abs=1e-4)
            served = httpx.get(f"{url}/items/{results[0]['id']}/image", timeout=30)
            assert served.status_code == 200 and served.content == shop.images[int(results[0]["id"])]
        finally:
            stop_in_container(server)
            out, _ = server.communicate(timeout=60)
    assert "Application shutdown complete" in out, out[-2000:]

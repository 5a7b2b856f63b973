"""What an operator deploys is the wheel, not the checkout: the wheel holds every module of the source tree, and
the whole chain (train -> export -> embed -> index build -> search -> serve) runs from it, installed non-editable
in a fresh venv (the `wheel` and `wheel_venv` fixtures of tests/conftest.py), from a directory outside the
checkout."""

from __future__ import annotations

import os
import signal
import subprocess
import zipfile
from pathlib import Path

import httpx
import pytest

from cirflow.models.tiny import TINY_MODEL
from tests.indexing.service_setup import free_socket, wait_ready

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("core", "models", "export", "indexing", "flows")


def test_the_wheel_holds_every_module_and_page_file_of_the_tree(wheel: Path) -> None:
    source = {f"cirflow/{p.relative_to(ROOT).as_posix()}" for stage in STAGES for p in (ROOT / stage).rglob("*")
              if p.is_file() and (p.suffix == ".py" or p.parent.name == "page") and "__pycache__" not in p.parts}
    with zipfile.ZipFile(wheel) as archive:
        packed = {name for name in archive.namelist() if name.startswith("cirflow/")}
    assert sorted(source - packed) == [], "missing from the wheel"
    assert sorted(packed - source) == [], "in the wheel but not in the tree"


def _run(venv: Path, cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(venv / "bin" / "cirflow"), "--log-level", "WARNING", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"cirflow {' '.join(args)}:\n{result.stderr[-3000:]}"
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def test_every_job_runs_from_the_installed_wheel(wheel_venv: Path, tiny_shapes: Path, tmp_path: Path) -> None:
    where = subprocess.run([str(wheel_venv / "bin" / "python"), "-I", "-c",
                            "import cirflow.models.backbones.config as m, cirflow.indexing.service.app as s; "
                            "print(m.__file__); print(s.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(wheel_venv)) for line in where.stdout.split()), where.stdout  # not the checkout

    work = tmp_path / "work"
    checkpoint = _run(wheel_venv, tmp_path, "train", "--workdir", str(work), "--run-id", "wheel",
                      f"data.root={tiny_shapes}", *TINY_MODEL, "optim.max_steps=4")
    bundle = _run(wheel_venv, tmp_path, "export", "--checkpoint", checkpoint, "--out", str(work / "bundles" / "b"))
    images = tiny_shapes / "images" / "test"
    snapshot_dir = _run(wheel_venv, tmp_path, "embed", "catalog.name=shop", f"catalog.folder={images}",
                   f"bundle={bundle}", f"workdir={work}", "rows_per_shard=64", "local_below=100000")
    queries = _run(wheel_venv, tmp_path, "index", "queries", "--bundle", bundle, "--root", str(tiny_shapes),
                   "--out", str(work / "queries.parquet"))
    index_dir = _run(wheel_venv, tmp_path, "index", "build", "--embeddings", str(Path(snapshot_dir).parent),
                     "--queries", queries, "--out", str(work / "indexes"), "index_type=flat")
    reference = sorted(images.glob("*.png"))[0]
    top = _run(wheel_venv, tmp_path, "index", "search", "--index", index_dir, "--bundle", bundle, "--image",
               str(reference), "--text", "make it red", "-k", "3")
    assert len(top.split("\t")) == 4

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    server = subprocess.Popen([str(wheel_venv / "bin" / "cirflow"), "serve", "--index", str(work / "indexes" / "shop"),
                               "--bundle", str(work / "bundles"), "--port", str(port), "--reload-seconds", "0"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_ready(url, 120)
        with reference.open("rb") as f:
            answer = httpx.post(f"{url}/search", files={"image": f}, data={"text": "make it red", "k": "3"},
                                timeout=30)
        assert answer.status_code == 200 and len(answer.json()["results"]) == 3, answer.text
        assert httpx.get(f"{url}/docs", timeout=30).status_code == 200  # the page files came with the wheel
        assert "swagger" in httpx.get(f"{url}/docs-assets/swagger-ui.css", timeout=30).text.lower()
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)


# Every image but the Python base that `make images` builds where no registry is reachable (no cirflow in it).
PROJECT_IMAGES = sorted(p for p in (ROOT / "deploy" / "docker").glob("*.Dockerfile") if p.name != "python-base.Dockerfile")


@pytest.mark.parametrize("dockerfile", PROJECT_IMAGES, ids=lambda p: p.name)
def test_each_image_copies_what_building_the_wheel_reads(dockerfile: Path) -> None:
    """`pip install .` in an image builds the same wheel only from the same files: the build's configuration
    (pyproject.toml, setup.py: the package discovery, README.md: the long description) and every stage folder."""
    copied = set()
    for line in dockerfile.read_text().splitlines():
        words = [w for w in line.split() if not w.startswith("--")]
        if words[:1] == ["COPY"]:
            copied.update(words[1:-1])
    needed = {"pyproject.toml", "setup.py", "README.md", *STAGES}
    assert sorted(needed - copied) == [], f"{dockerfile.name} runs pip install . without these"

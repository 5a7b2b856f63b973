"""The images flows and Ray jobs run in (torch, Ray and Prefect inside): `make images` builds them the first time
(about 2.5 GB each, minutes); here each is rebuilt from its cached layers (seconds, unless the pins changed) and
its CLI run. The search image is built and served by tests/indexing/test_service_deploy.py."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests import container_images


@pytest.mark.parametrize("name, image", [("flows", "localhost/cirflow-flows:latest"),
                                         ("ray-worker", "localhost/cirflow-ray:latest")])
def test_the_image_runs_the_installed_cli(name: str, image: str) -> None:
    if reason := container_images.unavailable():
        pytest.skip(f"images are not built here: {reason}")
    if not container_images.present(image):
        pytest.skip(f"{image} was never built on this machine: `make images` builds it, then this test rebuilds it")
    container_images.build(name)  # build.sh's smoke run imports torch and the backbones in it
    with container_images.container(image) as run:
        usage = subprocess.run([*run, "cirflow", "--help"], capture_output=True, text=True, timeout=300)
    assert usage.returncode == 0, usage.stderr[-2000:]
    commands = re.findall(r"\{([a-z,]+)\}", usage.stdout)[-1].split(",")  # usage: cirflow ... {data,train,...}
    assert {"train", "export", "embed", "index", "serve", "flow"} <= set(commands)

"""Shared fixtures: a tiny shapes dataset, made once per session, and overrides for the tiny model
(cirflow.models.tiny.TINY_MODEL) trained on it; the session's bundles; and Prefect for the flow tests: a private
home (nothing read from or written to ~/.prefect), no analytics, and one test harness (a temporary server on
SQLite) shared by the session: it takes 10-20 s to start here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cirflow.models.data.shapes import ShapesConfig, generate_shapes
from cirflow.models.tiny import TINY_MODEL, make_checkpoint

REPO = Path(__file__).resolve().parents[1]

# Before prefect is imported anywhere (a bench test module may be collected before any flow test): its settings are
# read once.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="cirflow-prefect-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shapes"
    return generate_shapes(ShapesConfig(seed=0, train_triplets=160, val_queries=40, test_queries=40, workers=1),
                           out)


@pytest.fixture
def tiny_overrides(tiny_shapes: Path) -> list[str]:
    """key=value overrides for a tiny model trained on the tiny dataset (add optim.max_steps)."""
    return [f"data.root={tiny_shapes}", *TINY_MODEL]


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported untrained tiny bundle ("sum" composer, seed 0), made once per session: many tests need real
    graphs and none needs its own (an export takes ~8 s). Read-only: tests copy it to change it."""
    from cirflow.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("tiny-bundle")
    return export_bundle(make_checkpoint(root / "model.pt", "sum"), root / "bundle")


@pytest.fixture(scope="session")
def tiny_combiner(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, bundle) of an untrained tiny model with the default composer (combiner), seed 0: the
    embedding job's tests and the backbone export test of "tiny" need exactly this one."""
    from cirflow.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("tiny-combiner")
    checkpoint = make_checkpoint(root / "model.pt", "combiner")
    return checkpoint, export_bundle(checkpoint, root / "bundle")


@pytest.fixture(scope="session")
def tiny_artemis(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported untrained tiny ARTEMIS bundle (seed 0): a bundle with a re-ranker."""
    from cirflow.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("tiny-artemis")
    return export_bundle(make_checkpoint(root / "model.pt", "artemis"), root / "bundle")


@pytest.fixture(scope="session")
def effnet_minilm_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, bundle) of an untrained effnet-minilm model (pretrained towers, tiny joint layers): its
    export takes about a minute, so the export and embedding tests share one."""
    pytest.importorskip("transformers", reason="pretrained backbones need the 'pretrained' extra")
    from cirflow.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("effnet-minilm")
    checkpoint = make_checkpoint(root / "model.pt", "combiner", overrides=["model.backbone.name=effnet-minilm"])
    return checkpoint, export_bundle(checkpoint, root / "bundle")


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_api_url(prefect_harness: None) -> str:
    """The harness server's API URL, for a subprocess's PREFECT_API_URL: given it, a process runs its flows there
    instead of starting a temporary server of its own (another 10-20 s)."""
    import prefect.settings

    return prefect.settings.PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built as `pip wheel --no-deps .` builds it (setuptools of this environment: offline),
    from a copy of the checkout without its build outputs: setuptools reuses ./build/lib, where a module moved or
    deleted since the last build would still be, and land in the wheel."""
    out = tmp_path_factory.mktemp("wheel")
    source = tmp_path_factory.mktemp("wheel-source") / "cirflow"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "workdir", "test-artifacts",
                                                                "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    return next(out.glob("cirflow-*.whl"))


@pytest.fixture(scope="session")
def wheel_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed non-editable; its dependencies are this environment's (a .pth line
    adds our site-packages after its own: nothing downloaded, and our editable install's finder, activated by a
    .pth file of our site-packages, is not run from a path added that way)."""
    venv = tmp_path_factory.mktemp("wheel-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # Installed before the .pth exists, so pip sees no cirflow there to replace (ours is the editable one).
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv

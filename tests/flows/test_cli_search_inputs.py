"""`cirflow index search` with the reference images a careless user passes: one line naming the file, exit 2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from cirflow.export.runtime import BundleRuntime
from cirflow.flows.cli import main
from cirflow.indexing.index.build import build_index
from cirflow.indexing.index.queries import Queries
from tests.export.conftest import random_images
from tests.indexing.conftest import clustered, query_like, write_snapshot
from tests.indexing.test_hostile_catalog import dds_pixel_format_0, im_type_error
from tests.models.test_tokenizer_preprocess import decompression_bomb_png


@pytest.fixture(scope="module")
def index_and_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> tuple[Path, Path]:
    """A tiny real bundle and a flat index of random vectors under its bundle id."""
    root = tmp_path_factory.mktemp("search-inputs")
    bundle = tiny_bundle
    runtime = BundleRuntime.load(bundle, providers="cpu")
    run = write_snapshot(root / "run", clustered(50, runtime.embed_dim, seed=0), rows_per_shard=50,
                    bundle_id=runtime.bundle_id)
    queries = Queries.unreferenced(query_like(0, 20, runtime.embed_dim))
    return build_index(run, queries, root / "indexes"), bundle


def search(index_and_bundle: tuple[Path, Path], image: Path) -> int:
    index, bundle = index_and_bundle
    return main(["index", "search", "--index", str(index), "--bundle", str(bundle), "--image", str(image),
                 "--text", "make the red circle blue", "-k", "3"])


def test_a_good_image_is_searched(index_and_bundle: tuple[Path, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    image = Path(os.fsdecode(os.fsencode(tmp_path) + b"/ref \xff.png"))  # a name that is not valid UTF-8
    Image.fromarray(random_images(1, 64, seed=1)[0]).save(image)
    assert search(index_and_bundle, image) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


@pytest.mark.parametrize("name, data, reason", [
    ("bomb.png", decompression_bomb_png(), "too large to decode (Image size (10000000000 pixels) exceeds limit"),
    ("empty.png", b"", "empty (0 bytes)"),
    ("notes.png", b"not an image", "cannot decode (not a recognised image format)"),
    ("missing.png", None, "file not found"),
    ("folder.png", "dir", "not a regular file (a directory)"),
    ("x.png", dds_pixel_format_0(), "format DDS is not allowed"),  # a NotImplementedError traceback before the gate
    ("x.im", im_type_error(), "cannot decode"),  # a TypeError traceback before
])
def test_a_bad_reference_image_is_one_line_naming_the_file(
        index_and_bundle: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture, name: str, data: bytes | str | None, reason: str) -> None:
    image = tmp_path / name
    if data == "dir":
        image.mkdir()
    elif data is not None:
        image.write_bytes(data)
    assert search(index_and_bundle, image) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert errors[0].getMessage().startswith(f"image {image}: {reason}")
    assert capsys.readouterr().out == ""


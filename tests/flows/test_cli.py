"""The cirflow command end to end on tiny sizes: data -> train -> eval, and its error paths."""

import json
from pathlib import Path

import pytest
from PIL import Image

from flows.cli import main
from tests.conftest import TINY_MODEL


def test_train_then_eval(tiny_shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workdir = tmp_path / "wd"
    assert main(["train", "--workdir", str(workdir), "--run-id", "r", f"data.root={tiny_shapes}",
                 *TINY_MODEL, "optim.max_steps=5"]) == 0
    checkpoint = workdir / "runs" / "r" / "checkpoints" / "model.pt"
    assert capsys.readouterr().out.strip().endswith(str(checkpoint))

    assert main(["eval", "--checkpoint", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "shapes/test (40 queries)" in out and "shapes/novel (40 queries)" in out and "image-only" in out
    eval_dir = workdir / "runs" / "r" / "eval"
    results = json.loads((eval_dir / "metrics.json").read_text())["results"]
    assert set(results) == {"shapes/test", "shapes/novel"}
    assert set(results["shapes/test"]) == {"composed", "image-only", "text-only"}
    for metric, value in results["shapes/test"]["composed"].items():
        assert 0.0 <= value <= 1.0, metric
    # Novel shares test's images and targets: the image-only baseline cannot tell the captions apart.
    assert results["shapes/test"]["image-only"] == results["shapes/novel"]["image-only"]
    with Image.open(eval_dir / "examples-shapes-test.png") as sheet:
        assert sheet.width > 500 and sheet.height > 300


def test_data_command_writes_dataset(tmp_path: Path) -> None:
    assert main(["data", "shapes", "--out", str(tmp_path / "s"), "--scale", "0.005", "--workers", "1"]) == 0
    assert (tmp_path / "s" / "shapes.json").exists()


def test_bad_config_exits_2_with_the_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["train", "--workdir", str(tmp_path), "optim.learning_rate=1"]) == 2
    assert "unknown key(s) ['learning_rate']" in caplog.text and "valid keys" in caplog.text
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "none.pt not found" in caplog.text

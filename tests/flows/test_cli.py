"""The cirflow command end to end on tiny sizes: data -> train -> eval, and its error paths."""

import json
from pathlib import Path

import pytest
from PIL import Image

from cirflow.flows.cli import main
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


def test_demo_end_to_end_matches_onnxruntime(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cirflow.flows.demo import DemoConfig, run_demo

    results = run_demo(DemoConfig(tmp_path, scale=0.01, overrides=(*TINY_MODEL, "optim.max_steps=5")))
    out = capsys.readouterr().out
    assert "shapes/test: composed queries, PyTorch checkpoint vs exported bundle (ORT)" in out
    # The test gallery went through the Ray job, an index and the search library: the evaluator's recall.
    assert "shapes/test as a catalog: Ray embedding job -> FAISS index -> search library" in out
    evaluator = results["onnxruntime"]["shapes/test"]["composed"]
    assert results["search"] == pytest.approx({k: evaluator[k] for k in results["search"]}, abs=1e-6)
    assert (tmp_path / "indexes" / "shapes-test" / "CURRENT").exists()
    bundles = list((tmp_path / "bundles").iterdir())
    assert len(bundles) == 1 and (bundles[0] / "manifest.json").exists()
    for split in ("shapes/test", "shapes/novel"):
        n = 20  # queries per split at scale 0.01: a flip of one near-tied ranking moves a recall by 1/n
        for mode in ("composed", "image-only"):
            torch_m, ort_m = results["pytorch"][split][mode], results["onnxruntime"][split][mode]
            for metric, value in torch_m.items():
                assert abs(value - ort_m[metric]) <= 1 / n + 1e-9, (split, mode, metric)

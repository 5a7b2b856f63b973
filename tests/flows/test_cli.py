"""The cirflow command end to end on tiny sizes: data -> train -> eval, and its error paths."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cirflow.flows.cli import main
from cirflow.models.tiny import TINY_MODEL

# The export and indexing stacks: a training host must not need them (nor pay their import time).
NOT_FOR_TRAINING = {"onnx", "onnxruntime", "onnxscript", "faiss", "ray", "pyarrow", "prefect", "tensorrt", "upath",
                    "fsspec"}


def test_train_then_eval(tiny_shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         caplog: pytest.LogCaptureFixture) -> None:
    workdir = tmp_path / "wd"
    assert main(["train", "--workdir", str(workdir), "--run-id", "r", f"data.root={tiny_shapes}",
                 *TINY_MODEL, "optim.max_steps=5"]) == 0
    checkpoint = workdir / "runs" / "r" / "checkpoints" / "model.pt"
    assert capsys.readouterr().out.strip().endswith(str(checkpoint))
    # The same run id with another config is refused, naming what changed; the finished run is untouched.
    before = checkpoint.stat().st_mtime_ns
    assert main(["train", "--workdir", str(workdir), "--run-id", "r", f"data.root={tiny_shapes}",
                 *TINY_MODEL, "optim.max_steps=5", "optim.lr=0.01"]) == 2
    assert "was started with another config (optim.lr: 0.002 -> 0.01)" in caplog.text
    assert checkpoint.stat().st_mtime_ns == before

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


@pytest.mark.parametrize("bad, reason", [
    ("optim.batch_size=0", "config.optim: batch_size must be positive, got 0"),
    ("optim.max_steps=0", "config.optim: max_steps and max_minutes are both 0"),
    ("model.image.heads=3", "config.model.image: dim=32 is not divisible by heads=3"),
    ("stage2.lr=-1", "config.stage2: lr must be positive, got -1"),
    ("optim.lr=inf", "config.optim.lr: must be a finite number, got inf"),  # inf passed `lr > 0`: NaN scores later
])
def test_out_of_range_config_exits_2_before_any_directory(bad: str, reason: str, tiny_shapes: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    workdir = tmp_path / "wd"
    assert main(["train", "--workdir", str(workdir), f"data.root={tiny_shapes}", *TINY_MODEL, "optim.max_steps=2",
                 bad]) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None and reason in errors[0].getMessage()
    assert "\n" not in errors[0].getMessage()
    assert not workdir.exists()


def test_train_imports_neither_export_nor_indexing(tiny_shapes: Path, tmp_path: Path) -> None:
    script = ("import json, sys\nfrom cirflow.flows.cli import main\nrc = main(sys.argv[1:])\n"
              "print(json.dumps([rc, sorted({m.split('.')[0] for m in sys.modules})]))")
    done = subprocess.run([sys.executable, "-c", script, "--log-level", "WARNING", "train", "--workdir",
                           str(tmp_path / "wd"), "--run-id", "r", f"data.root={tiny_shapes}", *TINY_MODEL,
                           "optim.max_steps=2"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    rc, modules = json.loads(done.stdout.splitlines()[-1])
    assert rc == 0 and (tmp_path / "wd" / "runs" / "r" / "checkpoints" / "model.pt").exists()
    assert "torch" in modules and not NOT_FOR_TRAINING & set(modules)


def test_demo_end_to_end_matches_onnxruntime(prefect_harness: None, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from cirflow.flows.demo import DemoConfig, run_demo

    results = run_demo(DemoConfig(tmp_path, scale=0.01, overrides=(*TINY_MODEL, "optim.max_steps=5")))
    out = capsys.readouterr().out
    assert "shapes/test: composed queries, PyTorch checkpoint vs exported bundle (ORT)" in out
    # The test gallery went through the embedding job, an index and the search library: the evaluator's recall.
    assert "shapes/test as a catalog: embedding job -> FAISS index -> search library" in out
    # Then the shop changed and the catalog flow re-embedded exactly the new and overwritten images.
    change, refresh = results["change"], results["refresh"]
    assert refresh["encoded"] == change["added"] + change["overwritten"] > 0
    assert refresh["delta"]["removed"] == change["removed"] > 0
    assert "images re-embedded" in out
    evaluator = results["onnxruntime"]["shapes/test"]["composed"]
    assert results["search"] == pytest.approx({k: evaluator[k] for k in results["search"]}, abs=1e-6)
    assert (tmp_path / "indexes" / "shapes-shop" / "CURRENT").exists()
    bundles = [p for p in (tmp_path / "bundles").iterdir() if p.is_dir()]
    assert len(bundles) == 1 and (bundles[0] / "manifest.json").exists()
    assert (tmp_path / "bundles" / "CURRENT").read_text().strip() == bundles[0].name  # what embed configs name
    # Composed queries only: after 5 steps every image vector lies within 1e-6 cosine of every other, so the
    # image-only rankings are float noise that ORT and PyTorch order differently (export parity is tested
    # tie-tolerantly in tests/export/test_parity.py).
    for split in ("shapes/test", "shapes/novel"):
        n = 20  # queries per split at scale 0.01: a flip of one near-tied ranking moves a recall by 1/n
        torch_m, ort_m = results["pytorch"][split]["composed"], results["onnxruntime"][split]["composed"]
        for metric, value in torch_m.items():
            assert abs(value - ort_m[metric]) <= 1 / n + 1e-9, (split, metric)


@pytest.mark.parametrize("overrides, backbone", [((), "tiny-minilm"), (("model.backbone.name=tiny",), "tiny")])
def test_the_demo_trains_its_chosen_backbone_unless_told_otherwise(tmp_path: Path, overrides: tuple[str, ...],
                                                                   backbone: str) -> None:
    import yaml

    from cirflow.flows.demo import DemoConfig, write_pipeline_config

    path = write_pipeline_config(DemoConfig(tmp_path, overrides=overrides), tmp_path, tmp_path / "data",
                                 tmp_path / "shop")
    model = yaml.safe_load(path.read_text())["training"]["train"]["model"]["backbone"]
    assert model["name"] == backbone
    assert model["text_neck_layers"] == (2 if backbone == "tiny-minilm" else 0)
    loss = yaml.safe_load(path.read_text())["training"]["train"]["loss"]
    assert loss["text_noise"] == (1.0 if backbone == "tiny-minilm" else 0.0)


def test_embed_to_an_unreachable_workdir_uri_exits_2_naming_workdir(tiny_bundle: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "catalog"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / f"img-{i}.png")
    with socket.socket() as closed:  # bound but not listening: a connection to it is refused at once
        closed.bind(("127.0.0.1", 0))
        workdir = f"ftp://127.0.0.1:{closed.getsockname()[1]}/workdir"
        assert main(["embed", "catalog.name=shop", f"catalog.folder={folder}", f"bundle={tiny_bundle}",
                     f"workdir={workdir}"]) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None
    message = errors[0].getMessage()
    assert message.startswith(f"workdir='{workdir}' cannot be used: ") and "Connection refused" in message


@pytest.mark.parametrize("command", ["train", "demo"])
def test_a_uri_workdir_for_a_local_only_job_is_refused_by_argparse(command: str, tiny_overrides: list[str],
                                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # Path("ftp://host/x") is the local directory ./ftp:/host/x: the job would "succeed" into it.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        # Before argparse checked it, train ran on; demo is made to fail fast here (its config is missing).
        extra = [*tiny_overrides, "optim.max_steps=1"] if command == "train" else ["--config", "none.yaml"]
        main([command, "--workdir", "ftp://host/x", *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("argument --workdir: 'ftp://host/x' is a URI; this job writes to a local (or mounted) "
                        "directory: give its path")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("port", ["0", "65536", "99999", "-1", "http", "80.5"])
def test_serve_refuses_a_port_outside_1_to_65535(port: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:  # argparse refuses it: nothing is loaded, no port opened
        main(["serve", "--index", str(tmp_path / "none"), "--port", port])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"argument --port: {port!r} is not a TCP port: give a whole number in 1..65535")


def test_serve_accepts_the_port_range_bounds() -> None:
    from cirflow.flows.cli import tcp_port

    assert (tcp_port("1"), tcp_port("65535"), tcp_port(" 8000 ")) == (1, 65535, 8000)


def test_the_catalog_flow_refuses_a_uri_workdir() -> None:
    # It keeps snapshots, queries, indexes and reports with pathlib: a URI would be a local directory "ftp:".
    from cirflow.core.config import ConfigError, load_config
    from cirflow.flows.catalog_flow import CatalogFlowConfig

    with pytest.raises(ConfigError, match=r"^config: embed.workdir='ftp://host/x' is a URI; the catalog flow keeps "
                                          r"its work directory on a local \(or mounted\) filesystem"):
        load_config(CatalogFlowConfig, None, ["embed.workdir=ftp://host/x"])

"""BundleRuntime: verification before use, provider selection, and clear errors for bad input."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from cirflow.export import runtime as rt
from cirflow.export.manifest import BundleError
from cirflow.export.runtime import CPU, CUDA, TRT, BundleRuntime, GPUUnavailableError, InputError, select_providers
from tests.export.conftest import random_images

COMPOSER = "sum"


@pytest.fixture(scope="module")
def runtime(bundle_for) -> BundleRuntime:
    return BundleRuntime.load(bundle_for(COMPOSER)[1], providers="cpu")


@pytest.fixture
def bundle_copy(bundle_for, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle_for(COMPOSER)[1], tmp_path / "bundle"))


# --- verification ------------------------------------------------------------------------------------------

def test_missing_file_is_named(bundle_copy: Path) -> None:
    (bundle_copy / "query_encoder.onnx.data").unlink()
    with pytest.raises(BundleError, match=r"file query_encoder\.onnx\.data listed in the manifest is missing"):
        BundleRuntime.load(bundle_copy)


def test_tampered_file_is_named(bundle_copy: Path) -> None:
    weights = bundle_copy / "image_encoder.onnx.data"
    original = weights.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF  # same size, one weight changed
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"image_encoder\.onnx\.data does not match its sha256"):
        BundleRuntime.load(bundle_copy)
    weights.write_bytes(original)
    (bundle_copy / "tokenizer.json").write_text("{}")
    with pytest.raises(BundleError, match=r"tokenizer\.json has 2 bytes"):
        BundleRuntime.load(bundle_copy)


def test_missing_or_edited_manifest(bundle_copy: Path, tmp_path: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["bundle_id"] = "0" * 16
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not match the checksums of its files"):
        BundleRuntime.load(bundle_copy)
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="has neither manifest.json nor a CURRENT file naming a bundle"):
        BundleRuntime.load(bundle_copy)
    with pytest.raises(BundleError, match="nowhere does not exist: no manifest.json"):
        BundleRuntime.load(tmp_path / "nowhere")


# --- providers -----------------------------------------------------------------------------------------------

def test_provider_priority_and_fallback_logging(caplog: pytest.LogCaptureFixture) -> None:
    assert select_providers("auto", [TRT, CUDA, CPU]) == [TRT, CUDA, CPU]
    assert select_providers("cuda", [TRT, CUDA, CPU]) == [CUDA, CPU]
    assert select_providers("cpu", [TRT, CUDA, CPU]) == [CPU]
    with caplog.at_level(logging.INFO, logger="cirflow.export.runtime"):
        assert select_providers("tensorrt", [CUDA, CPU]) == [CUDA, CPU]
        assert select_providers("cuda", [CPU]) == [CPU]
    assert "TensorRT execution provider unavailable" in caplog.text
    assert "no GPU execution provider" in caplog.text and "running on CPU" in caplog.text
    with pytest.raises(ValueError, match=r"providers='gpu' is not one of \['auto', 'cpu', 'cuda', 'tensorrt'\]"):
        select_providers("gpu", [CPU])


def test_require_gpu_on_cpu_only_raises(bundle_for) -> None:
    if any(p in rt.GPU_PROVIDERS for p in ort.get_available_providers()):
        pytest.skip("this onnxruntime has a GPU provider")
    bundle = bundle_for(COMPOSER)[1]
    with pytest.raises(GPUUnavailableError, match="a GPU was required but onnxruntime offers no GPU provider"):
        BundleRuntime.load(bundle, providers="auto", require_gpu=True)
    with pytest.raises(ValueError, match="require_gpu=True contradicts providers='cpu'"):
        BundleRuntime.load(bundle, providers="cpu", require_gpu=True)


@pytest.mark.filterwarnings("ignore:Specified provider .* is not in available provider names")
def test_require_gpu_catches_orts_silent_cpu_fallback(bundle_for, monkeypatch: pytest.MonkeyPatch) -> None:
    """A provider that is offered but cannot start leaves ORT on the CPU with only a warning."""
    if CUDA in ort.get_available_providers():
        pytest.skip("CUDA provider really available here")
    monkeypatch.setattr(rt.ort, "get_available_providers", lambda: [CUDA, CPU])
    with pytest.raises(GPUUnavailableError, match=r"query_encoder\.onnx, image_encoder\.onnx and text_encoder\.onnx "
                                                  r"run on the CPU "
                                                  r"\(providers per graph: .*'CPUExecutionProvider'\]"):
        BundleRuntime.load(bundle_for(COMPOSER)[1], providers="cuda", require_gpu=True)


class _FakeSession:
    """Stands in for ort.InferenceSession on a GPU host where one graph's session fell back to the CPU (ORT
    decides per session: e.g. the GPU ran out of memory for the second one)."""

    on_gpu: set[str] = set()

    def __init__(self, path: str, options: object, providers: list[str]) -> None:
        self.file = Path(path).name

    def get_providers(self) -> list[str]:
        return [CUDA, CPU] if self.file in self.on_gpu else [CPU]


ALL_GRAPHS = {"query_encoder.onnx", "image_encoder.onnx", "text_encoder.onnx"}


@pytest.mark.parametrize("on_cpu", sorted(ALL_GRAPHS))
def test_require_gpu_checks_every_session(bundle_for, monkeypatch: pytest.MonkeyPatch,
                                          on_cpu: str) -> None:
    monkeypatch.setattr(rt.ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(rt.ort, "InferenceSession", _FakeSession)
    monkeypatch.setattr(_FakeSession, "on_gpu", ALL_GRAPHS - {on_cpu})
    with pytest.raises(GPUUnavailableError, match=rf"but {on_cpu} runs on the CPU"):
        BundleRuntime.load(bundle_for(COMPOSER)[1], providers="cuda", require_gpu=True)
    monkeypatch.setattr(_FakeSession, "on_gpu", ALL_GRAPHS)
    runtime = BundleRuntime.load(bundle_for(COMPOSER)[1], providers="cuda", require_gpu=True)
    assert runtime.providers == [CUDA, CPU] and runtime.image_session.get_providers() == [CUDA, CPU]


# --- input errors ------------------------------------------------------------------------------------------

def test_pixel_errors_name_the_problem(runtime: BundleRuntime) -> None:
    good = np.zeros((2, 3, 64, 64), dtype=np.float32)
    with pytest.raises(InputError, match="pixel_values must be float32, got float64"):
        runtime.encode_images(good.astype(np.float64))
    with pytest.raises(InputError, match=r"must be \(B, 3, 64, 64\), got shape \(2, 64, 64, 3\)"):
        runtime.encode_images(good.transpose(0, 2, 3, 1))
    with pytest.raises(InputError, match="must be 64x64 .* got 32x32"):
        runtime.encode_images(good[:, :, :32, :32])
    with pytest.raises(InputError, match="must be a numpy array, got list"):
        runtime.encode_images([[0.0]])


def test_token_errors_name_the_problem(runtime: BundleRuntime) -> None:
    px = np.zeros((2, 3, 64, 64), dtype=np.float32)
    ids, mask = np.ones((2, 5), dtype=np.int64), np.ones((2, 5), dtype=np.int64)
    with pytest.raises(InputError, match="input_ids must be a \\(B, L\\) int64 array, got int32"):
        runtime.encode_queries(px, ids.astype(np.int32), mask)
    with pytest.raises(InputError, match="batch mismatch: 1 images but 2 token rows"):
        runtime.encode_queries(px[:1], ids, mask)
    with pytest.raises(InputError, match=r"sequence length 40 is outside 1\.\.32"):
        runtime.encode_queries(px, np.ones((2, 40), np.int64), np.ones((2, 40), np.int64))
    with pytest.raises(InputError, match=r"input_ids must lie in \[0, \d+\)"):
        runtime.encode_queries(px, ids * 100000, mask)
    with pytest.raises(InputError, match="at least one 1 per row"):
        runtime.encode_queries(px, ids, mask * 0)


def test_image_errors_name_the_image(runtime: BundleRuntime, tmp_path: Path) -> None:
    rgb = Image.new("RGB", (64, 64))
    with pytest.raises(InputError, match=r"images\[1\]: mode 'L' is not RGB"):
        runtime.embed_images([rgb, Image.new("L", (64, 64))])
    with pytest.raises(InputError, match=r"images\[0\]: an array must be \(H, W, 3\) uint8 RGB, got uint8 "
                                         r"\(64, 64, 4\)"):
        runtime.embed_images([np.zeros((64, 64, 4), np.uint8)])
    with pytest.raises(InputError, match=r"got float32 \(64, 64, 3\)"):
        runtime.embed_images([np.zeros((64, 64, 3), np.float32)])
    with pytest.raises(InputError, match=r"images\[0\] is str; .* wrap file paths in pathlib.Path"):
        runtime.embed_images(["cat.png"])
    with pytest.raises(ValueError, match=r"images\[0\]: cannot decode"):
        runtime.embed_images([b"not an image"])
    with pytest.raises(ValueError, match="gone.png: file not found"):
        runtime.embed_images([tmp_path / "gone.png"])


def test_inputs_of_every_kind_embed_alike(runtime: BundleRuntime, tmp_path: Path) -> None:
    """PIL image, encoded bytes, a file path and a uint8 array of one picture give one vector."""
    array = random_images(1, 64, seed=3)[0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    Image.fromarray(array).save(tmp_path / "x.png")
    out = runtime.embed_images([Image.fromarray(array), buffer.getvalue(), tmp_path / "x.png", array])
    assert out.shape == (4, runtime.embed_dim)
    np.testing.assert_allclose(out, np.repeat(out[:1], 4, axis=0), atol=1e-6)
    assert runtime.embed_images([]).shape == (0, runtime.embed_dim)


def test_text_errors_and_batch_mismatch(runtime: BundleRuntime) -> None:
    images = [Image.new("RGB", (64, 64))] * 2
    with pytest.raises(InputError, match=r"texts\[1\] is empty"):
        runtime.embed_queries(images, ["make it red", "   "])
    with pytest.raises(InputError, match=r"texts\[0\] is empty"):
        runtime.embed_queries(images[:1], [""])
    with pytest.raises(InputError, match=r"texts\[0\] is int, expected str"):
        runtime.embed_queries(images[:1], [3])
    with pytest.raises(InputError, match="batch mismatch: 2 images but 3 texts"):
        runtime.embed_queries(images, ["a", "b", "c"])


def test_over_long_text_is_truncated_like_training(runtime: BundleRuntime,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    image = [Image.fromarray(random_images(1, 64, seed=4)[0])]
    long = "make the red circle blue " * 20  # ~100 tokens, max_text_length is 32
    with caplog.at_level(logging.WARNING, logger="cirflow.export.runtime"):
        q_long = runtime.embed_queries(image, [long])
        q_longer = runtime.embed_queries(image, [long + " and remove the large triangle"])
    assert "texts[0] is longer than max_text_length=32 tokens; truncated as in training" in caplog.text
    np.testing.assert_array_equal(q_long, q_longer)  # only the first 32 tokens count, as in training
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cirflow.export.runtime"):
        runtime.embed_queries(image, ["make the red circle blue"])
    assert "truncated" not in caplog.text

"""TensorRT engines: the clear error without TensorRT, the fp16 ONNX conversion (TRT >= 11, onnxconverter-common),
and a real build that runs only where the tensorrt module and a GPU exist."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cirflow.export import tensorrt
from cirflow.export.manifest import verify_bundle
from cirflow.export.tensorrt import TensorRTUnavailable, build_engines, convert_to_fp16, profiles
from cirflow.models.composers import COMPOSERS
from tests.export.conftest import random_images

COMPOSER = "sum"
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_missing_tensorrt_gives_a_clear_error(bundle_for, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = Path(shutil.copytree(bundle_for(COMPOSER)[1], tmp_path / "bundle"))
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail, installed or not
    with pytest.raises(TensorRTUnavailable, match="tensorrt Python module is not installed"):
        build_engines(bundle)
    assert not list(bundle.glob("*.plan")) and "engines" not in verify_bundle(bundle)

    # Stale engines (a plan deleted) do not stop a rebuild: build_engines replaces them, so it checks the ONNX
    # bundle only and gets as far as TensorRT.
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["engines"] = {"engines": {"query_encoder": {"file": "query_encoder.plan", "sha256": "0", "bytes": 1}}}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TensorRTUnavailable, match="tensorrt Python module is not installed"):
        build_engines(bundle)


def test_arguments_are_checked_before_tensorrt_is_needed(bundle_for) -> None:
    bundle = bundle_for(COMPOSER)[1]
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        build_engines(bundle, max_batch=0)
    with pytest.raises(ValueError, match=r"max_seq=64 is outside 1\.\.32"):
        build_engines(bundle, max_seq=64)


def test_profiles_cover_the_dynamic_axes() -> None:
    p = profiles(image_size=64, max_batch=64, max_seq=32)
    assert p["query_encoder"].shapes["input_ids"] == ((1, 1), (1, 16), (64, 32))
    assert p["query_encoder"].shapes["pixel_values"] == ((1, 3, 64, 64), (1, 3, 64, 64), (64, 3, 64, 64))
    assert p["image_encoder"].shapes["pixel_values"][1] == (64, 3, 64, 64)  # catalogs embed in full batches


FP16_ATOL = 1e-2  # fp16 keeps ~3 decimal digits; unit-length outputs of a few layers stay well inside this


def _feeds(graph: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {"pixel_values": ((random_images(5, 64, seed=5) / 255.0 - 0.85) / 0.25)
             .transpose(0, 3, 1, 2).astype(np.float32)}
    if graph == "query_encoder":
        feeds["input_ids"] = rng.integers(4, 40, (5, 9))
        feeds["attention_mask"] = np.ones((5, 9), dtype=np.int64)
        feeds["attention_mask"][0, 4:] = 0  # padding takes the masked paths (ATF's Cast to float among them)
    return feeds


@pytest.mark.parametrize("composer, graph", [*((c, "query_encoder") for c in sorted(COMPOSERS)),
                                             (COMPOSER, "image_encoder")])
def test_fp16_conversion_type_checks_and_stays_close(composer: str, graph: str, bundle_for,
                                                     tmp_path: Path) -> None:
    """The graph TensorRT >= 11 would build: fp16 weights inside, fp32 at the boundary, L2 norms in fp32, the
    source's IR version, weights as external data; it loads in the pinned ORT and stays close to fp32."""
    src = bundle_for(composer)[1] / f"{graph}.onnx"
    dst = convert_to_fp16(src, tmp_path / f"{graph}.onnx")
    onnx.checker.check_model(str(dst), full_check=True)
    model = onnx.load(str(dst), load_external_data=False)
    assert model.ir_version == onnx.load(str(src), load_external_data=False).ir_version
    assert (tmp_path / f"{graph}.onnx.data").is_file()
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert onnx.TensorProto.FLOAT not in {t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in model.graph.initializer}
    assert all(v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)
               for v in (*model.graph.input, *model.graph.output))
    types = _elem_types(onnx.shape_inference.infer_shapes(onnx.load(str(dst))))
    norms = [node for node in model.graph.node if node.op_type == "ReduceL2"]
    assert norms and all(types[node.input[0]] == types[node.output[0]] == onnx.TensorProto.FLOAT for node in norms)

    feeds = _feeds(graph)
    fp32 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    assert {i.name: i.type for i in session.get_inputs()}["pixel_values"] == "tensor(float)"
    assert {o.type for o in session.get_outputs()} == {"tensor(float)"}  # ARTEMIS: its features output too
    fp16 = session.run(None, feeds)[0]
    assert fp16.dtype == np.float32
    np.testing.assert_allclose(fp16, fp32, atol=FP16_ATOL, rtol=0)


def test_fp16_conversion_that_does_not_type_check_is_an_error(bundle_for, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The converter alone, without our block list for Cast(to=float) (its issue #320), breaks ATF's graph:
    the check after converting must say so instead of handing TensorRT a wrong graph."""
    convert = tensorrt.convert_float_to_float16
    monkeypatch.setattr(tensorrt, "convert_float_to_float16",
                        lambda model, **kw: convert(model, **{**kw, "node_block_list": []}))
    with pytest.raises(ValueError, match=r"(?s)query_encoder\.onnx: the fp16 conversion .* does not type-check.*"
                                         "add it to FP32_OPS"):
        convert_to_fp16(bundle_for("atf")[1] / "query_encoder.onnx", tmp_path / "query_encoder.onnx")


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    return {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}


@pytest.mark.skipif(not HAS_TENSORRT, reason="tensorrt module not installed (GPU machines only)")
def test_build_engines_records_them_beside_the_bundle(bundle_for, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(bundle_for(COMPOSER)[1], tmp_path / "bundle"))
    before = verify_bundle(bundle)["bundle_id"]
    try:
        section = build_engines(bundle, fp16=True, max_batch=8)
    except TensorRTUnavailable as e:  # the module is there but no usable GPU
        pytest.skip(str(e))
    manifest = verify_bundle(bundle)
    assert manifest["bundle_id"] == before  # engines are derived artifacts, outside the content hash
    assert manifest["engines"] == section and section["precision"] == "fp16" and section["gpu"]
    for name in ("query_encoder", "image_encoder"):
        assert (bundle / f"{name}.plan").stat().st_size == section["engines"][name]["bytes"] > 0

"""Bundle contents, validity of every artifact, content-hash id, engine checks, atomic and idempotent writing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from cirflow.core.config import to_dict
from cirflow.core.files import sha256_file
from cirflow.export.bundle import _publish, export_bundle
from cirflow.export.manifest import CONTRACT_KEYS, FORMAT, BundleError, content_id, verify_bundle
from cirflow.models.checkpoint import load_checkpoint
from tests.export.conftest import bundle_checkpoint

COMPOSER = "sum"  # the cheapest bundle; parity for every composer lives in test_parity.py
FILES = {"query_encoder.onnx", "query_encoder.onnx.data", "image_encoder.onnx", "image_encoder.onnx.data",
         "text_encoder.onnx", "text_encoder.onnx.data", "tokenizer.json", "preprocess.json", "manifest.json"}


def test_bundle_layout_and_manifest(bundle_for) -> None:
    ckpt, bundle = bundle_for(COMPOSER)
    loaded = load_checkpoint(ckpt)
    assert {p.name for p in bundle.iterdir()} == FILES
    manifest = verify_bundle(bundle)
    assert manifest["format"] == FORMAT
    assert set(manifest["files"]) == FILES - {"manifest.json"}
    assert manifest["bundle_id"] == content_id(manifest)
    assert "reranker" not in manifest  # a composer whose query vector is exact: no re-rank stage, no new key
    assert manifest["embed_dim"] == loaded.model.embed_dim == 32
    assert manifest["max_text_length"] == loaded.config.tokenizer.max_length
    assert manifest["max_sequence_length"] == loaded.config.model.text.max_length
    assert manifest["vocab_size"] == loaded.tokenizer.get_vocab_size()
    assert (manifest["opset"], manifest["ir_version"]) == (20, 10)
    assert manifest["source"]["checkpoint"] == str(ckpt.resolve())
    assert manifest["source"]["metrics"] == {"val": {"R@1": 0.25}} and manifest["source"]["step"] == 7
    assert json.loads((bundle / "preprocess.json").read_text()) == to_dict(loaded.config.preprocess)
    assert (bundle / "tokenizer.json").read_text() == loaded.tokenizer.to_str()


def test_every_graph_passes_checker_and_loads_in_pinned_ort(bundle_for) -> None:
    _, bundle = bundle_for(COMPOSER)
    expected = {"query_encoder.onnx": (["pixel_values", "input_ids", "attention_mask"], ["query"]),
                "image_encoder.onnx": (["pixel_values"], ["embedding"]),
                "text_encoder.onnx": (["input_ids", "attention_mask"], ["text"])}
    for name, (inputs, outputs) in expected.items():
        onnx.checker.check_model(str(bundle / name), full_check=True)  # by path: external data checked too
        model = onnx.load(str(bundle / name), load_external_data=False)
        assert model.ir_version == 10
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        session = ort.InferenceSession(str(bundle / name), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == inputs
        assert [o.name for o in session.get_outputs()] == outputs
        dims = {i.name: i.shape for i in session.get_inputs()}
        assert isinstance(next(iter(dims.values()))[0], str)  # dynamic batch
        if "input_ids" in dims:
            assert all(isinstance(d, str) for d in dims["input_ids"])  # dynamic batch and sequence
        # No debug metadata (absolute source paths) that would tie the bundle id to a checkout.
        assert not any(node.metadata_props for node in model.graph.node)


def test_rerun_is_a_no_op_and_same_weights_give_same_id(bundle_for, tmp_path: Path) -> None:
    ckpt, bundle = bundle_for(COMPOSER)
    stamps = {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()}
    assert export_bundle(ckpt, bundle) == bundle
    assert {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()} == stamps

    # Another checkpoint file with the same weights (other payload): a fresh export, byte-identical content.
    twin = bundle_checkpoint(tmp_path / "twin.pt", COMPOSER, note="another file")
    (tmp_path / "twin").mkdir()  # an empty directory is a fine target
    again = export_bundle(twin, tmp_path / "twin")
    assert verify_bundle(again)["bundle_id"] == verify_bundle(bundle)["bundle_id"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twin", "twin.pt"]  # no temp dir left behind

    # Publishing that content over the first bundle keeps the first one untouched.
    assert _publish(again, bundle, verify_bundle(again)) == bundle
    assert {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()} == stamps


def test_refuses_to_overwrite_a_different_bundle(bundle_for, tmp_path: Path) -> None:
    _, bundle = bundle_for(COMPOSER)
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    other = bundle_checkpoint(tmp_path / "other.pt", COMPOSER, seed=1)  # different weights
    old_id = verify_bundle(target)["bundle_id"]
    with pytest.raises(BundleError, match=rf"refusing to overwrite bundle .*{old_id}.* different content"):
        export_bundle(other, target)
    assert verify_bundle(target)["bundle_id"] == old_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "other.pt"]  # no temp dir left behind


def test_refuses_a_directory_that_is_not_a_bundle(bundle_for, tmp_path: Path) -> None:
    ckpt, _ = bundle_for(COMPOSER)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="exists but is not a valid bundle"):
        export_bundle(ckpt, tmp_path / "out")
    with pytest.raises(BundleError, match="missing.pt not found"):
        export_bundle(tmp_path / "missing.pt", tmp_path / "new")


@pytest.fixture
def bundle_copy(bundle_for, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle_for(COMPOSER)[1], tmp_path / "bundle"))


def _edit_manifest(bundle: Path, **changes: object) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("key, value", [("vocab_size", 100000), ("image_size", 32), ("max_sequence_length", 64),
                                        ("composer", "atf")])
def test_edited_dims_and_limits_are_refused(bundle_copy: Path, key: str, value: object) -> None:
    """The values the runtime validates inputs against are covered by the bundle_id like the files are."""
    assert key in CONTRACT_KEYS
    _edit_manifest(bundle_copy, **{key: value})
    with pytest.raises(BundleError, match=r"bundle_id '\w+' does not match .* dims and limits .*was edited"):
        verify_bundle(bundle_copy)


def test_manifest_without_limits_or_of_an_older_format_is_refused(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest["max_text_length"], manifest["graphs"]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="manifest.json lacks max_text_length, graphs"):
        verify_bundle(bundle_copy)
    for old in ("cirflow-bundle-v1", "cirflow-bundle-v2"):  # v1 ids hashed the files alone; v2 had no text graph
        _edit_manifest(bundle_copy, format=old)
        with pytest.raises(BundleError, match=rf"not a cirflow-bundle-v3 manifest \(format '{old}'\); "
                                              "export the checkpoint again"):
            verify_bundle(bundle_copy)


def _add_engines(bundle: Path) -> dict:
    """A hand-written engines section (as build_engines records it) over fake plan files: TensorRT is not
    needed to check what verify_bundle does with them."""
    engines = {}
    for i, name in enumerate(("query_encoder", "image_encoder")):
        plan = bundle / f"{name}.plan"
        plan.write_bytes(bytes(range(256)) * (4 + i))
        engines[name] = {"file": plan.name, "sha256": sha256_file(plan), "bytes": plan.stat().st_size,
                         "profile": {}}
    section = {"tensorrt": "11.0.0", "gpu": "test GPU", "precision": "fp16", "engines": engines}
    _edit_manifest(bundle, engines=section)
    return section


def test_engines_are_verified(bundle_copy: Path) -> None:
    before = verify_bundle(bundle_copy)["bundle_id"]
    section = _add_engines(bundle_copy)
    manifest = verify_bundle(bundle_copy)
    assert manifest["engines"] == section and manifest["bundle_id"] == before  # engines are outside the id

    plan = bundle_copy / "image_encoder.plan"
    original = plan.read_bytes()
    data = bytearray(original)
    data[10] ^= 0xFF  # same size, one byte changed
    plan.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"TensorRT engine file image_encoder\.plan does not match its sha256"):
        verify_bundle(bundle_copy)
    assert verify_bundle(bundle_copy, engines=False)["bundle_id"] == before  # what build_engines checks

    plan.write_bytes(original)
    (bundle_copy / "query_encoder.plan").unlink()
    with pytest.raises(BundleError, match=r"TensorRT engine file query_encoder\.plan listed in the manifest is "
                                          r"missing.*cirflow export trt --bundle"):
        verify_bundle(bundle_copy)


@pytest.mark.parametrize("engines", [[], {"query_encoder": {"file": "q.plan"}},
                                     {"query_encoder": {"file": "../q.plan", "sha256": "0", "bytes": 1}}])
def test_malformed_engines_section_is_refused(bundle_copy: Path, engines: object) -> None:
    _edit_manifest(bundle_copy, engines={"tensorrt": "11.0.0", "engines": engines})
    with pytest.raises(BundleError, match="the engines section of manifest.json is malformed"):
        verify_bundle(bundle_copy)

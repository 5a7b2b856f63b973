"""Bundle contents, validity of every artifact, content-hash id, atomic and idempotent writing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from cirflow.core.config import to_dict
from cirflow.export.bundle import _publish, export_bundle
from cirflow.export.manifest import FORMAT, BundleError, content_id, verify_bundle
from cirflow.models.checkpoint import load_checkpoint
from tests.export.conftest import make_checkpoint

COMPOSER = "sum"  # the cheapest bundle; parity for every composer lives in test_parity.py
FILES = {"query_encoder.onnx", "query_encoder.onnx.data", "image_encoder.onnx", "image_encoder.onnx.data",
         "tokenizer.json", "preprocess.json", "manifest.json"}


def test_bundle_layout_and_manifest(bundle_for) -> None:
    ckpt, bundle = bundle_for(COMPOSER)
    loaded = load_checkpoint(ckpt)
    assert {p.name for p in bundle.iterdir()} == FILES
    manifest = verify_bundle(bundle)
    assert manifest["format"] == FORMAT
    assert set(manifest["files"]) == FILES - {"manifest.json"}
    assert manifest["bundle_id"] == content_id(manifest["files"])
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
                "image_encoder.onnx": (["pixel_values"], ["embedding"])}
    for name, (inputs, outputs) in expected.items():
        onnx.checker.check_model(str(bundle / name), full_check=True)  # by path: external data checked too
        model = onnx.load(str(bundle / name), load_external_data=False)
        assert model.ir_version == 10
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        session = ort.InferenceSession(str(bundle / name), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == inputs
        assert [o.name for o in session.get_outputs()] == outputs
        dims = {i.name: i.shape for i in session.get_inputs()}
        assert isinstance(dims["pixel_values"][0], str)  # dynamic batch
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
    twin = make_checkpoint(tmp_path / "twin.pt", COMPOSER, note="another file")
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
    other = make_checkpoint(tmp_path / "other.pt", COMPOSER, seed=1)  # different weights
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

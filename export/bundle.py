"""Checkpoint -> model bundle: three ONNX encoders, the tokenizer, the preprocessing and a manifest.

    query_encoder.onnx (+ .onnx.data)   pixel_values (B,3,H,W) f32, input_ids (B,L) i64, attention_mask (B,L) i64
                                        -> query (B, D) unit length
    image_encoder.onnx (+ .onnx.data)   pixel_values (B,3,H,W) f32 -> embedding (B, D) unit length
    text_encoder.onnx (+ .onnx.data)    input_ids (B,L) i64, attention_mask (B,L) i64 -> text (B, D) unit length
                                        (the text-only baseline: the text's vector alone, in the gallery space)
    reranker.onnx (+ .onnx.data)        only for a composer whose exact score is not the query vector's cosine
                                        (ARTEMIS, models/rerank.py): query_features (B,F,D) f32 (the query graph's
                                        second output), candidates (B,N,D) f32 (their catalog vectors)
                                        -> scores (B, N); the manifest's "reranker" says so, with the default N
    tokenizer.json, preprocess.json     the checkpoint's tokenizer and PreprocessConfig (training's code reads both)
    manifest.json                       bundle_id (hash of the files and the dims and limits), dims, versions,
                                        source checkpoint + metrics, sha256 of every file

The bundle is built in a temp directory beside `out_dir` and renamed into place, so `out_dir` is either absent
or complete. An existing bundle at `out_dir` is kept when it holds the same content and refused otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch

from cirflow.core.config import to_dict
from cirflow.core.files import describe_files, publish_dir, sha256_file, temp_dir_beside, write_json_atomic
from cirflow.export.manifest import (
    FORMAT,
    GRAPHS,
    MANIFEST,
    PREPROCESS,
    QUERY_FEATURES,
    RERANKER,
    TOKENIZER,
    BundleError,
    content_id,
    read_manifest,
    verify_bundle,
)
from cirflow.export.onnx_export import (
    WRAPPERS,
    Reranker,
    check_graph,
    example_inputs,
    export_graph,
    graph_versions,
    max_abs_diff,
)
from cirflow.models.artemis import FEATURES
from cirflow.models.checkpoint import LoadedCheckpoint, load_checkpoint
from cirflow.models.cir_model import CIRModel, needs_rerank
from cirflow.models.rerank import DEFAULT_RERANK_N

log = logging.getLogger(__name__)

PARITY_ATOL = 1e-4  # ORT vs PyTorch on the export-time check; the dynamo exporter matches to ~1e-7 here


def export_bundle(checkpoint: Path, out_dir: Path) -> Path:
    """Write the bundle of `checkpoint` to `out_dir` and return `out_dir`.

    Rerunning with the same checkpoint file returns at once; another checkpoint with the same weights leaves
    the existing bundle untouched; different content at `out_dir` raises BundleError (never overwritten).
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_file():
        raise BundleError(f"checkpoint {checkpoint} not found")
    source_sha = sha256_file(checkpoint)
    if _occupied(out_dir) and _existing_bundle(out_dir).get("source", {}).get("sha256") == source_sha:
        log.info("bundle %s is already the export of %s; nothing to do", out_dir, checkpoint)
        return out_dir

    loaded = load_checkpoint(checkpoint)
    with temp_dir_beside(out_dir) as tmp:
        manifest = _build(loaded, checkpoint, source_sha, tmp)
        return _publish(tmp, out_dir, manifest)


def _occupied(out_dir: Path) -> bool:
    """Anything but an empty directory (which the rename replaces, so `mkdir` before export is fine)."""
    return out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir()))


def _existing_bundle(out_dir: Path) -> dict[str, Any]:
    try:
        return verify_bundle(out_dir)
    except BundleError as e:
        raise BundleError(f"{out_dir} exists but is not a valid bundle ({e}); remove it or choose another "
                          "output directory") from e


def _build(loaded: LoadedCheckpoint, checkpoint: Path, source_sha: str, out: Path) -> dict[str, Any]:
    model, config = loaded.model.eval(), loaded.config
    max_length = config.model.text.max_length  # the graph's bound on the sequence axis
    tokenizer_length = (loaded.tokenizer.truncation or {}).get("max_length", config.tokenizer.max_length)
    # Batch 2 and a mid length at trace time, so the exporter cannot specialise either axis to 0/1 or the max.
    trace = example_inputs(model, batch=2, length=min(7, max_length))
    check = example_inputs(model, batch=3, length=max(1, min(5, max_length - 1)), seed=1)
    versions = {}
    for name, spec in GRAPHS.items():
        module = WRAPPERS[name](model)
        path = export_graph(module, spec, trace, max_length, out)
        try:
            session = check_graph(path)
        except Exception as e:  # checker and ORT raise several unrelated types
            raise BundleError(f"exported {spec.file} is not a valid ONNX model: {e}") from e
        # A cheap end-to-end check at other shapes than the traced ones: catches axes the exporter fixed.
        diff = max_abs_diff(session, module, spec, check)
        if not diff <= PARITY_ATOL:
            raise BundleError(f"exported {spec.file} differs from PyTorch by {diff:.2e} > {PARITY_ATOL:g}")
        versions[name] = graph_versions(path)
    if needs_rerank(model.composer):
        _export_reranker(model, out)

    (out / TOKENIZER).write_text(loaded.tokenizer.to_str())
    write_json_atomic(out / PREPROCESS, to_dict(config.preprocess), sort_keys=True)
    names = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    files = describe_files(out, names)
    payload = loaded.payload
    manifest = {
        "format": FORMAT,
        "embed_dim": model.embed_dim,
        "image_size": config.preprocess.size,
        "max_text_length": tokenizer_length,  # tokens the tokenizer keeps ([CLS]/[SEP] included)
        "max_sequence_length": max_length,  # the graphs' upper bound on L
        "vocab_size": config.model.text.vocab_size,
        "composer": config.model.composer.name,
        "backbone": config.model.backbone.name,  # informative (the graphs are what the bundle_id covers)
        "opset": versions["query_encoder"]["opset"],
        "ir_version": versions["query_encoder"]["ir_version"],
        "graphs": {name: {"file": spec.file, "inputs": list(spec.inputs), "output": spec.output}
                   for name, spec in GRAPHS.items()},
        **({"reranker": {"file": RERANKER.file, "inputs": list(RERANKER.inputs), "output": RERANKER.output,
                         "query_output": QUERY_FEATURES, "features": FEATURES, "n": DEFAULT_RERANK_N}}
           if needs_rerank(model.composer) else {}),
        "files": files,
        "source": {"checkpoint": str(checkpoint.resolve()), "sha256": source_sha,
                   "step": payload.get("step"), "metrics": payload.get("metrics")},
        "exporter": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
    }
    manifest["bundle_id"] = content_id(manifest)
    write_json_atomic(out / MANIFEST, manifest, sort_keys=True)
    return manifest


def _export_reranker(model: CIRModel, out: Path) -> None:
    """reranker.onnx: (query features, candidates' vectors) -> exact scores, checked against PyTorch at another
    batch and candidate count than traced."""
    module = Reranker(model)
    path = export_graph(module, RERANKER, example_inputs(model, batch=2, length=5, candidates=7),
                        model.config.text.max_length, out)
    try:
        session = check_graph(path)
    except Exception as e:  # checker and ORT raise several unrelated types
        raise BundleError(f"exported {RERANKER.file} is not a valid ONNX model: {e}") from e
    diff = max_abs_diff(session, module, RERANKER, example_inputs(model, batch=3, length=5, seed=1, candidates=11))
    if not diff <= PARITY_ATOL:
        raise BundleError(f"exported {RERANKER.file} differs from PyTorch by {diff:.2e} > {PARITY_ATOL:g}")


def _publish(tmp: Path, out_dir: Path, manifest: dict[str, Any]) -> Path:
    new_id = manifest["bundle_id"]
    try:
        # Atomic (also over an empty directory): no bundle or a complete one.
        wrote = publish_dir(tmp, out_dir, twin_ok=lambda found: _same_bundle(found, new_id))
    except OSError as e:
        raise BundleError(f"cannot move the new bundle into {out_dir}: {e}") from e
    if wrote:
        log.info("wrote bundle %s (bundle_id %s)", out_dir, new_id)
    else:
        log.info("bundle %s already holds bundle_id %s; kept as is", out_dir, new_id)
    return out_dir


def _same_bundle(out_dir: Path, new_id: str) -> bool:
    """Whether the bundle already at `out_dir` (an earlier export, or another process that published first) is
    this very one (the same weights, from another checkpoint file): then it is kept. Another is never overwritten."""
    if not _occupied(out_dir):
        return False
    old_id = read_manifest(out_dir).get("bundle_id")
    if old_id != new_id:
        raise BundleError(f"refusing to overwrite bundle {out_dir} (bundle_id {old_id}) with different content "
                          f"(bundle_id {new_id}); remove it or choose another output directory")
    return True

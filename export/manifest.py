"""The bundle format: file and tensor names, the manifest (checksums, content-hash bundle id), verification.

`manifest.json` is the last file written into a bundle and the first one read: a runtime trusts nothing in the
directory until every file listed under "files" (and every TensorRT engine under "engines") has the recorded
size and sha256, and the bundle_id matches those checksums and the dims and limits that input validation
relies on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cirflow.core.config import from_dict
from cirflow.core.files import CURRENT, check_files, follow_current, publish_current, read_json
from cirflow.models.preprocess import PreprocessConfig

# v2: the bundle_id also covers CONTRACT_KEYS (v1 hashed the files alone), so a v1 manifest cannot verify.
# v3: a third graph, the text encoder (text-only search); a v2 bundle has none, so it is exported again.
FORMAT = "cirflow-bundle-v3"
MANIFEST, TOKENIZER, PREPROCESS = "manifest.json", "tokenizer.json", "preprocess.json"
ID_LENGTH = 16  # hex characters of the sha256 kept as the bundle id: 64 bits, short enough for directory names
# Manifest entries that callers trust for input validation and wiring (shapes, token id range, tensor names):
# hashed into the bundle_id with the file checksums, so an edited value is caught like an edited file.
CONTRACT_KEYS = ("embed_dim", "image_size", "max_text_length", "max_sequence_length", "vocab_size", "composer",
                 "opset", "ir_version", "graphs")


@dataclass(frozen=True)
class GraphSpec:
    """File and tensor names of one exported graph: the bundle's public contract."""

    file: str
    inputs: tuple[str, ...]
    output: str


QUERY = GraphSpec("query_encoder.onnx", ("pixel_values", "input_ids", "attention_mask"), "query")
IMAGE = GraphSpec("image_encoder.onnx", ("pixel_values",), "embedding")
TEXT = GraphSpec("text_encoder.onnx", ("input_ids", "attention_mask"), "text")
GRAPHS = {"query_encoder": QUERY, "image_encoder": IMAGE, "text_encoder": TEXT}
# A bundle whose composer's exact score is not one dot product (ARTEMIS; models/rerank.py) also carries the
# re-ranker, and its query graph a second output, each query's features for it: (B, F, D) float32.
RERANKER = GraphSpec("reranker.onnx", ("query_features", "candidates"), "scores")  # (B,F,D), (B,N,D) -> (B,N)
QUERY_FEATURES = "query_features"
# Hashed into the bundle_id where present: a bundle without a re-ranker keeps the id it had before there were any.
OPTIONAL_CONTRACT_KEYS = ("reranker",)


class BundleError(ValueError):
    """A bundle is missing, damaged, tampered with, or cannot be written; the message names the file."""


def content_id(manifest: dict[str, Any]) -> str:
    """Hash over the files' (name, sha256) pairs and the CONTRACT_KEYS entries: the same ONNX graphs, weights,
    tokenizer, preprocessing and limits give the same id, whatever checkpoint file or metrics they came from
    (those live in the manifest, outside the hash)."""
    files = manifest["files"]
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\t{files[name]['sha256']}\n".encode())
    contract = {key: manifest[key] for key in CONTRACT_KEYS}
    contract.update({key: manifest[key] for key in OPTIONAL_CONTRACT_KEYS if key in manifest})
    digest.update(json.dumps(contract, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()[:ID_LENGTH]


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    path = bundle_dir / MANIFEST
    if not path.is_file():
        what = "directory" if bundle_dir.is_dir() else "bundle directory does not exist"
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST} is missing ({what})")
    manifest = read_json(path, BundleError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST} is not a {FORMAT} manifest (format {found!r}); "
                          "export the checkpoint again")
    return manifest


def resolve_bundle_dir(path: Path) -> Path:
    """A bundle directory as given, or the one a bundles directory's CURRENT names (the registered bundle).
    Jobs resolve once and pass the result on, so a bundle registered mid-job cannot change what they use."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    current = follow_current(path, BundleError)
    if current is None:
        what = "has neither" if path.is_dir() else "does not exist: no"
        raise BundleError(f"bundle {path} {what} {MANIFEST} nor a {CURRENT} file naming a bundle (cirflow "
                          "export --out DIR writes a bundle)")
    return current


def register_bundle(bundle_dir: Path) -> Path:
    """Make `bundle_dir` (verified first) the CURRENT bundle of its parent directory; returns the pointer."""
    verify_bundle(bundle_dir)
    return publish_current(bundle_dir)


def verify_bundle(bundle_dir: Path, engines: bool = True) -> dict[str, Any]:
    """Read the manifest and check every listed file's size and sha256; return the manifest.

    Raises BundleError naming the first missing or altered file, and when the recorded bundle_id does not
    match the files and CONTRACT_KEYS (an edited manifest). engines: also check the TensorRT engines of an
    "engines" section (build_engines, which replaces them, passes False).
    """
    manifest = read_manifest(bundle_dir)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST} lists no files")
    missing = [key for key in CONTRACT_KEYS if key not in manifest]
    if missing:
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST} lacks {', '.join(missing)}")
    problem = check_files(bundle_dir, files)
    if problem:
        raise BundleError(f"bundle {bundle_dir}: {problem} (damaged or tampered with)")
    expected = content_id(manifest)
    if expected != manifest.get("bundle_id"):
        raise BundleError(f"bundle {bundle_dir}: bundle_id {manifest.get('bundle_id')!r} does not match the "
                          f"checksums of its files and its recorded dims and limits ({expected!r}); {MANIFEST} "
                          "was edited")
    if engines and "engines" in manifest:
        _verify_engines(bundle_dir, manifest["engines"])
    return manifest


def _verify_engines(bundle_dir: Path, section: Any) -> None:
    """The engines section lies outside the bundle_id (engines are derived, GPU-specific files), so its plans
    are checked against their own recorded size and sha256."""
    engines = section.get("engines") if isinstance(section, dict) else None
    if not isinstance(engines, dict) or not all(_is_engine(e) for e in engines.values()):
        raise BundleError(f"bundle {bundle_dir}: the engines section of {MANIFEST} is malformed (each engine "
                          "needs a file name inside the bundle, its sha256 and bytes)")
    plans = {e["file"]: e for e in engines.values()}
    problem = check_files(bundle_dir, plans)
    if problem:
        raise BundleError(f"bundle {bundle_dir}: TensorRT engine {problem} (damaged or tampered with); build "
                          f"the engines again (cirflow export trt --bundle {bundle_dir})")


def _is_engine(entry: Any) -> bool:
    if not isinstance(entry, dict) or not {"file", "sha256", "bytes"} <= entry.keys():
        return False
    name = entry["file"]
    return isinstance(name, str) and Path(name).name == name and not name.startswith(".")


def read_preprocess(bundle_dir: Path) -> PreprocessConfig:
    """The bundle's preprocessing (preprocess.json), for the runtime and for jobs that decode images apart from it."""
    try:
        return from_dict(PreprocessConfig, read_json(bundle_dir / PREPROCESS, BundleError), PREPROCESS)
    except ValueError as e:  # read_json's BundleError and from_dict's ConfigError
        raise BundleError(f"bundle {bundle_dir}: cannot read {PREPROCESS}: {e}") from e

"""The bundle format: file and tensor names, the manifest (checksums, content-hash bundle id), verification.

`manifest.json` is the last file written into a bundle and the first one read: a runtime trusts nothing in the
directory until every file listed under "files" has the recorded size and sha256.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.config_io import from_dict
from models.preprocess import PreprocessConfig

FORMAT = "cirflow-bundle-v1"
MANIFEST, TOKENIZER, PREPROCESS = "manifest.json", "tokenizer.json", "preprocess.json"
ID_LENGTH = 16  # hex characters of the sha256 kept as the bundle id: 64 bits, short enough for directory names


@dataclass(frozen=True)
class GraphSpec:
    """File and tensor names of one exported graph: the bundle's public contract."""

    file: str
    inputs: tuple[str, ...]
    output: str


QUERY = GraphSpec("query_encoder.onnx", ("pixel_values", "input_ids", "attention_mask"), "query")
IMAGE = GraphSpec("image_encoder.onnx", ("pixel_values",), "embedding")
GRAPHS = {"query_encoder": QUERY, "image_encoder": IMAGE}


class BundleError(ValueError):
    """A bundle is missing, damaged, tampered with, or cannot be written; the message names the file."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """name -> {"sha256", "bytes"} for files inside `directory`, sorted by name."""
    return {name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
            for name in sorted(names)}


def check_files(directory: Path, files: dict[str, dict[str, Any]], checksums: bool = True) -> str | None:
    """The first listed file that is missing or differs from its recorded size (or sha256), described in a
    phrase naming the file; None when all match. Bundles, embedding runs and indexes share this check."""
    for name, meta in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            return f"file {name} listed in the manifest is missing"
        size = path.stat().st_size
        if size != meta["bytes"]:
            return f"file {name} has {size} bytes, the manifest records {meta['bytes']}"
        if checksums and sha256_file(path) != meta["sha256"]:
            return f"file {name} does not match its sha256 in the manifest"
    return None


def content_id(files: dict[str, dict[str, Any]]) -> str:
    """Hash over (name, sha256) pairs: the same ONNX graphs, weights, tokenizer and preprocessing give the same
    id, whatever checkpoint file or metrics they came from (those live in the manifest, outside the hash)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\t{files[name]['sha256']}\n".encode())
    return digest.hexdigest()[:ID_LENGTH]


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    path = bundle_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as e:
        what = "directory" if bundle_dir.is_dir() else "bundle directory does not exist"
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST} is missing ({what})") from e
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST} cannot be read: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST} is not a {FORMAT} manifest")
    return manifest


def verify_bundle(bundle_dir: Path) -> dict[str, Any]:
    """Read the manifest and check every listed file's size and sha256; return the manifest.

    Raises BundleError naming the first missing or altered file, and when the recorded bundle_id does not
    match the files (an edited manifest).
    """
    manifest = read_manifest(bundle_dir)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"bundle {bundle_dir}: {MANIFEST} lists no files")
    problem = check_files(bundle_dir, files)
    if problem:
        raise BundleError(f"bundle {bundle_dir}: {problem} (damaged or tampered with)")
    if content_id(files) != manifest.get("bundle_id"):
        raise BundleError(f"bundle {bundle_dir}: bundle_id {manifest.get('bundle_id')!r} does not match the "
                          f"checksums of its files ({content_id(files)!r}); {MANIFEST} was edited")
    return manifest


def read_preprocess(bundle_dir: Path) -> PreprocessConfig:
    """The bundle's preprocessing (preprocess.json), for the runtime and for jobs that decode images apart from it."""
    try:
        return from_dict(PreprocessConfig, json.loads((bundle_dir / PREPROCESS).read_text()), PREPROCESS)
    except (ValueError, OSError) as e:  # ConfigError and JSONDecodeError are ValueErrors
        raise BundleError(f"bundle {bundle_dir}: cannot read {PREPROCESS}: {e}") from e

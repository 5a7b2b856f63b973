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

from cirflow.core.config import from_dict
from cirflow.core.files import CURRENT, check_files, follow_current, publish_current
from cirflow.models.preprocess import PreprocessConfig

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

"""What a workdir keeps of the model bundles that training exported: the `keep` newest, the CURRENT one, and
every bundle that a kept index version of any catalog was built from (the service may serve it, an operator may
roll back to it). A bundle pruned takes its embedding snapshots and encoded queries with it: nothing can search
them without it.

    WORKDIR/bundles/<run_id>/                     deleted with the bundle
    WORKDIR/embeddings/<catalog>/<bundle_id>/     deleted when no kept bundle has that bundle_id
    WORKDIR/queries/<bundle_id>/                  likewise
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from cirflow.core.files import follow_current
from cirflow.export.manifest import MANIFEST, BundleError, read_manifest
from cirflow.indexing.search import index_store

log = logging.getLogger(__name__)


def prune_bundles(workdir: Path, keep: int) -> list[str]:
    """Delete the bundles beyond the rule above; returns the deleted bundle directories' names."""
    if keep < 1:
        raise ValueError(f"keep_bundles={keep}: keep at least 1 bundle")
    bundles = Path(workdir) / "bundles"
    if not bundles.is_dir():
        return []
    ids = {}
    for path in bundles.iterdir():
        if path.is_dir() and (path / MANIFEST).is_file():
            try:
                ids[path] = read_manifest(path)["bundle_id"]
            except (BundleError, KeyError) as e:
                log.warning("bundle retention: %s is not a readable bundle (%s); left alone", path, e)
    current = follow_current(bundles, BundleError)
    newest = sorted(ids, key=lambda p: p.stat().st_mtime_ns, reverse=True)[:keep]
    needed = _indexed_bundle_ids(Path(workdir) / "indexes")
    doomed = [p for p in ids if p not in newest and p != current and ids[p] not in needed]
    for path in doomed:
        shutil.rmtree(path)
    kept_ids = {ids[p] for p in ids if p not in doomed}
    for bundle_id in {ids[p] for p in doomed} - kept_ids:
        for leftover in [*Path(workdir).glob(f"embeddings/*/{bundle_id}"), Path(workdir) / "queries" / bundle_id]:
            if leftover.is_dir():
                shutil.rmtree(leftover)
    if doomed:
        log.info("bundle retention (keep=%d): removed %s", keep, sorted(p.name for p in doomed))
    return sorted(p.name for p in doomed)


def _indexed_bundle_ids(indexes: Path) -> set[str]:
    """bundle_ids of every index version on disk, published or kept for rollback."""
    out = set()
    for manifest in indexes.glob(f"*/*/{index_store.MANIFEST}"):
        try:
            out.add(index_store.read_manifest(manifest.parent)["bundle_id"])
        except (index_store.IndexFormatError, KeyError):
            continue
    return out

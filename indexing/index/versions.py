"""Published index versions of a catalog: publishing, the history, rollback and pruning.

    indexes/<catalog>/<index_id>/    immutable index directories (indexing/search/index_store.py)
    indexes/<catalog>/CURRENT        the published index_id; moved by an atomic rename
    indexes/<catalog>/published.json every publication and rollback, oldest first (index_id, when, action)
    indexes/<catalog>/published.lock held by whoever changes the two above (empty; never removed)

A searcher resolves CURRENT once and loads that directory, which nobody modifies: a reload sees the old version
or the new one, whole, never a mix. Publishing moves CURRENT first, then records it; where a crash came in
between, CURRENT wins (`versions` lists it as the newest). Pruning keeps the `keep` most recently published
versions (CURRENT always, and at least the one before it, so a searcher still loading the previous version
finds it) and deletes the other versions that were ever published. Builds never published (`--no-publish`, or
refused by the catalog flow's validation) are left for inspection: they are content-addressed, so a rerun with
the same inputs finds them instead of building again.

Publishers of one catalog may run at once (the flows' deployments have a concurrency limit of one, but an
operator's `cirflow index build` or `rollback` does not): every change (publish, rollback, prune) holds an
exclusive lock, `flock` on indexes/<catalog>/published.lock, from reading CURRENT and the history to the
renames of both, so none loses another's history entry or moves CURRENT past another's record. The lock is held
between processes on a local filesystem; on NFS, Linux clients (since 2.6.12) emulate flock with the server's
byte-range locks, which hold across hosts only where the server supports locking (NFSv4, or NLM for v3):
elsewhere, publish a catalog from one host. Readers (`versions`, `held`, searchers following CURRENT) take no
lock: each file is replaced by a rename, so they read a whole old or new one.

A rollback is an operator's decision that scheduled runs must respect: its history entry records what the
version rolled back from was built from (embedding snapshot and bundle_id), and `held` tells a scheduled run
that its candidate is built from such a pair, so the catalog flow publishes nothing until a newer snapshot or
bundle comes (or an operator publishes by hand, which lifts every hold). `versions` shows the hold.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cirflow.core.files import CURRENT, follow_current, publish_current, read_json, write_json_atomic
from cirflow.indexing.search import index_store as store

log = logging.getLogger(__name__)

HISTORY = "published.json"
LOCK = "published.lock"  # beside HISTORY; a file, not a directory: nothing takes it for a version
MIN_KEEP = 2


class VersionError(ValueError):
    """No such version to publish or roll back to; the message lists the ones there are."""


def publish(index_dir: Path, keep: int = 5, action: str = "publish", **record: Any) -> Path:
    """Make `index_dir` its catalog's CURRENT index, record it (with `record`'s items), prune beyond `keep`;
    returns the pointer file."""
    index_dir = Path(index_dir)
    if keep < 1:
        raise VersionError(f"keep={keep}: keep at least 1 published version")
    store.verify_index(index_dir, checksums=False)
    with _locked(index_dir.parent):
        if not (index_dir / store.MANIFEST).is_file():  # pruned by another publisher while we waited
            raise VersionError(f"{index_dir}: deleted by another publisher's pruning before it could be published")
        return _publish(index_dir, keep, action, record)


def _publish(index_dir: Path, keep: int, action: str, record: dict[str, Any]) -> Path:
    """`publish` with the catalog's lock held."""
    catalog_dir = index_dir.parent
    if action == "publish" and follow_current(catalog_dir, store.IndexFormatError) == index_dir:
        log.info("%s: %s is CURRENT already", catalog_dir, index_dir.name)  # a rerun with nothing new
        return catalog_dir / CURRENT
    pointer = publish_current(index_dir)
    history = _read_history(catalog_dir)
    history.append({"index_id": index_dir.name, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "action": action, **record})
    write_json_atomic(catalog_dir / HISTORY, {"versions": history}, sort_keys=True)
    log.info("%s: %s is CURRENT (%s)", catalog_dir, index_dir.name, action)
    _prune(catalog_dir, keep)
    return pointer


def versions(catalog_dir: Path) -> list[dict[str, Any]]:
    """The published versions, newest first, one row per index_id (its latest publication), each with
    `current` and `exists`."""
    catalog_dir = Path(catalog_dir)
    current = follow_current(catalog_dir, store.IndexFormatError)
    rows: dict[str, dict[str, Any]] = {}
    for entry in reversed(_read_history(catalog_dir)):
        rows.setdefault(entry["index_id"], dict(entry))
    if current is not None and current.name not in rows:  # a crash between the rename and the record
        rows = {current.name: {"index_id": current.name, "at": None, "action": "publish"}, **rows}
    if current is not None:  # CURRENT first even when an older record names it again
        rows = {current.name: rows[current.name], **rows}
    holds = _holds(catalog_dir)
    return [{**row, "current": current is not None and name == current.name,
             "exists": (catalog_dir / name / store.MANIFEST).is_file(),
             "held": bool(holds) and current is not None and name == current.name}
            for name, row in rows.items()]


def rollback(catalog_dir: Path, to: str | None = None, keep: int = 5) -> Path:
    """Publish an earlier version again: `to` (an index_id), or the newest published one before CURRENT whose
    directory is intact. Returns the index directory now CURRENT."""
    catalog_dir = Path(catalog_dir)
    with _locked(catalog_dir):  # the choice of version and the hold it records see the CURRENT it replaces
        return _rollback(catalog_dir, to, keep)


def _rollback(catalog_dir: Path, to: str | None, keep: int) -> Path:
    known = versions(catalog_dir)
    if to is None:
        earlier = [v for v in known if not v["current"] and v["exists"]]
        if not earlier:
            raise VersionError(f"{catalog_dir}: no earlier published version to roll back to (published: "
                               f"{[v['index_id'] for v in known]})")
        to = earlier[0]["index_id"]
    target = catalog_dir / to
    if "/" in to or to.startswith(".") or not (target / store.MANIFEST).is_file():
        raise VersionError(f"{catalog_dir}: no index version {to!r}; published versions still on disk: "
                           f"{[v['index_id'] for v in known if v['exists']]}")
    store.verify_index(target)  # full checksums: a rollback must not publish a damaged directory
    current = follow_current(catalog_dir, store.IndexFormatError)
    record: dict[str, Any] = {}
    if current is not None and current != target and (current / store.MANIFEST).is_file():
        record = {"from": current.name, "holds": built_from(store.read_manifest(current))}
    _publish(target, max(keep, MIN_KEEP), "rollback", record)
    return target


def built_from(manifest: dict[str, Any]) -> dict[str, str]:
    """What an index version was made of, as a rollback holds it: its embedding snapshot and bundle_id."""
    return {"snapshot": Path(manifest.get("embeddings", {}).get("snapshot_dir", "")).name,
            "bundle_id": manifest["bundle_id"]}


def held(catalog_dir: Path, snapshot: str, bundle_id: str) -> dict[str, Any] | None:
    """The rollback (its history entry) that forbids a scheduled run to publish an index of this snapshot and
    bundle, or None. Rollbacks hold from their entry until the next publication."""
    wanted = {"snapshot": snapshot, "bundle_id": bundle_id}
    return next((entry for entry in _holds(Path(catalog_dir)) if entry["holds"] == wanted), None)


def _holds(catalog_dir: Path) -> list[dict[str, Any]]:
    """The rollback entries since the last publication, newest first."""
    out = []
    for entry in reversed(_read_history(catalog_dir)):
        if entry.get("action") != "rollback":
            break
        if isinstance(entry.get("holds"), dict):
            out.append(entry)
    return out


def prune(catalog_dir: Path, keep: int) -> list[str]:
    """Delete the published versions beyond the `keep` (at least 2) newest; returns the deleted index_ids."""
    catalog_dir = Path(catalog_dir)
    with _locked(catalog_dir):  # not a version that a publisher is making CURRENT meanwhile
        return _prune(catalog_dir, keep)


def _prune(catalog_dir: Path, keep: int) -> list[str]:
    deleted = []
    for row in versions(catalog_dir)[max(keep, MIN_KEEP):]:
        if row["exists"]:
            shutil.rmtree(catalog_dir / row["index_id"])
            deleted.append(row["index_id"])
    if deleted:
        log.info("%s: removed index versions %s (keep=%d)", catalog_dir, deleted, keep)
    return deleted


@contextlib.contextmanager
def _locked(catalog_dir: Path) -> Iterator[None]:
    """Hold the catalog's exclusive lock (module docstring); released when the block ends or the process dies.
    Not re-entrant: a function that holds it calls the `_` variants, which expect it held."""
    if not catalog_dir.is_dir():
        raise VersionError(f"{catalog_dir}: no such catalog directory (WORKDIR/indexes/<catalog>)")
    with open(catalog_dir / LOCK, "a") as f:  # the file is never removed: a new one would be another lock
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_history(catalog_dir: Path) -> list[dict[str, Any]]:
    path = catalog_dir / HISTORY
    if not path.is_file():
        return []
    data = read_json(path, store.IndexFormatError)
    if not isinstance(data, dict) or not isinstance(data.get("versions"), list):
        raise store.IndexFormatError(f"{path}: expected {{\"versions\": [...]}}")
    return data["versions"]

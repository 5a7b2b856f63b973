"""Files that are either absent or whole: atomic writes, checksums, manifest checks, JSON reading.

Every result file of every stage is written here: under a temp name beside the target, flushed to disk, then
renamed over it, so a reader or a resumed job never sees a half-written file, even after a power loss.
Directories (bundles, indexes) are assembled in a temp directory beside their place and published whole by
`publish_dir`, which flushes their files before the rename and, for content-addressed versions, keeps a twin
that another process published first.

A location given as a URI (`s3://bucket/x`, `file:///x`, any fsspec protocol whose package is installed) is a
UPath (universal_pathlib: pathlib's API over fsspec); `location` makes one, and the functions here that a
remote location can reach (the embedding job's files) accept both. A remote file is written whole to a local
temp file, uploaded under a temp name beside its place, then moved there: object stores publish an object
whole, so readers see the old file or the new one. `location` opens the URI's filesystem at once: a server that
cannot be reached (`ftp://` to a host that refuses) is a LocationError naming the URI, not a socket traceback
from the first file operation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

if TYPE_CHECKING:  # universal_pathlib is imported only when a URI is given (not every machine that runs us has it)
    from upath import UPath

    Location = Path | UPath  # a local path, or a URI's UPath


# A temp directory of another host (or of a name without one) untouched this long is taken for abandoned: no
# build takes a week, and its directory's time moves with each file it adds.
ABANDONED_AFTER_S = 7 * 24 * 3600


class FileFormatError(ValueError):
    """A file cannot be read or is not what it should be; the message names the file."""


class LocationError(ValueError):
    """A URI's filesystem cannot be reached (refused, unknown host, login failed); the message names the URI."""


def temp_path_beside(path: Path) -> Path:
    """A hidden name next to `path` (same filesystem, so a rename can publish it), unique per call. It names the
    process and its host (`.NAME.tmp-PID@HOST-TOKEN`), so that a sweep of temp directories left by killed
    processes judges only its own host's (a pid says nothing about a process on another node of the cluster that
    shares the storage)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}@{_host()}-{secrets.token_hex(4)}")


def _host() -> str:
    """This machine's name as a temp name holds it: only letters, digits, dots and dashes, at most 63 of them."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:63] or "host"


def location(path: str | Location) -> Location:
    """A local Path, or for a URI (`scheme://...`) the UPath that reaches it through fsspec, its filesystem
    opened: LocationError where it cannot be reached."""
    if isinstance(path, Path) or hasattr(path, "fs"):  # a Path, or already a UPath
        return path
    if "://" not in str(path):
        return Path(path)
    from upath import UPath

    uri = UPath(path)  # an unknown scheme: ValueError "Unsupported filesystem"; a missing package: ImportError
    try:
        uri.fs  # noqa: B018 -- fsspec connects here (ftp, sftp, smb) and caches the instance for later calls
    except (ValueError, ImportError):
        raise
    except Exception as e:  # OSError from a socket, ftplib.error_perm, ...: whatever the protocol's client raises
        raise LocationError(f"{path}: its {uri.protocol} filesystem cannot be reached "
                            f"({type(e).__name__}: {' '.join(str(e).split())})") from e  # a server's reply: one line
    return uri


def write_atomic(path: Location, write: Callable[[Path], None]) -> Location:
    """Run `write(tmp)` to fill a temp file beside `path`, fsync it, rename it to `path` and fsync the directory
    (a remote `path`: `write` fills a local temp file, which is uploaded and moved into place).

    A failure leaves `path` as it was and removes the temp file.
    """
    path = location(path)
    if not isinstance(path, Path):
        return _write_remote(path, write)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the rename must not publish bytes still in flight
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def _write_remote(path: UPath, write: Callable[[Path], None]) -> UPath:
    import tempfile

    with tempfile.TemporaryDirectory() as local:
        tmp = Path(local) / path.name
        write(tmp)
        remote_tmp = temp_path_beside(path)
        path.fs.makedirs(path.parent.path, exist_ok=True)
        try:
            path.fs.put_file(str(tmp), remote_tmp.path)
            path.fs.mv(remote_tmp.path, path.path)
        finally:
            if path.fs.exists(remote_tmp.path):
                path.fs.rm(remote_tmp.path)
    return path


def remove_tree(path: Location) -> None:
    """Delete a directory and everything in it, local or remote."""
    import shutil

    if isinstance(path, Path):
        shutil.rmtree(path)
    else:
        path.fs.rm(path.path, recursive=True)


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, data: Any, sort_keys: bool = False) -> Path:
    """Indented JSON with a trailing newline; `sort_keys` where the same content must give the same bytes."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys, default=_numpy_scalar) + "\n")


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (POSIX; a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def temp_dir_beside(final: Path) -> Iterator[Path]:
    """A fresh hidden directory next to `final` for assembling a directory that is then renamed into place;
    removed on exit (after a successful rename there is nothing left to remove). Temp directories beside it left
    by processes that were killed, for any target, are removed first: versions are content-addressed, so a killed
    build's target may never be built again, and nothing else would ever find them (_abandoned says which)."""
    import shutil

    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(".*.tmp-*"):
        if _abandoned(stale, final.name):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_path_beside(final)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# temp_path_beside's names: .NAME.tmp-PID@HOST-TOKEN
_TEMP_NAME = re.compile(r"\..+\.tmp-(?P<pid>[0-9]+)@(?P<host>[A-Za-z0-9._-]+)-[0-9a-f]{8}")


def _abandoned(path: Path, final_name: str) -> bool:
    """Whether `path`, a temp directory beside `final_name`'s place, was left by a process that is gone: one of
    this host whose pid names no process, or anyone's (another host's, on storage a cluster shares) untouched for
    ABANDONED_AFTER_S. Besides temp_path_beside's names, only `final_name`'s own in the older form without a host
    (.NAME.tmp-PID-TOKEN) is judged, by its age: whatever else is hidden there is not ours to remove."""
    if path.is_symlink() or not path.is_dir():
        return False
    found = _TEMP_NAME.fullmatch(path.name)
    if found is None and not path.name.startswith(f".{final_name}.tmp-"):
        return False
    if found is not None and found["host"] == _host() and int(found["pid"]) != os.getpid():
        if not _process_alive(int(found["pid"])):
            return True
    try:
        return time.time() - path.stat().st_mtime > ABANDONED_AFTER_S
    except OSError:  # removed meanwhile by its owner or another sweep
        return False


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: an existence check, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def publish_dir(tmp: Path, final: Path, twin_ok: Callable[[Path], bool] | None = None, flush: bool = True) -> bool:
    """Rename a fully written directory (from temp_dir_beside) to `final`, atomically, after flushing its files
    to disk, then make the rename durable; True when it did. An empty directory at `final` is replaced.

    When `final` already holds a directory that is not empty, another process published first and the rename
    fails: without `twin_ok` the OSError is raised; with it, `twin_ok(final)` decides whether that copy will do
    (a content-addressed version made from the same inputs: it checks the copy, and may raise if it is damaged),
    and on True publish_dir returns False, leaving `tmp` for the caller's temp_dir_beside to remove.

    `flush=False` skips the files' fsync, for data that is cheap to regenerate and made of so many files (a
    generated dataset's images) that flushing each would cost more than it protects."""
    if flush:
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
    try:
        os.rename(tmp, final)
    except OSError:
        if twin_ok is None or not twin_ok(Path(final)):
            raise
        return False
    fsync_dir(Path(final).parent)
    return True


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link `source` as `target` (no second copy of an immutable file), else copy it with its times and
    mode (another filesystem, or one without hard links)."""
    import shutil

    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _numpy_scalar(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: Location) -> str:
    digest = hashlib.sha256()
    with location(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """name -> {"sha256", "bytes"} for files inside `directory`, sorted by name."""
    return {name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
            for name in sorted(names)}


def check_files(directory: Location, files: dict[str, dict[str, Any]], checksums: bool = True) -> str | None:
    """The first listed file that is missing or differs from its recorded size (or sha256), described in a
    phrase naming the file; None when all match. Bundles, engines, embedding snapshots and indexes share this check."""
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


def read_json(path: Location, error: type[Exception] = FileFormatError) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file raises `error` (the caller's own type)
    with a message naming the file and, for bad JSON, the line and column."""
    try:
        text = location(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise error(f"{path}: cannot read the file ({reason})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


CURRENT = "CURRENT"  # in a directory of versions (bundles, indexes of a catalog): the name of the published one


def publish_current(version_dir: Location) -> Location:
    """Point `version_dir`'s parent's CURRENT at it. The pointer is replaced by a rename, so a reader sees the
    old name or the new one, whole; the versions themselves are never modified."""
    version_dir = location(version_dir)
    return write_text_atomic(version_dir.parent / CURRENT, version_dir.name + "\n")


def follow_current(path: Location, error: type[Exception] = FileFormatError) -> Location | None:
    """The version directory that `path`/CURRENT names, or None when `path` has no CURRENT file."""
    pointer = location(path) / CURRENT
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{pointer}: cannot read the pointer ({e})") from e
    if not name or "/" in name or name.startswith("."):
        raise error(f"{pointer}: {name!r} is not a directory name")
    return pointer.parent / name

"""cirflow.core.files: atomic writes, checksums, manifest checks, JSON reading, CURRENT pointers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cirflow.core.files import (
    ABANDONED_AFTER_S,
    CURRENT,
    FileFormatError,
    LocationError,
    check_files,
    describe_files,
    follow_current,
    link_or_copy,
    location,
    publish_current,
    publish_dir,
    read_json,
    sha256_file,
    temp_dir_beside,
    temp_path_beside,
    write_atomic,
    write_json_atomic,
)


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    write_json_atomic(target, {"v": 1})

    def half_write(tmp: Path) -> None:
        tmp.write_text('{"v": ')  # a writer that dies midway
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_write)
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_write_creates_parents_and_replaces_whole(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.json"
    write_json_atomic(target, {"b": 2, "a": 1}, sort_keys=True)
    assert target.read_text() == '{\n  "a": 1,\n  "b": 2\n}\n'


def test_checksums_and_manifest_checks_name_the_file(tmp_path: Path) -> None:
    for name, data in (("one.bin", b"1" * 10), ("two.bin", b"2" * 20)):
        (tmp_path / name).write_bytes(data)
    assert sha256_file(tmp_path / "one.bin") == hashlib.sha256(b"1" * 10).hexdigest()
    files = describe_files(tmp_path, ["two.bin", "one.bin"])
    assert list(files) == ["one.bin", "two.bin"] and files["two.bin"]["bytes"] == 20
    assert check_files(tmp_path, files) is None
    (tmp_path / "two.bin").write_bytes(b"3" * 20)  # same size, other bytes
    assert check_files(tmp_path, files, checksums=False) is None
    assert "two.bin does not match its sha256" in check_files(tmp_path, files)
    (tmp_path / "one.bin").write_bytes(b"1")
    assert "one.bin has 1 bytes, the manifest records 10" in check_files(tmp_path, files)
    (tmp_path / "one.bin").unlink()
    assert "one.bin listed in the manifest is missing" in check_files(tmp_path, files)


class StageError(ValueError):
    pass


@pytest.mark.parametrize("content, expected", [(None, "cannot read"), ('{"a": ', "invalid JSON at line 1"),
                                               (b"\xff\xfe", "cannot read")])
def test_read_json_raises_the_callers_error_naming_the_file(tmp_path: Path, content: str | bytes | None,
                                                            expected: str) -> None:
    path = tmp_path / "m.json"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(StageError, match=expected) as info:
        read_json(path, StageError)
    assert str(path) in str(info.value)
    with pytest.raises(FileFormatError):
        read_json(path)


def test_temp_dir_is_removed_and_lies_beside_the_target(tmp_path: Path) -> None:
    final = tmp_path / "versions" / "v1"
    with temp_dir_beside(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".v1.tmp-")
        (tmp / "f").write_text("x")
    assert not tmp.exists()


def test_current_pointer_round_trip_and_bad_names(tmp_path: Path) -> None:
    assert follow_current(tmp_path) is None
    (tmp_path / "v1").mkdir()
    assert publish_current(tmp_path / "v1") == tmp_path / CURRENT
    assert follow_current(tmp_path) == tmp_path / "v1"
    (tmp_path / CURRENT).write_text("../elsewhere\n")
    with pytest.raises(StageError, match="not a directory name"):
        follow_current(tmp_path, StageError)
    (tmp_path / CURRENT).write_bytes(b"\xff\xfe")
    with pytest.raises(StageError, match="cannot read the pointer"):
        follow_current(tmp_path, StageError)


def test_publish_dir_moves_a_whole_directory_and_never_over_another(tmp_path: Path) -> None:
    final = tmp_path / "v1"
    with temp_dir_beside(final) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f").write_text("x")
        publish_dir(tmp, final)
    assert (final / "sub" / "f").read_text() == "x"
    with temp_dir_beside(final) as tmp:
        (tmp / "g").write_text("y")
        with pytest.raises(OSError):  # another process published first: theirs stays
            publish_dir(tmp, final)
    assert sorted(p.name for p in final.iterdir()) == ["sub"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]


def test_publish_dir_keeps_a_twin_that_the_caller_accepts(tmp_path: Path) -> None:
    final = tmp_path / "v1"
    final.mkdir()
    (final / "done").write_text("theirs")  # another process published the same version first
    looked: list[Path] = []

    def twin_ok(path: Path) -> bool:
        looked.append(path)
        return (path / "done").is_file()

    with temp_dir_beside(final) as tmp:
        (tmp / "done").write_text("ours")
        assert publish_dir(tmp, final, twin_ok=twin_ok) is False
    assert looked == [final] and (final / "done").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]
    (final / "done").unlink()
    (final / "partial").write_text("")  # not a whole twin: refused, the rename's error raised
    with temp_dir_beside(final) as tmp:
        (tmp / "done").write_text("ours")
        with pytest.raises(OSError):
            publish_dir(tmp, final, twin_ok=twin_ok)
    with temp_dir_beside(tmp_path / "v2") as tmp:
        assert publish_dir(tmp, tmp_path / "v2", twin_ok=twin_ok) is True
    assert looked == [final, final]


def test_temp_dirs_of_killed_processes_are_swept(tmp_path: Path) -> None:
    """Any target's: a content-addressed version a killed build was making may never be built again."""
    import os
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names no process now
    host = temp_path_beside(tmp_path / "v1").name.split("@", 1)[1].rsplit("-", 1)[0]
    left = tmp_path / f".v1.tmp-{dead.pid}@{host}-0000abcd"
    ours = tmp_path / f".v1.tmp-{os.getpid()}@{host}-1111abcd"
    other = tmp_path / f".v2.tmp-{dead.pid}@{host}-2222abcd"  # another version's, never to be built again
    alive = tmp_path / f".v3.tmp-{os.getppid()}@{host}-3333abcd"  # a live process's, building now
    foreign = tmp_path / f".notes.tmp-{dead.pid}-4444"  # hidden, not a name of ours: not ours to remove
    as_file = tmp_path / f".v4.tmp-{dead.pid}@{host}-5555abcd"  # a file: write_atomic's, not a directory
    for d in (left, ours, other, alive, foreign):
        d.mkdir()
    as_file.write_text("")
    with temp_dir_beside(tmp_path / "v1") as tmp:
        assert tmp.name.startswith(f".v1.tmp-{os.getpid()}@{host}-")
    assert not left.exists() and not other.exists()
    assert ours.exists() and alive.exists() and foreign.exists() and as_file.exists()


def test_another_hosts_temp_dirs_are_swept_only_once_abandoned(tmp_path: Path) -> None:
    """On storage a cluster shares, a pid of another node says nothing here: its build may be writing now. Its
    temp directory (and one named the old way, without a host) is removed only once untouched for a week."""
    import os
    import subprocess
    import time

    dead = subprocess.Popen(["true"])
    dead.wait()
    busy = tmp_path / f".v1.tmp-{dead.pid}@worker-7.cluster.local-0000abcd"  # no such pid here; alive there
    gone = tmp_path / f".v1.tmp-{dead.pid}@worker-8-1111abcd"
    unnamed = tmp_path / f".v1.tmp-{dead.pid}-2222"  # an older cirflow's name: whose host is unknown
    for d in (busy, gone, unnamed):
        d.mkdir()
    week_ago = time.time() - ABANDONED_AFTER_S - 60
    os.utime(gone, (week_ago, week_ago))
    with temp_dir_beside(tmp_path / "v1"):
        pass
    assert busy.exists() and unnamed.exists() and not gone.exists()
    os.utime(unnamed, (week_ago, week_ago))
    with temp_dir_beside(tmp_path / "v1"):
        pass
    assert busy.exists() and not unnamed.exists()


def test_a_crash_before_the_rename_leaves_a_temp_dir_that_the_rerun_sweeps(tmp_path: Path) -> None:
    import os
    import subprocess

    final = tmp_path / "v1"
    with pytest.raises(RuntimeError), temp_dir_beside(final) as tmp:  # a failure in this process: nothing stays
        (tmp / "half").write_text("")
        raise RuntimeError("failed while writing")
    assert list(tmp_path.iterdir()) == []
    killed = subprocess.Popen(["true"])
    killed.wait()
    # what a process of this host killed before its rename leaves
    left = final.with_name(temp_path_beside(final).name.replace(f"-{os.getpid()}@", f"-{killed.pid}@"))
    left.mkdir()
    (left / "half").write_text("")
    assert not final.exists()  # readers never see the half-written directory
    with temp_dir_beside(final) as tmp:
        (tmp / "whole").write_text("x")
        assert publish_dir(tmp, final, flush=False) is True  # regenerable data: published without the fsyncs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"] and os.listdir(final) == ["whole"]


def test_link_or_copy_links_and_copies_across_filesystems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    source = tmp_path / "base.faiss"
    source.write_bytes(b"immutable")
    os.utime(source, (1_000_000, 1_000_000))
    link_or_copy(source, tmp_path / "linked")
    assert (tmp_path / "linked").stat().st_ino == source.stat().st_ino

    def cross_device(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    link_or_copy(source, tmp_path / "copied")
    copied = (tmp_path / "copied").stat()
    assert copied.st_ino != source.stat().st_ino and (tmp_path / "copied").read_bytes() == b"immutable"
    assert copied.st_mtime == 1_000_000  # a copy as close to a link as it gets: the same times


def test_a_uri_whose_filesystem_cannot_be_reached_is_a_location_error_naming_it() -> None:
    import socket

    with socket.socket() as closed:  # bound but not listening: a connection to it is refused at once
        closed.bind(("127.0.0.1", 0))
        uri = f"ftp://127.0.0.1:{closed.getsockname()[1]}/workdir"
        with pytest.raises(LocationError) as info:
            location(uri)
    # A ValueError (the CLI's one line, the embedding job's "workdir=... cannot be used"), not a socket traceback.
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"{uri}: its ftp filesystem cannot be reached (ConnectionRefusedError: ")
    assert "\n" not in str(info.value)


def test_a_local_path_or_a_reachable_uri_is_a_location() -> None:
    assert location("a/b") == Path("a/b")
    memory = location("memory://cirflow-location-test/x")
    assert not isinstance(memory, Path) and memory.path.endswith("cirflow-location-test/x")

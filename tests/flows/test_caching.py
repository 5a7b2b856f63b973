"""cirflow.flows.caching: a cached task's key names its inputs and where its output is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from cirflow.flows.caching import cache_key


def test_two_locations_never_share_a_key(tmp_path: Path) -> None:
    key = cache_key(tmp_path / "wd" / "bundles" / "run", "sha", {"k": 1})
    assert key == cache_key(str(tmp_path / "wd" / "bundles" / "run"), "sha", {"k": 1})  # a Path or its string
    assert key != cache_key(tmp_path / "wd2" / "bundles" / "run", "sha", {"k": 1})
    assert key != cache_key(tmp_path / "wd" / "bundles" / "run", "sha", {"k": 2})


def test_a_relative_location_is_keyed_where_it_lies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    here = cache_key("workdir", "inputs")
    assert here == cache_key(tmp_path / "workdir", "inputs")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cache_key("workdir", "inputs") != here  # another working directory: another workdir

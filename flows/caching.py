"""Content keys for the flows' cached tasks, and the guard that recomputes a cached result whose files are gone.

A task's cache key (`cache_key`) is made from what its output depends on (a config hash, a data fingerprint, a
checkpoint's sha256, a bundle id, a catalog snapshot id) and where the output is written, never from time or run
ids, so a rerun with unchanged inputs finds every expensive result in Prefect's cache, and two work directories
sharing one result store never hand each other a result that names the other's files. Prefect cannot know that
a cached result names files somebody deleted since: `cached` checks the result and reruns the task with a fresh
cache entry when they are gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

from prefect import Task

log = logging.getLogger(__name__)


def content_key(*parts: Any) -> str:
    """A stable hash of JSON-able parts (dataclass configs go through core.config.to_dict first)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_key(output: str | Path, *inputs: Any) -> str:
    """The `key` parameter of a cached task: where its output is written (its file or directory, or the root
    it goes under) and the inputs that identify that output (by_key adds the task's name: what it makes). The
    location is made absolute: "workdir" names another directory from another working directory."""
    return content_key(str(Path(output).absolute()), *inputs)


def by_key(context: Any, parameters: dict[str, Any]) -> str:
    """cache_key_fn of the cached tasks: the task's name and its explicit `key` parameter (cache_key)."""
    return f"{context.task.name}:{parameters['key']}"


def cached(task: Task, valid: Callable[[Any], bool], **parameters: Any) -> Any:
    """Call `task` (cached on its `key` parameter); if the cached result fails `valid` (its files were
    deleted or changed), run it again and overwrite the cache entry."""
    result = task(**parameters)
    if valid(result):
        return result
    log.warning("%s: the cached result %s no longer checks out; running the task again", task.name, result)
    return task.with_options(refresh_cache=True)(**parameters)

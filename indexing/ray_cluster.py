"""The check that a job submitted with `ray job submit --working-dir` names no path inside Ray's copy of that dir.
(Joining a cluster or starting a local instance bound to loopback: cirflow.core.ray_local, which training
shares.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

# Ray's job supervisor gives a submitted job's entrypoint its job config (runtime_env included) in this
# variable, and starts it in the unpacked working_dir (dashboard/modules/job/job_supervisor.py).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class RayJobPathError(ValueError):
    """A relative path in a job submitted with a working_dir: it would resolve inside Ray's temporary copy."""


def submitted_working_dir() -> str | None:
    """The working_dir of the Ray job whose entrypoint this process is; None outside a job or without one."""
    job_config = os.environ.get(JOB_CONFIG_ENV)
    if not job_config:
        return None
    return (json.loads(job_config).get("runtime_env") or {}).get("working_dir") or None


def check_job_paths(paths: Mapping[str, str | None]) -> None:
    """Refuse relative local paths (config key -> path; None: not set) in a job submitted with a working_dir.

    Such a job runs in Ray's temporary copy of the working dir, which lacks every file .gitignore matches and
    is deleted with the job: a relative input is not found there, and a relative output "succeeds" into it.
    The submitter's directory is not known here, so the path cannot be resolved for them.
    """
    working_dir = submitted_working_dir()
    if working_dir is None:
        return
    for key, value in paths.items():
        if value and not Path(value).is_absolute():
            raise RayJobPathError(
                f"{key}={value!r} is a relative path, and this Ray job runs in Ray's temporary copy of its "
                f"working_dir ({working_dir}): it would resolve to {os.path.abspath(value)}, which lacks the "
                "files .gitignore excludes and is deleted with the job. Pass an absolute path, e.g. "
                f"{key}=$PWD/{value} on the `ray job submit` command line")

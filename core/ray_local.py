"""Where a Ray job runs: a new local instance bound to loopback, or a running cluster; and the check that a job
submitted with `ray job submit --working-dir` names no path inside Ray's copy of that dir. Shared by every stage
that uses Ray (training's distributed path, the embedding job); `ray` is imported only when a function is called.

Loopback: a Ray node binds its servers (GCS, raylet, workers, agents, dashboard, metrics) to 127.0.0.1 only
when its node IP is 127.0.0.1, and Ray replaces 127.0.0.1 by the machine's outward address (even when given as
`ray start --node-ip-address` or `ray.init(_node_ip_address=...)`) unless it runs in single-machine mode, its
default on macOS and Windows: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read by every Ray process when it imports
ray. A driver joining a node bound to loopback needs the mode too, or it dials the outward address.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from urllib.parse import urlsplit

SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray's job supervisor gives a submitted job's entrypoint its job config (runtime_env included) in this
# variable, and starts it in the unpacked working_dir (dashboard/modules/job/job_supervisor.py).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def connect_ray(address: str | None, num_cpus: int | None, **local_kwargs: object) -> bool:
    """Join the cluster at `address` (None: RAY_ADDRESS, which `ray job submit` sets for its jobs), or, with
    neither, start a new Ray instance on this machine with `num_cpus` CPUs (None: all), bound to 127.0.0.1
    (`local_kwargs`: more ray.init arguments for it, as in start_local_ray).

    Returns True when this call connected; the caller then ends with ray.shutdown(), which stops an instance
    it started and only disconnects from a cluster it joined. False: the process was connected already.
    """
    import ray

    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        with _single_machine_mode() if is_loopback(target) else nullcontext():
            ray.init(address=address)
    else:
        start_local_ray(num_cpus, **local_kwargs)
    return True


def start_local_ray(num_cpus: int | None, **init_kwargs: object) -> None:
    """A new Ray instance of this process on 127.0.0.1 only: "local" even when RAY_ADDRESS or a `ray start`
    left on this machine names another cluster, whose binding is not ours. Without a dashboard unless
    `init_kwargs` asks for one (include_dashboard=True): it takes ~2 s more to start."""
    import ray

    with _single_machine_mode():
        ray.init(**{"address": "local", "num_cpus": num_cpus, "include_dashboard": False, **init_kwargs})


@contextmanager
def _single_machine_mode() -> Iterator[None]:
    """Ray's single-machine mode while ray.init starts or joins a node bound to loopback (see the module doc)."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_ENV] = "0"  # for the processes ray.init starts: they read it when importing ray
    # This process read the variable when it imported ray. A private attribute of the pinned Ray 2.60:
    # tests/indexing/test_ray_cluster.py fails if a release moves or ignores it.
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = saved_env


def is_loopback(address: str) -> bool:
    """Whether a Ray address (host:port, [v6]:port, ray://host:port) names this machine's loopback."""
    host = urlsplit("//" + address.split("://", 1)[-1]).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "auto"
        return False


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
        if value and "://" not in value and not Path(value).is_absolute():  # a URI names no local path
            raise RayJobPathError(
                f"{key}={value!r} is a relative path, and this Ray job runs in Ray's temporary copy of its "
                f"working_dir ({working_dir}): it would resolve to {os.path.abspath(value)}, which lacks the "
                "files .gitignore excludes and is deleted with the job. Pass an absolute path, e.g. "
                f"{key}=$PWD/{value} on the `ray job submit` command line")

"""The search service as a Ray Serve deployment: the same FastAPI app (service.create_app), one per replica.

    serve run cirflow.indexing.service.ray_serve:app_builder index=/data/workdir/indexes/shop bundle=/data/workdir/bundles

or `serve deploy deploy/ray/serve-search.yaml` on a running cluster. A catalog whose CURRENT version is sharded
gets a deployment per shard and a front instead (service/ray_shards.py). Each replica builds its own app (its own
loaded version, thread pool and hot-reload watcher) when it starts, so nothing unpicklable travels from the
driver; every replica must see the index and bundle paths (shared storage). Ray Serve runs the app's lifespan
in the replica, and its health check fails a replica whose first load failed, so that Serve replaces it.
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from cirflow.core.config import from_dict
from cirflow.indexing.service.app import create_app
from cirflow.indexing.service.ray_shards import sharded_deployment, shards_of
from cirflow.indexing.service.security import read_api_key
from cirflow.indexing.service.state import ServiceConfig, ServiceError
from cirflow.models.images import ImageLimits


@serve.deployment(ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
@serve.ingress()
class SearchDeployment:
    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.search_app: FastAPI | None = None  # not `app`: the ingress wrapper has a property of that name

    def __serve_build_asgi_app__(self) -> FastAPI:
        self.search_app = create_app(self.config)
        return self.search_app

    def check_health(self) -> None:
        error = None if self.search_app is None else self.search_app.state.published.load_error
        if error is not None:
            raise RuntimeError(error)


def deployment(config: ServiceConfig, replicas: int = 1, cpus_per_replica: float = 1.0) -> Application:
    """The bound application; `serve.run(deployment(config), route_prefix="/")` serves it. A replica's request
    threads default to its CPUs, not the host's cores."""
    if replicas < 1 or cpus_per_replica <= 0:
        raise ServiceError(f"replicas must be >= 1 and cpus_per_replica > 0, got {replicas} and {cpus_per_replica}")
    if config.workers == 0:
        config = replace(config, workers=max(1, int(cpus_per_replica)))
    return SearchDeployment.options(num_replicas=replicas,
                                    ray_actor_options={"num_cpus": cpus_per_replica}).bind(config)


def app_builder(args: dict[str, Any]) -> Application:
    """For `serve run` / a Serve config file: `index` (required), `bundle`, `replicas`, `cpus_per_replica`,
    `api_key_file` (else CIRFLOW_API_KEY in the environment, else no key), `images` (a mapping of ImageLimits
    fields), and any other ServiceConfig field, as strings or numbers. A catalog whose CURRENT version is sharded
    is served by shard deployments and a front (service/ray_shards.py): `shard_replicas` (default 1) and
    `shard_timeout_s` (default 2) set them; `shards` must match the version's when given."""
    args = dict(args)
    if "index" not in args:
        raise ServiceError("the search deployment needs args.index: WORKDIR/indexes/<catalog> or one version")
    replicas = int(args.pop("replicas", 1))
    cpus = float(args.pop("cpus_per_replica", 1.0))
    shards = args.pop("shards", None)
    shard_replicas = int(args.pop("shard_replicas", 1))
    shard_timeout_s = float(args.pop("shard_timeout_s", 2.0))
    if "api_key" in args:  # a config file is no place for a secret
        raise ServiceError("give the search deployment's API key as args.api_key_file or in CIRFLOW_API_KEY, not "
                           "as args.api_key")
    key_file = args.pop("api_key_file", None)
    known = {f.name: f for f in fields(ServiceConfig)}
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ServiceError(f"unknown search deployment args {unknown}; known: {sorted(known)}")
    values: dict[str, Any] = {}
    for name, value in args.items():
        if name in ("index", "bundle"):
            values[name] = Path(value)
        elif name in ("providers", "verify"):
            values[name] = str(value)
        elif name == "reload_seconds":
            values[name] = float(value)
        elif name == "images":
            values[name] = from_dict(ImageLimits, value, "args.images")
        else:
            values[name] = int(value)
    values["api_key"] = read_api_key(None if key_file is None else Path(key_file), os.environ)
    config = ServiceConfig(**values)
    published_shards = shards_of(config.index)
    if shards is not None and int(shards) != published_shards:
        raise ServiceError(f"args.shards={shards}, but the version {config.index} serves has {published_shards}")
    if published_shards == 1:
        return deployment(config, replicas, cpus)
    return sharded_deployment(config, published_shards, shard_replicas, replicas, cpus, shard_timeout_s)

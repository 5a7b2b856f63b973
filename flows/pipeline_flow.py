"""The `pipeline` flow: `training`, then `catalog` with the bundle that training registered.

A new bundle has no embedding snapshot yet, so the catalog is embedded in full into the new bundle's directory;
an unchanged one (training served from cache, or the same bundle id) makes the catalog step an incremental
refresh. A bundle the quality gate refuses fails the run before any catalog work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow

from cirflow.core.config import load_config
from cirflow.flows.catalog_flow import CatalogFlowConfig, run_catalog
from cirflow.flows.training_flow import TrainingFlowConfig, run_training


@dataclass(frozen=True)
class PipelineFlowConfig:
    training: TrainingFlowConfig = field(default_factory=TrainingFlowConfig)
    catalog: CatalogFlowConfig = field(default_factory=CatalogFlowConfig)


@flow(name="pipeline", log_prints=True)
def pipeline(config: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(PipelineFlowConfig, Path(config) if config else None, list(overrides or ()))
    trained = run_training(cfg.training)
    return {"training": trained, "catalog": run_catalog(cfg.catalog, bundle=trained["bundle"])}

"""The training flow's quality gate: a new bundle is registered only if it is not worse than the current one.

Both bundles are evaluated by the same evaluator (ONNX Runtime, export/evaluate_bundle.py) on the same split;
the gate compares each configured metric of composed queries and refuses the new bundle when any of them drops
by more than the tolerance. No current bundle (a first deployment) passes; so does the current bundle itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from cirflow.core.config import check_fraction
from cirflow.models.report import format_table


@dataclass(frozen=True)
class GateConfig:
    split: str = "val"  # the dataset split both bundles are evaluated on (never the test splits: they stay unseen)
    metrics: tuple[str, ...] = ("R@1", "R@5", "R@10")  # composed-query metrics compared
    # Recall a new bundle may lose on any metric and still be registered: seeds and hardware move recall@1 by
    # about a point between equivalent runs of the built-in default.
    tolerance: float = 0.01

    def __post_init__(self) -> None:
        check_fraction(self, "tolerance")
        if not self.metrics:
            raise ValueError("gate.metrics is empty: name at least one metric, e.g. R@1")


class GateRefused(RuntimeError):
    """The new bundle is worse than the current one beyond the tolerance; the message has both rows."""


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    rows: dict[str, dict[str, float]]  # "new <id>" / "current <id>" -> metric -> value

    def table(self, title: str) -> str:
        return format_table(self.rows, title)


def decide(new: dict[str, float], current: dict[str, float] | None, config: GateConfig, new_id: str,
           current_id: str | None) -> GateDecision:
    """Compare the new bundle's metrics with the current one's (None: no current bundle)."""
    missing = [m for m in config.metrics if m not in new or (current is not None and m not in current)]
    if missing:
        raise ValueError(f"gate metrics {missing} are not among the evaluator's {sorted(new)}")
    rows = {f"new {new_id}": {m: new[m] for m in config.metrics}}
    if current is None or current_id is None:
        return GateDecision(True, "no current bundle: the first one is registered", rows)
    rows[f"current {current_id}"] = {m: current[m] for m in config.metrics}
    if current_id == new_id:
        return GateDecision(True, "the new bundle is the current one", rows)
    worse = {m: round(current[m] - new[m], 4) for m in config.metrics if new[m] < current[m] - config.tolerance}
    if worse:
        return GateDecision(False, f"worse than the current bundle beyond the tolerance {config.tolerance} on "
                                   f"{worse} (drop per metric)", rows)
    return GateDecision(True, f"not worse than the current bundle beyond the tolerance {config.tolerance}", rows)

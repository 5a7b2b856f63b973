"""The eval job's own config: range checks up front, and sheet_queries=0 for metrics without example sheets."""

from pathlib import Path

import pytest

from cirflow.models.eval_job import EvalJobConfig, run_eval
from cirflow.models.tiny import make_checkpoint


@pytest.mark.parametrize("field", ["sheet_queries", "seed"])
def test_negative_counts_are_rejected(field: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{field} must not be negative, got -1"):
        EvalJobConfig(tmp_path / "model.pt", tmp_path / "eval", **{field: -1})
    assert list(tmp_path.iterdir()) == []


def test_no_sheets_when_sheet_queries_is_0(tiny_shapes: Path, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "eval"
    results = run_eval(EvalJobConfig(checkpoint, out, "shapes", tiny_shapes, ("test",), sheet_queries=0))
    assert set(results) == {"shapes/test"}
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]

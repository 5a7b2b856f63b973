"""bench/artemis.py: its rows are valid training configs, and the report it writes from their results."""

from __future__ import annotations

import argparse
from pathlib import Path

from cirflow.core.config import load_config
from cirflow.models.train_config import TrainConfig
from tests.bench.scripts import load_bench_script

artemis = load_bench_script("artemis")


def test_every_row_is_a_valid_training_config_of_the_demo_model() -> None:
    for name, overrides in artemis.ROWS.items():
        config = load_config(TrainConfig, artemis.CONFIG, [*overrides, "optim.max_steps=400", "optim.max_minutes=0"])
        assert config.model.backbone.name == "tiny-minilm", name
        assert config.model.composer.name == ("artemis" if "artemis" in name else "combiner")
        assert config.method.name == ("cala" if name.startswith("cala") else "base")


def test_the_report_gives_each_ranking_the_gain_against_n_and_the_cost(tmp_path: Path) -> None:
    def metrics(r1: float) -> dict[str, float]:
        return {"R@1": r1, "R@10": r1 + 0.2, "Rsubset@1": r1 + 0.1}

    sweep = ["N=0 (fold only)", "N=10", "N=50", "N=100", "N=200", "exact"]
    reranked = {split: {n: metrics(0.5 + 0.01 * i) for i, n in enumerate(sweep)} for split in artemis.SPLITS}
    plain = {split: {"cosine": metrics(0.6)} for split in artemis.SPLITS}
    runs = {"combiner": [plain, plain], "cala-combiner": [plain, plain], "artemis": [reranked, reranked],
            "cala-artemis": [reranked, reranked]}
    timings = {name: {"p50": 1.0, "p99": 2.0} for name in ("encode", "encode with features", "re-rank N=10",
                                                           "re-rank N=50", "re-rank N=200")}
    args = argparse.Namespace(steps=400, seeds=[0, 1], quick=False)
    text = artemis.render(args, runs, {"run": "r", "queries": 300, "timings": timings}, "cmd")
    assert "| combiner | cosine | 0.600 ± 0.000 | 0.800 ± 0.000 | 0.700 ± 0.000 |" in text
    assert "| artemis | exact | 0.550 ± 0.000 |" in text
    assert "| cala-artemis | N=50 | +0.020 | +0.020 |" in text and "| artemis | N=100 | +0.030 | +0.030 |" in text
    assert "| re-rank N=200 | 1.000 | 2.000 |" in text and "adds +0.000 ms" in text

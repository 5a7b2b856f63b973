"""Training on the tiny shapes dataset: it learns, checkpoints rebuild the model, a killed run resumes exactly."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import cirflow.models.train_loop as train_loop
from cirflow.core.config import ConfigError, load_config
from cirflow.models.checkpoint import CheckpointError, load_checkpoint
from cirflow.models.cir_model import build_model
from cirflow.models.losses import LogitScale
from cirflow.models.methods.registry import build_method
from cirflow.models.train import train
from cirflow.models.train_config import TrainConfig
from cirflow.models.train_stages import build_stages, enter_stage


def config(overrides: list[str], *extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, [*overrides, *extra])


def kill_training_at(cfg: TrainConfig, run_dir: Path, step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """train() killed (KeyboardInterrupt) at its `step`-th loss computation, as a kill -9 would leave the run."""
    real_loss, calls = train_loop.batch_loss, {"n": 0}

    def dying_loss(*args: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt("simulated kill")
        return real_loss(*args)

    monkeypatch.setattr(train_loop, "batch_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run_dir)
    monkeypatch.setattr(train_loop, "batch_loss", real_loss)


def test_training_learns_and_checkpoint_rebuilds(tiny_overrides: list[str], tmp_path: Path) -> None:
    cfg = config(tiny_overrides, "optim.max_steps=40", "optim.lr=3e-3")
    final = train(cfg, tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"] - 0.3  # the contrastive loss falls clearly
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_samples"] == 40 * 16 and metrics["samples_per_s"] > 0 and metrics["peak_rss_mb"] > 0
    assert metrics["wall_seconds"] >= metrics["train_seconds"] > 0
    # 40 val queries over a ~60-image gallery: R@1 moves in steps of 0.025, too coarse to judge. R@10 is not:
    # an untrained model scores 0.10 (chance ~0.17), this run 0.425 (measured 2026-11-23).
    assert metrics["val"]["R@10"] > 0.3
    ckpt = load_checkpoint(final)
    assert ckpt.config.model.text.vocab_size == ckpt.tokenizer.get_vocab_size()
    assert ckpt.payload["metrics"]["val"] == metrics["val"]
    assert train(cfg, tmp_path / "run") == final  # a finished run is returned, not retrained


def test_killed_run_resumes_to_identical_weights(tiny_overrides: list[str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tiny_overrides, "optim.max_steps=8", "checkpoint_every_minutes=0", "loss.hard_negatives=2",
                 "optim.batch_size=8")
    straight = load_checkpoint(train(cfg, tmp_path / "straight")).model.state_dict()

    kill_training_at(cfg, tmp_path / "resumed", 6, monkeypatch)
    assert not (tmp_path / "resumed" / "checkpoints" / "model.pt").exists()
    resumed = load_checkpoint(train(cfg, tmp_path / "resumed")).model.state_dict()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


def test_resuming_with_another_config_is_refused_naming_the_keys(tiny_overrides: list[str], tmp_path: Path) -> None:
    cfg = config(tiny_overrides, "optim.max_steps=2")
    run = tmp_path / "run"
    final = train(cfg, run)
    # An interrupted run (last.pt, no model.pt) and a finished one are both refused, before anything is written.
    for interrupted in (False, True):
        if interrupted:
            final.unlink()
        files = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
        with pytest.raises(ConfigError) as info:
            train(config(tiny_overrides, "optim.max_steps=2", "optim.lr=0.01", "loss.symmetric=false"), run)
        assert f"run {run} was started with another config (loss.symmetric: True -> False; optim.lr: 0.002 -> 0.01)" \
            in str(info.value)
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == files
    # The vocabulary size that training filled in from the tokenizer is not a difference: the same config resumes.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["text"]["vocab_size"] != cfg.model.text.vocab_size
    assert train(cfg, run) == final and final.exists()
    # A config.yaml that no longer loads cannot vouch for the run.
    (run / "config.yaml").write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"cannot be resumed, its config does not load: .*'learning_rate'"):
        train(cfg, run)


def test_two_stage_freezes_encoders_in_stage_two(tiny_overrides: list[str], tmp_path: Path) -> None:
    # Validation after every step: it must leave the frozen encoders (and their BatchNorm statistics) alone.
    cfg = config(tiny_overrides, "recipe=two_stage", "optim.max_steps=4", "stage2.max_steps=4",
                 "stage2.max_minutes=0", "stage2.batch_size=16", "val_every_minutes=1e-9")
    run = tmp_path / "run"
    train(cfg, run)
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert list(dict.fromkeys(h["stage"] for h in history)) == ["stage1", "stage2"]  # in this order
    assert len(history) >= 8  # validated after every step
    # Encoder weights after stage 1 (saved in last.pt at the end of stage 1 was overwritten, so compare the
    # final model with a rerun of stage 1 alone).
    stage1_only = config(tiny_overrides, "optim.max_steps=4", "model.composer.name=sum")
    a = load_checkpoint(run / "checkpoints" / "model.pt").model
    b = load_checkpoint(train(stage1_only, tmp_path / "stage1")).model
    for (name, pa), pb in zip(a.image_encoder.state_dict().items(), b.image_encoder.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("extra, modes", [
    # TMCIR's IACMA stage, then the one-stage recipe: both stages train the towers.
    (["method.name=tmcir", "model.composer.name=atf", "model.composer.atf_heads=2", "method.iacma_steps=2"],
     {"iacma": True, "train": True}),
    (["recipe=two_stage"], {"stage1": True, "stage2": False}),  # CLIP4Cir's stage 2 trains the composer alone
], ids=["tmcir-iacma", "two_stage"])
def test_a_stage_runs_the_towers_it_trains_in_train_mode(extra: list[str], modes: dict[str, bool],
                                                         tiny_overrides: list[str]) -> None:
    cfg = config(tiny_overrides, "optim.max_steps=2", *extra)
    model = build_model(cfg.model)
    scale = LogitScale(cfg.loss.logit_scale, cfg.loss.learn_logit_scale, cfg.loss.max_logit_scale)
    stages = build_stages(cfg, model, build_method(cfg.method, model, cfg.loss.symmetric), scale)
    assert [s.name for s in stages] == list(modes)
    for stage in stages:
        enter_stage(stage, model, scale, cfg.loss.learn_logit_scale)
        assert (model.image_encoder.training, model.text_encoder.training) == (modes[stage.name],) * 2, stage.name
        assert model.composer.training


def test_bad_inputs_give_clear_errors(tiny_overrides: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size=999 exceeds the 160 training triplets"):
        train(config(tiny_overrides, "optim.max_steps=1", "optim.batch_size=999"), tmp_path / "a")
    with pytest.raises(ValueError, match="recipe=two_stage trains a composer"):
        config(tiny_overrides, "optim.max_steps=1", "recipe=two_stage", "model.composer.name=sum")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt cannot be read"):
        load_checkpoint(tmp_path / "junk.pt")


@pytest.mark.parametrize("method,extra", [
    ("cala", ["method.loss_form=official"]),
    ("dra", ["recipe=two_stage", "stage2.max_steps=2", "stage2.max_minutes=0", "stage2.batch_size=16"]),
    ("tmcir", ["model.composer.name=atf", "model.composer.atf_heads=2", "method.iacma_steps=2"]),
    ("cala", ["model.composer.name=artemis", "method.loss_form=official"]),  # CaLa on ARTEMIS, the paper's base
    ("dra", ["model.composer.name=artemis"]),
    ("tmcir", ["model.composer.name=artemis", "method.iacma_steps=2"]),  # IACMA, then ARTEMIS instead of ATF
], ids=["cala", "dra", "tmcir", "cala-artemis", "dra-artemis", "tmcir-artemis"])
def test_methods_train_through_the_recipe(method: str, extra: list[str], tiny_overrides: list[str],
                                          tmp_path: Path) -> None:
    cfg = config(tiny_overrides, f"method.name={method}", "optim.max_steps=3", "log_every_steps=1", *extra)
    ckpt = load_checkpoint(train(cfg, tmp_path / method))
    log = [json.loads(line) for line in (tmp_path / method / "train_log.jsonl").read_text().splitlines()]
    metrics = json.loads((tmp_path / method / "metrics.json").read_text())
    assert metrics["method"].startswith(method)
    # The final checkpoint holds the inference model only: the same keys as a base model's.
    base = load_checkpoint(train(config(tiny_overrides, "optim.max_steps=1", *[e for e in extra if "composer" in e]),
                                 tmp_path / f"base-{method}"))
    assert ckpt.model.state_dict().keys() == base.model.state_dict().keys()
    if method == "tmcir":
        assert "UPPER BOUND" in metrics["method"]
        assert [h["stage"] for h in metrics["history"]] == ["iacma", "train"]
    terms = {"cala": {"qtm", "tbia", "ctr"}, "dra": {"qtm", "imp", "aug"}, "tmcir": {"iacma"}}[method]
    assert terms <= set(log[0]), log[0]


@pytest.mark.parametrize("extra", [
    ["recipe=two_stage", "model.composer.name=combiner", "stage2.max_steps=3", "stage2.max_minutes=0",
     "stage2.batch_size=8"],  # CLIP4Cir's (and DRA's) two stages
    ["method.name=tmcir", "model.composer.name=atf", "model.composer.atf_heads=2", "method.iacma_steps=3"],
], ids=["two_stage", "tmcir-iacma"])
def test_multi_stage_run_killed_in_its_first_stage_resumes_to_identical_weights(
        extra: list[str], tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint taken in stage 1 holds stage 1's optimiser state: a resume loads it into stage 1's optimiser
    and into no later stage's (it once was loaded into stage 2's too: a ValueError, or silently wrong moments)."""
    cfg = config(tiny_overrides, "optim.max_steps=3", "optim.batch_size=8", "checkpoint_every_minutes=0", *extra)
    straight = load_checkpoint(train(cfg, tmp_path / "straight")).model.state_dict()
    kill_training_at(cfg, tmp_path / "resumed", 2, monkeypatch)  # in the first stage, after its first checkpoint
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)["state"]["stage"] == 0
    resumed = load_checkpoint(train(cfg, tmp_path / "resumed")).model.state_dict()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


def test_new_training_data_is_a_new_run_and_an_old_run_refuses_it(tiny_overrides: list[str], tmp_path: Path) -> None:
    """The weekly retrain: the default run id names the data, so new data trains anew while the same data reuses
    the finished run; a run directory given explicitly refuses data it was not started on."""
    from cirflow.models.train_job import train_run

    data = tmp_path / "data"
    shutil.copytree(Path(next(o for o in tiny_overrides if o.startswith("data.root=")).removeprefix("data.root=")),
                    data)
    overrides = [*[o for o in tiny_overrides if not o.startswith("data.root=")], f"data.root={data}",
                 "optim.max_steps=2"]
    captions = data / "captions" / "cap.rc2.train.json"
    triplets = json.loads(captions.read_text())
    captions.write_text(json.dumps(triplets[:-8]))  # last week's data
    first = train_run(None, overrides, tmp_path / "wd")
    assert train_run(None, overrides, tmp_path / "wd") == first  # same data, same config: the finished run
    captions.write_text(json.dumps(triplets))  # the week's new triplets
    second = train_run(None, overrides, tmp_path / "wd")
    assert second != first and second.is_file()
    assert json.loads((second.parent.parent / "data.json").read_text())["fingerprint"] != json.loads(
        (first.parent.parent / "data.json").read_text())["fingerprint"]
    with pytest.raises(ConfigError, match=r"was started on other data .* train into a new run directory"):
        train_run(None, overrides, tmp_path / "wd", run_id=first.parent.parent.name)

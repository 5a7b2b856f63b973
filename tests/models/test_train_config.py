"""Range checks of the training config tree: every out-of-range value is a ConfigError naming its section."""

import pytest

from cirflow.core.config import ConfigError, load_config
from cirflow.models.train_config import TrainConfig

# (override, the error's section and reason)
OUT_OF_RANGE = {
    "optim.batch_size=0": "config.optim: batch_size must be positive, got 0",
    "optim.lr=0": "config.optim: lr must be positive, got 0.0",
    "optim.lr=.nan": "config.optim.lr: must be a finite number, got nan",
    "optim.weight_decay=-0.1": "config.optim: weight_decay must not be negative",
    "optim.warmup_steps=-1": "config.optim: warmup_steps must not be negative",
    "optim.max_steps=-5": "config.optim: max_steps must not be negative",
    "optim.max_minutes=-1": "config.optim: max_minutes must not be negative",
    "optim.max_minutes=0": "config.optim: max_steps and max_minutes are both 0",
    "optim.grad_clip=-1": "config.optim: grad_clip must not be negative",
    "stage2.max_minutes=0": "config.stage2: max_steps and max_minutes are both 0",
    "loss.logit_scale=0": "config.loss: logit_scale must be positive",
    "loss.logit_scale=200": "config.loss: logit_scale=200.0 exceeds max_logit_scale=100.0",
    "loss.hard_negatives=-1": "config.loss: hard_negatives must not be negative",
    "model.image.image_size=0": "config.model.image: image_size must be positive",
    "model.image.image_size=8": "config.model.image: image_size=8 is too small for 3 conv stages",
    "model.image.widths=[]": "config.model.image: widths=[] must be one or more positive channel counts",
    "model.image.widths=[32, 0]": "config.model.image: widths=[32, 0]",
    "model.image.layers=0": "config.model.image: layers must be positive",
    "model.image.heads=0": "config.model.image: heads must be positive",
    "model.image.heads=3": "config.model.image: dim=128 is not divisible by heads=3",
    "model.image.dropout=1.5": "config.model.image: dropout must lie in [0, 1], got 1.5",
    "model.image.embed_dim=0": "config.model.image: embed_dim must be positive",
    "model.text.vocab_size=0": "config.model.text: vocab_size must be positive",
    "model.text.max_length=0": "config.model.text: max_length must be positive",
    "model.text.heads=5": "config.model.text: dim=128 is not divisible by heads=5",
    "model.text.mlp_ratio=0": "config.model.text: mlp_ratio must be positive",
    "model.composer.name=concat": "config.model.composer: unknown composer 'concat'; choose one of",
    "model.composer.projection_ratio=0": "config.model.composer: projection_ratio must be positive",
    "model.composer.dropout=-0.5": "config.model.composer: dropout must lie in [0, 1]",
    "model.composer.atf_temperature=0": "config.model.composer: atf_temperature must be positive",
    "model.composer.atf_heads=0": "config.model.composer: atf_heads must be positive",
    "tokenizer.vocab_size=0": "config.tokenizer: vocab_size must be positive",
    "tokenizer.max_length=2": "config.tokenizer: max_length=2 leaves no room for a caption",
    "tokenizer.min_frequency=0": "config.tokenizer: min_frequency must be positive",
    "preprocess.size=0": "config.preprocess: size must be positive",
    "preprocess.std=[0.25, 0, 0.25]": "config.preprocess: std=[0.25, 0.0, 0.25] must be positive in every channel",
    "data.max_train_queries=-1": "config.data: max_train_queries must not be negative",
    "method.aux_scale=0": "config.method: aux_scale must be positive",
    "method.tac_steps=0": "config.method: tac_steps must be positive",
    "method.alpha=-1": "config.method: alpha must not be negative",
    "method.lambda_aug=-1": "config.method: lambda_aug must not be negative",
    "method.w_tac=1.2": "config.method: w_tac must lie in [0, 1], got 1.2",
    "method.attn_dropout=-0.1": "config.method: attn_dropout must lie in [0, 1]",
    "method.iacma_steps=-1": "config.method: iacma_steps must not be negative",
    "method.iacma_logit_scale=200": "config.method: iacma_logit_scale=200.0 exceeds iacma_max_logit_scale=100.0",
    "seed=-1": "config: seed must not be negative",
    "log_every_steps=0": "config: log_every_steps must be positive",
    "val_every_minutes=-1": "config: val_every_minutes must not be negative",
    "checkpoint_every_minutes=-1": "config: checkpoint_every_minutes must not be negative",
    "distributed.workers=0": "config.distributed: workers must be positive, got 0",
    "distributed.workers=-2": "config.distributed: workers must be positive, got -2",
    "distributed.cpus_per_worker=0": "config.distributed: cpus_per_worker must be positive, got 0",
}


@pytest.mark.parametrize("override", list(OUT_OF_RANGE))
def test_out_of_range_values_are_config_errors(override: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, None, [override])
    assert OUT_OF_RANGE[override] in str(info.value)


def test_atf_heads_must_divide_the_token_width() -> None:
    with pytest.raises(ConfigError, match="config.model: composer.atf_heads=3 does not divide the token width "
                                          "image.dim=128"):
        load_config(TrainConfig, None, ["model.composer.name=atf", "model.composer.atf_heads=3"])
    # Other composers have no attention heads: the key is then irrelevant.
    assert load_config(TrainConfig, None, ["model.composer.atf_heads=3"]).model.composer.atf_heads == 3


def test_zero_means_none_where_documented() -> None:
    cfg = load_config(TrainConfig, None, [
        "optim.max_minutes=0", "optim.max_steps=10", "stage2.max_steps=0", "optim.warmup_steps=0",
        "optim.grad_clip=0", "optim.weight_decay=0", "loss.hard_negatives=0", "data.max_train_queries=0",
        "val_every_minutes=0", "checkpoint_every_minutes=0", "method.alpha=0", "model.image.dropout=0",
        "model.composer.dropout=1", "method.w_hca=0",
    ])
    assert (cfg.optim.max_steps, cfg.optim.max_minutes, cfg.stage2.max_steps) == (10, 0.0, 0)


def test_distributed_batches_split_evenly_and_storage_needs_distribution() -> None:
    # optim.batch_size is the global batch: every worker takes an equal share of it.
    with pytest.raises(ConfigError, match=r"config: optim.batch_size=10 is not divisible by distributed.workers=4: "
                                          "the batch size is the global batch, split evenly across the workers"):
        load_config(TrainConfig, None, ["optim.batch_size=10", "distributed.workers=4"])
    with pytest.raises(ConfigError, match=r"config: stage2.batch_size=30 is not divisible by distributed.workers=4"):
        load_config(TrainConfig, None, ["recipe=two_stage", "optim.batch_size=32", "stage2.batch_size=30",
                                        "distributed.workers=4"])
    # stage2 is not trained by one_stage: its batch size does not matter there.
    assert load_config(TrainConfig, None, ["optim.batch_size=32", "stage2.batch_size=30",
                                           "distributed.workers=4"]).distributed.enabled
    with pytest.raises(ConfigError, match=r"config.distributed: storage='s3://bucket/runs' is Ray Train's checkpoint "
                                          "storage, used only by distributed training"):
        load_config(TrainConfig, None, ["distributed.storage=s3://bucket/runs"])
    # A single worker on a given cluster is distributed training too (e.g. to reach the cluster's GPU).
    single = load_config(TrainConfig, None, ["distributed.address=auto", "distributed.storage=/shared/ray"])
    assert single.distributed.enabled and single.distributed.workers == 1
    assert not load_config(TrainConfig, None, []).distributed.enabled


def test_where_a_run_executes_does_not_name_it() -> None:
    from cirflow.models.train_job import run_id_for

    plain = load_config(TrainConfig, None, ["optim.batch_size=32"])
    spread = load_config(TrainConfig, None, ["optim.batch_size=32", "distributed.workers=4", "distributed.address=auto"])
    assert run_id_for(plain, "d1") == run_id_for(spread, "d1") != run_id_for(load_config(TrainConfig, None, []), "d1")
    assert run_id_for(plain, "d1") != run_id_for(plain, "d2")  # new training data is a new run

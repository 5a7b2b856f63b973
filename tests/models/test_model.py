import math

import pytest
import torch

from cirflow.models.cir_model import ModelConfig, build_model
from cirflow.models.composers import COMPOSERS, ComposerConfig, build_composer
from cirflow.models.image_encoder import ImageEncoderConfig
from cirflow.models.losses import LogitScale, info_nce
from cirflow.models.text_encoder import TextEncoderConfig


def tiny(composer: str) -> ModelConfig:
    return ModelConfig(ImageEncoderConfig(widths=(8, 16, 32), dim=32, layers=1, heads=2, embed_dim=24),
                       TextEncoderConfig(vocab_size=50, dim=32, layers=1, heads=2, embed_dim=24),
                       ComposerConfig(name=composer))


@pytest.mark.parametrize("composer", sorted(COMPOSERS))
def test_surfaces_return_unit_vectors(composer: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(composer)).eval()
    pixels = torch.randn(3, 3, 64, 64)
    ids = torch.randint(4, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    for out in (model.encode_image(pixels), model.encode_text(ids, mask), model.compose(pixels, ids, mask)):
        assert out.shape == (3, 24)
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    f = model.features(pixels, ids, mask)
    assert f.image_tokens.shape == (3, 1 + 4 * 4, 32) and f.text_tokens.shape == (3, 7, 32)


def test_padding_does_not_change_text_vector() -> None:
    torch.manual_seed(0)
    model = build_model(tiny("sum")).eval()
    ids = torch.randint(4, 50, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 3)], dim=1).long()
    torch.testing.assert_close(model.encode_text(ids, torch.ones(1, 5, dtype=torch.long)),
                               model.encode_text(padded, mask), atol=1e-5, rtol=0)


def test_sum_composer_is_normalised_sum() -> None:
    v, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    q = build_composer(2, 2, ComposerConfig(name="sum"))(v, t, None, None, None)
    torch.testing.assert_close(q, torch.tensor([[1.0, 1.0]]) / math.sqrt(2))


def test_unknown_composer_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown composer 'concat'; choose one of \['artemis', 'atf', 'combiner', 'sum'\]"):
        build_composer(8, 8, ComposerConfig(name="concat"))


def test_embed_dims_must_match() -> None:
    with pytest.raises(ValueError, match="one space"):
        ModelConfig(ImageEncoderConfig(embed_dim=8), TextEncoderConfig(embed_dim=16))


def test_info_nce_matches_hand_computation() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]])  # two positives, then one extra negative
    # Row 0 logits 2*[1, 0.6, 0] -> -log(e^2 / (e^2 + e^1.2 + 1)); row 1: 2*[0, 0.8, -1], positive is 1.6.
    row0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(1.2) + 1))
    row1 = -math.log(math.exp(1.6) / (1 + math.exp(1.6) + math.exp(-2)))
    assert info_nce(q, k, 2.0).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_logit_scale_is_clamped_and_optionally_frozen() -> None:
    s = LogitScale(200.0, learn=False, maximum=100.0)
    assert s().item() == pytest.approx(100.0) and not s.log_scale.requires_grad


def test_batch_contrastive_masks_own_reference_and_dedupes() -> None:
    from cirflow.models.losses import batch_contrastive

    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # distinct images of the batch
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Query 0: reference row 0 (masked), target row 2 -> logits over rows 1, 2: [0, 0.6].
    # Query 1: reference row 0 (masked), target row 1 -> logits over rows 1, 2: [1, 0.8].
    row0 = -math.log(math.exp(0.6) / (1 + math.exp(0.6)))
    row1 = -math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(0.8)))
    loss = batch_contrastive(q @ keys.T, torch.tensor([2, 1]), torch.tensor([0, 0]), 1.0)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_symmetric_contrastive_adds_reverse_direction() -> None:
    from cirflow.models.losses import batch_contrastive

    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positive, excluded = torch.tensor([2, 1]), torch.tensor([0, 0])
    forward = batch_contrastive(q @ keys.T, positive, excluded, 1.0)
    # Reverse: key 2 against queries [0.6, 0.8] -> label 0; key 1 against queries [0, 1] -> label 1.
    rev0 = -math.log(math.exp(0.6) / (math.exp(0.6) + math.exp(0.8)))
    rev1 = -math.log(math.exp(1.0) / (1 + math.exp(1.0)))
    both = batch_contrastive(q @ keys.T, positive, excluded, 1.0, symmetric=True)
    assert both.item() == pytest.approx((forward.item() + (rev0 + rev1) / 2) / 2, rel=1e-6)


def test_evaluation_restores_each_submodules_mode(tiny_shapes) -> None:
    from cirflow.models.data.loaders import load_split
    from cirflow.models.evaluation import build_eval_set, evaluate
    from cirflow.models.preprocess import PreprocessConfig
    from cirflow.models.tokenizer import TokenizerConfig, train_tokenizer

    split = load_split("shapes", tiny_shapes, "val")
    tokenizer = train_tokenizer([q.caption for q in split.queries], TokenizerConfig(vocab_size=200))
    from dataclasses import replace

    cfg = tiny("combiner")
    model = build_model(replace(cfg, text=replace(cfg.text, vocab_size=tokenizer.get_vocab_size())))
    model.train()
    model.image_encoder.eval()  # as in a frozen-encoder stage
    evaluate(model, build_eval_set(split, PreprocessConfig()), tokenizer, PreprocessConfig())
    assert model.composer.training and model.text_encoder.training
    assert not any(m.training for m in model.image_encoder.modules())

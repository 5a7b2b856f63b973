import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cirflow.models.atf import AdaptiveTokenFusion, merge_tokens
from cirflow.models.composers import COMPOSERS, ComposerConfig, build_composer

DIM, EMBED = 16, 12


def atf(threshold: float = 0.2, trained: bool = True) -> AdaptiveTokenFusion:
    """A tiny ATF in eval mode; `trained` replaces the zero-initialised projection so the pooled path counts."""
    torch.manual_seed(0)
    composer = build_composer(EMBED, DIM, ComposerConfig(name="atf", atf_threshold=threshold,
                                                    atf_heads=2)).eval()
    if trained:
        nn.init.normal_(composer.proj.weight, std=0.5)
    return composer


def inputs(b: int = 3, nv: int = 5, length: int = 6, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(b, EMBED, generator=g), dim=-1)
    t = F.normalize(torch.randn(b, EMBED, generator=g), dim=-1)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, 4:] = 0  # example 0 has two padding positions
    return v, t, torch.randn(b, nv, DIM, generator=g), torch.randn(b, length, DIM, generator=g), mask


def basis(*rows: int) -> torch.Tensor:
    return torch.eye(DIM)[list(rows)]  # orthonormal tokens: cosine 1 with themselves, 0 with the others


def test_atf_is_registered_and_checks_token_width() -> None:
    assert COMPOSERS["atf"] is AdaptiveTokenFusion
    v, t, image_tokens, text_tokens, mask = inputs()
    with pytest.raises(ValueError, match="token width 12"):
        build_composer(EMBED, 12, ComposerConfig(name="atf", atf_heads=2))(v, t, image_tokens, text_tokens, mask)


def test_threshold_above_every_similarity_leaves_visual_tokens_and_pools_all_text() -> None:
    _, _, image_tokens, text_tokens, mask = inputs()
    fused, pooled, has_unmatched = merge_tokens(image_tokens, text_tokens, mask, threshold=1.01, temperature=0.1)
    torch.testing.assert_close(fused, image_tokens, rtol=0, atol=0)
    real = mask[..., None].float()
    torch.testing.assert_close(pooled, (real * text_tokens).sum(1) / real.sum(1))  # masked mean of real tokens
    assert has_unmatched.all()


def test_identical_text_token_merges_into_its_visual_token_only() -> None:
    image_tokens = basis(0, 1, 2)[None]  # (1, 3, d)
    # Text: e5 (matches nothing), 2*e2 (same direction as visual token 2), e7; then a padded copy of e0.
    text_tokens = torch.stack([basis(5)[0], 2 * basis(2)[0], basis(7)[0], basis(0)[0]])[None]  # (1, 4, d)
    mask = torch.tensor([[1, 1, 1, 0]])
    fused, pooled, has_unmatched = merge_tokens(image_tokens, text_tokens, mask, threshold=0.5, temperature=0.1)
    # Token 2 is the only kept text token of visual row 2, so its weight is 1: V'_2 = e2 + 2 e2 = 3 e2.
    torch.testing.assert_close(fused[0, 2], 3 * basis(2)[0])
    # Rows 0 and 1 keep nothing; row 0 would match the padded e0, which must not merge.
    torch.testing.assert_close(fused[0, :2], image_tokens[0, :2], rtol=0, atol=0)
    # Unmatched real tokens e5 and e7 are pooled; the merged token and the padding are not.
    torch.testing.assert_close(pooled[0], (basis(5)[0] + basis(7)[0]) / 2)
    assert has_unmatched.tolist() == [True]


def test_merge_weights_are_a_softmax_over_kept_tokens() -> None:
    image_tokens = basis(0)[None]
    a, b = basis(0)[0], F.normalize(basis(0)[0] + basis(1)[0], dim=0)  # cosines 1 and 0.7071 with e0
    text_tokens = torch.stack([a, b, basis(3)[0]])[None]
    fused, _, _ = merge_tokens(image_tokens, text_tokens, torch.ones(1, 3), threshold=0.5, temperature=0.1)
    w = torch.softmax(torch.tensor([1.0, 0.5 ** 0.5]) / 0.1, dim=0)  # e3 (cosine 0) is below theta: no weight
    torch.testing.assert_close(fused[0, 0], basis(0)[0] + w[0] * a + w[1] * b)


def test_padding_text_tokens_never_merge_or_pool() -> None:
    composer = atf(threshold=0.0)
    v, t, image_tokens, text_tokens, mask = inputs()
    changed = text_tokens.clone()
    changed[0, 4:] = image_tokens[0, 1:3] * 5  # padded positions now match visual tokens perfectly
    torch.testing.assert_close(composer(v, t, image_tokens, changed, mask),
                               composer(v, t, image_tokens, text_tokens, mask), rtol=0, atol=1e-6)


def test_all_padding_and_no_match_edge_cases_stay_finite() -> None:
    composer = atf()
    v, t, image_tokens, text_tokens, _ = inputs()
    empty = torch.zeros(3, 6, dtype=torch.long)
    fused, pooled, has_unmatched = merge_tokens(image_tokens, text_tokens, empty, threshold=0.2, temperature=0.1)
    torch.testing.assert_close(fused, image_tokens, rtol=0, atol=0)
    assert not has_unmatched.any() and pooled.abs().sum() == 0
    for q in (composer(v, t, image_tokens, text_tokens, empty),
              atf(threshold=2.0)(v, t, image_tokens, text_tokens, torch.ones(3, 6))):
        assert torch.isfinite(q).all()
        torch.testing.assert_close(q.norm(dim=-1), torch.ones(3))


def test_untrained_atf_is_the_sum_composer() -> None:
    v, t, image_tokens, text_tokens, mask = inputs()
    torch.testing.assert_close(atf(trained=False)(v, t, image_tokens, text_tokens, mask), F.normalize(v + t, dim=-1))


def test_examples_are_independent_of_the_batch() -> None:
    composer = atf()
    v, t, image_tokens, text_tokens, mask = inputs()
    batched = composer(v, t, image_tokens, text_tokens, mask)
    for i in range(3):
        alone = composer(v[i:i + 1], t[i:i + 1], image_tokens[i:i + 1], text_tokens[i:i + 1], mask[i:i + 1])
        torch.testing.assert_close(alone, batched[i:i + 1], rtol=0, atol=1e-6)


def test_gradients_reach_every_parameter() -> None:
    composer = atf().train()
    composer(*inputs()).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in composer.parameters())


class _Query(nn.Module):
    def __init__(self, composer: nn.Module) -> None:
        super().__init__()
        self.composer = composer

    def forward(self, v, t, image_tokens, text_tokens, text_mask):  # noqa: ANN001, ANN201
        return self.composer(v, t, image_tokens, text_tokens, text_mask)


def test_exports_to_onnx_and_matches_onnxruntime(tmp_path) -> None:  # noqa: ANN001
    composer = atf()
    args = inputs()
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=2)
    dynamic = ({0: batch}, {0: batch}, {0: batch}, {0: batch, 1: length}, {0: batch, 1: length})
    path = tmp_path / "atf.onnx"
    torch.onnx.export(_Query(composer).eval(), args, str(path), dynamo=True, dynamic_shapes=dynamic,
                      input_names=["v", "t", "image_tokens", "text_tokens", "text_mask"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for check in (args, inputs(b=2, length=4, seed=7)):  # the exported shapes are not baked in
        feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), check)}
        torch.testing.assert_close(torch.from_numpy(session.run(None, feed)[0]), composer(*check), rtol=0,
                                   atol=1e-4)

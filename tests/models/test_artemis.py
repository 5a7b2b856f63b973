"""ARTEMIS (models/artemis.py): the rearranged score is the official code's, the folded query vector ranks as
the score does exactly when the attended target is not normalised, and the two-stage ranking (models/rerank.py)
is the exact one when N covers the gallery."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cirflow.models.artemis import Artemis, reference_score
from cirflow.models.composers import ComposerConfig
from cirflow.models.rerank import rerank_gallery

D = 32


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("target_norm", [True, False])
def test_the_rearranged_score_is_the_official_one(target_norm: bool) -> None:
    torch.manual_seed(0)
    artemis = Artemis(D, 16, ComposerConfig(name="artemis", artemis_target_norm=target_norm)).eval()
    r, m, t = unit(6, D, seed=1), unit(6, D, seed=2), unit(9, D, seed=3)
    with torch.no_grad():
        scores = artemis.score(artemis.query_features(r, m), t[None])  # (6, 9): every query against every target
        for j in range(len(t)):
            torch.testing.assert_close(scores[:, j], reference_score(artemis, r, m, t[j].expand(6, -1)))
        per_query = artemis.score(artemis.query_features(r, m), t[:4].expand(6, -1, -1))
    torch.testing.assert_close(per_query, scores[:, :4])
    assert artemis.folds_exactly is not target_norm


def test_the_folded_vector_ranks_exactly_only_without_the_target_norm() -> None:
    torch.manual_seed(0)
    r, m, gallery = unit(20, D, seed=1), unit(20, D, seed=2), unit(300, D, seed=3)
    with torch.no_grad():
        linear = Artemis(D, 16, ComposerConfig(name="artemis", artemis_target_norm=False)).eval()
        q = linear(r, m, None, None, None)
        exact = linear.score(linear.query_features(r, m), gallery[None])
        np.testing.assert_array_equal(torch.argsort(q @ gallery.T, descending=True, stable=True).numpy()[:, :10],
                                      torch.argsort(exact, descending=True, stable=True).numpy()[:, :10])
        normed = Artemis(D, 16, ComposerConfig(name="artemis")).eval()
        # Sharper attentions than an untrained MLP gives, so that the per-target norms differ.
        for attention in (normed.attention_em, normed.attention_is):
            attention.net[2].weight.mul_(40)
        q = normed(r, m, None, None, None)
        exact = normed.score(normed.query_features(r, m), gallery[None])
    folded_top = torch.topk(q @ gallery.T, 10).indices
    exact_top = torch.topk(exact, 10).indices
    assert not torch.equal(folded_top, exact_top), "the normalised score should not fold into one vector"


def test_two_stage_ranking_is_exact_when_n_covers_the_gallery_and_keeps_the_fold_beyond_n() -> None:
    torch.manual_seed(0)
    artemis = Artemis(D, 16, ComposerConfig(name="artemis")).eval()
    r, m, gallery = unit(12, D, seed=1), unit(12, D, seed=2), unit(200, D, seed=3)
    with torch.no_grad():
        folded = (artemis(r, m, None, None, None) @ gallery.T).numpy()
        features = artemis.query_features(r, m).numpy()

    def rescore(f: np.ndarray, c: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return artemis.score(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (f, c))).numpy()

    exact = rescore(features, np.broadcast_to(gallery.numpy()[None], (12, 200, D)))
    for n in (None, 200, 500):
        np.testing.assert_array_equal(np.argsort(-rerank_gallery(folded, features, gallery.numpy(), n, rescore), 1),
                                      np.argsort(-exact, 1))
    two_stage = rerank_gallery(folded, features, gallery.numpy(), 10, rescore)
    order = np.argsort(-two_stage, 1)
    for row in range(12):
        candidates = np.argsort(-folded[row])[:10]
        assert set(order[row, :10]) == set(candidates)  # the top 10 are the fold's candidates ...
        assert list(order[row, :10]) == list(candidates[np.argsort(-exact[row, candidates])])  # ... exactly ordered
        assert list(order[row, 10:]) == [i for i in np.argsort(-folded[row]) if i not in set(candidates)]
    with pytest.raises(ValueError, match="rerank n must be a positive"):
        rerank_gallery(folded, features, gallery.numpy(), 0, rescore)

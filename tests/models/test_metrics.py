"""Metrics: a hand-computed example with ties, reference removal and the subset; brute-force equivalence."""

from __future__ import annotations

import numpy as np
import pytest

from cirflow.models import metrics
from cirflow.models.data.types import CIRSplit, Query
from cirflow.models.metrics import (
    average_fashioniq,
    cirr_metrics,
    cirr_submission,
    evaluate_scores,
    fashioniq_metrics,
    rank_gallery,
    target_ranks,
)

GALLERY = [f"g{i}" for i in range(7)]
# Rows are queries, columns g0..g6.
SCORES = np.array(
    [
        [0.9, 0.5, 0.5, 0.7, 0.5, 0.1, 0.3],  # q0: ref g0, target g2, a three-way tie at 0.5
        [0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.99],  # q1: ref g6 (the best), target g5, everything else tied
        [0.1, 1.0, 0.2, 0.3, 0.8, 0.8, 0.0],  # q2: ref g1 (the best), target g4 tied with g5
    ]
)
REFERENCES = np.array([0, 6, 1])
TARGETS = np.array([2, 5, 4])


def hand_split(protocol: str = "cirr", remove_reference: bool = True, targets: bool = True) -> CIRSplit:
    def query(pair_id: int, ref: str, target: str, members: tuple[str, ...]) -> Query:
        return Query(pair_id, ref, "caption", target if targets else None, ("caption",), members)

    return CIRSplit(
        name="hand/val",
        queries=[
            query(100, "g0", "g2", ("g0", "g1", "g2", "g3", "g4", "g5")),
            query(101, "g6", "g5", ("g6", "g5", "g0", "g1", "g2", "g3")),
            query(102, "g1", "g4", ("g1", "g4", "g5", "g6", "g0", "g2")),
        ],
        images={},
        remove_reference=remove_reference,
        protocol=protocol,
    )


def test_hand_computed_ranks() -> None:
    # Reference removed. q0: g3 (0.7) beats g2; of the 0.5 tie g1 comes first (lower index): rank 2.
    # q1: g0..g4 tie with the target g5 and all come earlier in the gallery: rank 5.
    # q2: g4 ties g5 at 0.8 but comes first; g1 (1.0) is the removed reference: rank 0.
    assert target_ranks(SCORES, TARGETS, REFERENCES).tolist() == [2, 5, 0]
    # Kept references (FashionIQ): q0 adds g0 (0.9), q1 adds g6 (0.99), q2 adds g1 (1.0).
    assert target_ranks(SCORES, TARGETS, None).tolist() == [3, 6, 1]
    assert target_ranks(SCORES, TARGETS, np.array([-1, 6, -1])).tolist() == [3, 5, 1]


def test_hand_computed_top_k() -> None:
    assert rank_gallery(SCORES, REFERENCES, 4).tolist() == [[3, 1, 2, 4], [0, 1, 2, 3], [4, 5, 3, 2]]
    assert rank_gallery(SCORES, None, 4).tolist() == [[0, 3, 1, 2], [6, 0, 1, 2], [1, 4, 5, 3]]
    assert rank_gallery(SCORES, np.array([-1, 6, -1]), 2).tolist() == [[0, 3], [0, 1], [1, 4]]


def test_hand_computed_cirr_metrics() -> None:
    # Gallery ranks [2, 5, 0] (above): R@1 = 1/3 (q2), R@5 = 2/3 (q0, q2), R@10 = R@50 = 1.
    # Subset = members minus the reference, ties in gallery order:
    #   q0: g1 .5, g2 .5, g3 .7, g4 .5, g5 .1 -> g3, g1, g2, ... target g2 at rank 2
    #   q1: all 0.2 -> g0, g1, g2, g3, g5: target g5 at rank 4
    #   q2: g4 .8, g5 .8, g6 0, g0 .1, g2 .2 -> g4 first: rank 0
    # Rsubset@1 = 1/3, @2 = 1/3, @3 = 2/3; Avg = (R@5 + Rsubset@1) / 2 = (2/3 + 1/3) / 2 = 0.5.
    expected = {
        "R@1": 1 / 3, "R@5": 2 / 3, "R@10": 1.0, "R@50": 1.0,
        "Rsubset@1": 1 / 3, "Rsubset@2": 1 / 3, "Rsubset@3": 2 / 3, "Avg": 0.5,
    }
    got = cirr_metrics(SCORES, hand_split(), GALLERY)
    assert list(got) == list(expected)
    assert got == pytest.approx(expected)
    assert evaluate_scores(SCORES, hand_split(), GALLERY) == got


def test_cirr_metrics_keep_reference_when_told() -> None:
    # Kept references: ranks [3, 6, 1] -> R@1 = 0, R@5 = 2/3; the subset never holds the reference.
    got = cirr_metrics(SCORES, hand_split(remove_reference=False), GALLERY)
    assert got["R@1"] == 0.0 and got["R@5"] == pytest.approx(2 / 3) and got["Rsubset@3"] == pytest.approx(2 / 3)


def test_hand_computed_fashioniq() -> None:
    # Ranks [3, 6, 1] with references kept: all within 10.
    split = hand_split(protocol="fashioniq", remove_reference=False)
    assert fashioniq_metrics(SCORES, split, GALLERY) == {"R@10": 1.0, "R@50": 1.0}
    # A 12-image gallery where q0's target falls to rank 10 (ten higher scores): R@10 misses it.
    scores = np.zeros((3, 12))
    scores[0, 3:] = 1.0  # g3..g11 beat g2, and g0, g1 tie with it but come earlier: rank 9 + 2 = 11
    got = fashioniq_metrics(scores, split, [f"g{i}" for i in range(12)])
    assert got == pytest.approx({"R@10": 2 / 3, "R@50": 1.0})
    assert average_fashioniq({"dress": {"R@10": 0.2, "R@50": 0.5}, "shirt": {"R@10": 0.4, "R@50": 0.7}}) == (
        pytest.approx({"R@10": 0.3, "R@50": 0.6})
    )


def test_submission_format() -> None:
    # 7 images minus the reference leave 6: the top-50 list is the whole ranking, best first.
    recall, subset = cirr_submission(SCORES, hand_split(targets=False), GALLERY)
    assert recall == {
        "version": "rc2",
        "metric": "recall",
        "100": ["g3", "g1", "g2", "g4", "g6", "g5"],
        "101": ["g0", "g1", "g2", "g3", "g4", "g5"],
        "102": ["g4", "g5", "g3", "g2", "g0", "g6"],
    }
    assert subset == {
        "version": "rc2",
        "metric": "recall_subset",
        "100": ["g3", "g1", "g2"],
        "101": ["g0", "g1", "g2"],
        "102": ["g4", "g5", "g2"],
    }


def test_submission_is_top_50_on_a_large_gallery() -> None:
    rng = np.random.default_rng(0)
    gallery = [f"g{i}" for i in range(80)]
    scores = rng.random((3, 80))
    recall, subset = cirr_submission(scores, hand_split(targets=False), gallery)
    assert all(len(recall[str(p)]) == 50 for p in (100, 101, 102))
    assert "g0" not in recall["100"] and "g6" not in recall["101"]
    assert all(len(subset[str(p)]) == 3 for p in (100, 101, 102))


def _brute_ranking(row: np.ndarray, exclude: int) -> list[int]:
    return [j for j in sorted(range(row.size), key=lambda j: (-row[j], j)) if j != exclude]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_rank_gallery_matches_brute_force(monkeypatch: pytest.MonkeyPatch, dtype: type) -> None:
    # Small chunks so that several chunks are exercised.
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 1000)
    rng = np.random.default_rng(1)
    num_queries, gallery = 37, 120
    # Five distinct values: ties everywhere, including across every partition boundary.
    scores = rng.integers(0, 5, size=(num_queries, gallery)).astype(dtype)
    exclude = rng.integers(-1, gallery, size=num_queries)
    targets = np.array([(e + 1 + rng.integers(gallery - 1)) % gallery for e in exclude])
    targets[exclude == -1] = rng.integers(gallery, size=int((exclude == -1).sum()))
    brute = [_brute_ranking(scores[q], int(exclude[q])) for q in range(num_queries)]

    for k in (1, 7, 50, gallery - 1):
        assert rank_gallery(scores, exclude, k).tolist() == [b[:k] for b in brute]
    plain = [_brute_ranking(scores[q], -1) for q in range(num_queries)]
    assert rank_gallery(scores, None, gallery).tolist() == plain
    assert target_ranks(scores, targets, exclude).tolist() == [b.index(int(t)) for b, t in zip(brute, targets)]


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="NaN"):
        rank_gallery(np.array([[0.1, np.nan]]), None, 1)
    with pytest.raises(ValueError, match="k must be"):
        rank_gallery(SCORES, REFERENCES, 7)
    with pytest.raises(ValueError, match="query 0"):
        target_ranks(SCORES, TARGETS, np.array([2, 6, 1]))
    with pytest.raises(ValueError, match="hides its targets"):
        cirr_metrics(SCORES, hand_split(targets=False), GALLERY)
    with pytest.raises(ValueError, match="cirr, fashioniq"):
        evaluate_scores(SCORES, hand_split(protocol="css"), GALLERY)
    with pytest.raises(ValueError, match=r"\(3, 7\), got \(3, 6\)"):
        cirr_metrics(SCORES[:, :6], hand_split(), GALLERY)
    with pytest.raises(ValueError, match="'g6' is not in the gallery"):
        cirr_metrics(SCORES[:, :6], hand_split(), GALLERY[:6])

import math

import numpy as np
import pytest
import torch

from speeder import metrics


def test_target_rank_counts_ties_against_the_model() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5], [1.0, 1.0, 1.0], [3.0, 2.0, 1.0]])
    ranks = metrics.target_rank(scores, torch.tensor([1, 0, 2]))
    assert ranks.tolist() == [0, 2, 2]


def test_first_choice_is_the_unique_top_and_agrees_with_target_rank() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5], [1.0, 1.0, 1.0], [3.0, 2.0, 3.0], [0.0, 2.0, 1.0]])
    first = metrics.first_choice(scores)
    assert first.tolist() == [1, -1, -1, 1]  # a tied first place is no one's
    for target in range(3):  # rank 0 exactly when the target is the first choice
        ranks = metrics.target_rank(scores, torch.full((4,), target))
        assert ((ranks == 0) == (first == target)).all(), target


def test_hand_computed_values() -> None:
    ranks = [0, 1, 4, 12, -1]  # -1: an invalid answer
    assert metrics.hit_rate(ranks, 1) == pytest.approx(1 / 5)
    assert metrics.hit_rate(ranks, 5) == pytest.approx(3 / 5)
    assert metrics.hit_rate(ranks, 10) == pytest.approx(3 / 5)
    expected_ndcg10 = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(6)) / 5
    assert metrics.ndcg(ranks, 10) == pytest.approx(expected_ndcg10)
    assert metrics.mrr(ranks) == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 13) / 5)
    assert metrics.mrr(ranks, 10) == pytest.approx((1 + 1 / 2 + 1 / 5) / 5)
    assert metrics.valid_ratio(ranks) == pytest.approx(4 / 5)
    assert metrics.hit_rate_at_1_valid(ranks) == pytest.approx(1 / 4)
    assert metrics.valid_hit_rate_at_1(ranks) == pytest.approx(1 / 5)


def test_protocol_summaries() -> None:
    cand = metrics.candidate_metrics([0, 0, 3, -1])
    assert cand["hr@1"] == pytest.approx(2 / 3)
    assert cand["valid_ratio"] == pytest.approx(3 / 4)
    assert cand["vhr@1"] == pytest.approx(1 / 2)
    assert cand["samples"] == 4
    full = metrics.full_ranking_metrics(torch.tensor([0, 9, 10]), k=10)
    assert full["hr@10"] == pytest.approx(2 / 3)
    assert full["ndcg@10"] == pytest.approx((1 + 1 / math.log2(11)) / 3)


def test_empty_inputs_are_zero() -> None:
    assert metrics.hit_rate([], 10) == 0.0
    assert metrics.valid_hit_rate_at_1([-1, -1]) == 0.0


def test_paired_difference_and_its_interval() -> None:
    a = [0, 0, 0, 3, -1, 0]  # hits: 1 1 1 0 0 1
    b = [0, 2, 5, 0, 0, 1]  # hits: 1 0 0 1 1 0
    diff = np.array([0, 1, 1, -1, -1, 1], dtype=float)
    mean, half = metrics.paired_difference(a, b)
    assert mean == pytest.approx(diff.mean())
    assert half == pytest.approx(1.96 * diff.std(ddof=1) / math.sqrt(6))
    assert metrics.paired_difference(a, a) == (0.0, 0.0)  # a model against itself: no difference, no doubt
    with pytest.raises(ValueError, match="different lengths"):
        metrics.paired_difference([0], [0, 1])
    values = np.array([0.5, 0.0, 1.0, 0.25])
    mean, half = metrics.paired_mean_difference(values, np.zeros(4))
    assert mean == pytest.approx(values.mean()) and half == pytest.approx(1.96 * values.std(ddof=1) / 2)
    assert metrics.paired_mean_difference(np.zeros(0), np.zeros(0)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="different lengths"):
        metrics.paired_mean_difference(np.zeros(1), np.zeros(2))

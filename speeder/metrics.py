"""Ranking metrics for both protocols (docs/data.md#metrics), each with its formula.

All functions take the 0-based rank of the target item in a sample's ranked list: rank r means r
items scored strictly higher than the target (ties count against the model; see `target_rank`).
A rank of -1 marks a sample whose answer was invalid (a generating model that named no candidate
or several): it counts as a miss for HR/NDCG/MRR and lowers ValidRatio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def target_rank(scores: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among its row's scores.

    scores (B, C), target_index (B,) -> (B,) int64. rank = #{c : s_c > s_t} + #{c != t : s_c == s_t},
    so a model that scores everything equally gets the worst rank, not the best.
    """
    target = scores.gather(1, target_index.view(-1, 1))  # (B, 1)
    higher = (scores > target).sum(dim=1)
    ties = (scores == target).sum(dim=1) - 1
    return (higher + ties).long()


def first_choice(scores: torch.Tensor) -> torch.Tensor:
    """The position of each row's highest score, or -1 where that score is tied (B, C) -> (B,) int64.

    The rule of `target_rank`: a tied first place is no one's, so a target is ranked 0 exactly when it is the
    row's first choice.
    """
    top = scores.max(dim=1, keepdim=True).values  # (B, 1)
    unique = (scores == top).sum(dim=1) == 1
    return torch.where(unique, scores.argmax(dim=1), torch.full_like(unique, -1, dtype=torch.long))


def concat_ranks(parts: list[torch.Tensor]) -> np.ndarray:
    """Per-batch int tensors (B_i,) -> one int64 array (sum B_i,) on the CPU (empty for no batches)."""
    return torch.cat([p.cpu() for p in parts]).numpy().astype(np.int64) if parts else np.zeros(0, np.int64)


def _ranks(ranks: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.detach().cpu().numpy()
    return np.asarray(ranks, dtype=np.int64)


def hit_rate(ranks: Sequence[int] | np.ndarray | torch.Tensor, k: int) -> float:
    """HR@K = (1/|S|) sum_s 1[0 <= rank_s < K]: the share of samples whose target is in the top K."""
    r = _ranks(ranks)
    return float(((r >= 0) & (r < k)).mean()) if r.size else 0.0


def ndcg(ranks: Sequence[int] | np.ndarray | torch.Tensor, k: int) -> float:
    """NDCG@K = (1/|S|) sum_s 1[0 <= rank_s < K] / log2(rank_s + 2).

    With one relevant item per sample the ideal DCG is 1, so NDCG is the mean discounted gain.
    """
    r = _ranks(ranks)
    if not r.size:
        return 0.0
    hit = (r >= 0) & (r < k)
    gains = np.where(hit, 1.0 / np.log2(np.clip(r, 0, None) + 2.0), 0.0)
    return float(gains.mean())


def mrr(ranks: Sequence[int] | np.ndarray | torch.Tensor, k: int | None = None) -> float:
    """MRR(@K) = (1/|S|) sum_s 1[0 <= rank_s < K] / (rank_s + 1); K=None means no cut-off."""
    r = _ranks(ranks)
    if not r.size:
        return 0.0
    limit = math.inf if k is None else k
    hit = (r >= 0) & (r < limit)
    return float(np.where(hit, 1.0 / (np.clip(r, 0, None) + 1.0), 0.0).mean())


def valid_ratio(ranks: Sequence[int] | np.ndarray | torch.Tensor) -> float:
    """ValidRatio = (1/|S|) sum_s 1[answer_s names exactly one candidate] = share of rank_s != -1.

    A scoring head always answers validly (ValidRatio = 1 by construction); a generating baseline
    does not.
    """
    r = _ranks(ranks)
    return float((r >= 0).mean()) if r.size else 0.0


def hit_rate_at_1_valid(ranks: Sequence[int] | np.ndarray | torch.Tensor) -> float:
    """HR@1 as LLaRA reports it: over the valid answers only.

    HR@1 = #{s : rank_s = 0} / #{s : rank_s != -1}   (0 when no answer is valid)
    """
    r = _ranks(ranks)
    valid = r >= 0
    return float((r[valid] == 0).mean()) if valid.any() else 0.0


def valid_hit_rate_at_1(ranks: Sequence[int] | np.ndarray | torch.Tensor) -> float:
    """VHR@1 = ValidRatio x HR@1 = #{s : rank_s = 0} / |S|: the LLaRA / Speeder headline metric."""
    return valid_ratio(ranks) * hit_rate_at_1_valid(ranks)


def candidate_metrics(ranks: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, float]:
    """The 20-candidate protocol's figures: HR@1 (over valid answers), ValidRatio, VHR@1, and
    HR@5, NDCG@5, MRR over all samples."""
    r = _ranks(ranks)
    return {
        "hr@1": hit_rate_at_1_valid(r),
        "valid_ratio": valid_ratio(r),
        "vhr@1": valid_hit_rate_at_1(r),
        "hr@5": hit_rate(r, 5),
        "ndcg@5": ndcg(r, 5),
        "mrr": mrr(r),
        "samples": int(r.size),
    }


def full_ranking_metrics(ranks: Sequence[int] | np.ndarray | torch.Tensor, k: int = 10) -> dict[str, float]:
    """The full-ranking protocol's figures: HR@K, NDCG@K, MRR@K over the whole catalog."""
    r = _ranks(ranks)
    return {f"hr@{k}": hit_rate(r, k), f"ndcg@{k}": ndcg(r, k), f"mrr@{k}": mrr(r, k), "samples": int(r.size)}


def paired_difference(ranks_a: Sequence[int] | np.ndarray | torch.Tensor,
                      ranks_b: Sequence[int] | np.ndarray | torch.Tensor, k: int = 1) -> tuple[float, float]:
    """HR@K of model a minus model b on the same samples, with the half-width of its 95% interval.

    d_s = 1[rank_a,s < K] - 1[rank_b,s < K] (invalid answers are misses); mean(d) +- 1.96 sd(d) / sqrt(|S|).
    Both models answer the same users, so the paired interval is much narrower than two separate ones.
    """
    a, b = _ranks(ranks_a), _ranks(ranks_b)
    if a.shape != b.shape:
        raise ValueError(f"paired ranks of different lengths: {a.size} and {b.size}")
    return paired_mean_difference(((a >= 0) & (a < k)).astype(float), ((b >= 0) & (b < k)).astype(float))


def paired_mean_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """mean(a - b) over the same samples (S,) and the half-width of its 95% interval, 1.96 sd(a - b) / sqrt(S)
    (0, 0 for no samples)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        raise ValueError(f"paired values of different lengths: {a.size} and {b.size}")
    if not a.size:
        return 0.0, 0.0
    diff = a - b  # (S,)
    half = 1.96 * diff.std(ddof=1) / math.sqrt(diff.size) if diff.size > 1 else 0.0
    return float(diff.mean()), float(half)

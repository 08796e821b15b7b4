"""SPAE: Sequential Position Awareness Enhancement (docs/model.md#spae).

PPL (Position Prompt Learning): a learned table P (max_history, d_llm) added to the history item
tokens; position 0 is the most recent item, so "the last thing the user did" always has the same
embedding whatever the history length.

PPT (Position Proxy Task): for pairs of history positions (i, j), a small head reads the LLM's
hidden states [h_i; h_j; h_i - h_j] and classifies the signed distance j - i (2H - 1 classes).
Loss = L_rec + lambda_ppt * L_ppt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PositionPromptLearning(nn.Module):
    """P (max_history, d): added to item tokens by recency (0 = most recent)."""

    def __init__(self, max_history: int, d: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(max_history, d))  # zero init: starts as a no-op

    def forward(self, recency: torch.Tensor) -> torch.Tensor:
        """recency (K,) int64 in [0, max_history) -> (K, d)."""
        return self.table[recency.clamp(max=self.table.shape[0] - 1)]


class PositionProxyHead(nn.Module):
    """Classifies the signed distance between two history positions from their hidden states."""

    def __init__(self, d: int, max_history: int, hidden: int = 256) -> None:
        super().__init__()
        self.max_history = max_history
        self.net = nn.Sequential(nn.Linear(3 * d, hidden), nn.GELU(), nn.Linear(hidden, 2 * max_history - 1))

    def forward(self, h_i: torch.Tensor, h_j: torch.Tensor) -> torch.Tensor:
        """h_i, h_j (P, d) -> logits (P, 2H - 1); class c means j - i = c - (H - 1)."""
        return self.net(torch.cat([h_i, h_j, h_i - h_j], dim=-1))


def sample_position_pairs(lengths: torch.Tensor, pairs_per_sample: int,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (i, j) pairs of distinct history positions for each sample with >= 2 items.

    lengths (B,) -> (row (P,), i (P,), j (P,)) with positions counted oldest-first in 0..len-1.
    The generator comes from the training loop (seeded per step), so runs are reproducible.
    """
    rows = torch.nonzero(lengths >= 2).flatten().repeat_interleave(pairs_per_sample)  # (P,)
    if rows.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=lengths.device)
        return empty, empty, empty
    n = lengths[rows].float()
    u = torch.rand(rows.numel(), 2, generator=generator, device="cpu").to(lengths.device)
    i = (u[:, 0] * n).long()
    # j uniform over the other n-1 positions: draw in 0..n-2 and skip over i.
    j = (u[:, 1] * (n - 1)).long()
    j = j + (j >= i).long()
    return rows, i, j


def position_proxy_loss(head: PositionProxyHead, h_i: torch.Tensor, h_j: torch.Tensor,
                        i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the signed distance j - i. h_i, h_j (P, d); i, j (P,) -> scalar."""
    if i.numel() == 0:
        return h_i.sum() * 0.0
    target = (j - i) + (head.max_history - 1)
    return F.cross_entropy(head(h_i, h_j).float(), target)

"""Popularity: score every item by its number of train interactions (RecBole's Pop)."""

from __future__ import annotations

import numpy as np
import torch


class Popularity:
    """scores(item) = #train interactions of the item; the same ranking for every user."""

    def __init__(self, num_items: int, train_items: np.ndarray) -> None:
        counts = np.bincount(np.asarray(train_items, dtype=np.int64), minlength=num_items)[:num_items]
        self.counts = torch.from_numpy(counts.astype(np.float32))  # (N,)

    def score_candidates(self, candidates: torch.Tensor) -> torch.Tensor:
        """candidates (B, C) -> (B, C)."""
        return self.counts[candidates]

    def score_catalog(self, batch_size: int) -> torch.Tensor:
        """-> (B, N): the same popularity row for every user."""
        return self.counts.expand(batch_size, -1).clone()

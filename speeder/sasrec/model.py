"""SASRec's model: the Transformer, its input convention and its losses (see speeder.sasrec)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

PAD = -1  # external padding id in a right-aligned item sequence


def pad_sequences(sequences: Sequence[np.ndarray], max_length: int) -> torch.Tensor:
    """Right-align the last `max_length` items of each sequence, left-padded with PAD.

    sequences: B arrays of item ids, oldest first -> (B, L) int64 with L = min(max_length, longest).
    """
    width = max(1, min(max_length, max((len(s) for s in sequences), default=1)))
    out = np.full((len(sequences), width), PAD, dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = np.asarray(seq, dtype=np.int64)[-width:]
        if tail.size:
            out[row, width - tail.size:] = tail
    return torch.from_numpy(out)


def _check_item_ids(values: np.ndarray, num_items: int, what: str) -> None:
    if values.size and (values.min() < 0 or values.max() >= num_items):
        bad = values[(values < 0) | (values >= num_items)][0]
        raise ValueError(f"{what}: item id {int(bad)} is outside 0..{num_items - 1}")


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout from `rand >= p`: same distribution as F.dropout, ~3-4x faster on CPU, where
    F.dropout's bernoulli_ was a quarter of a SASRec training step."""
    if not training or p == 0.0:
        return x
    keep = torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))  # (...) in {0, 1/(1-p)}, no bool copy
    return x * keep


class SASRecLayer(nn.Module):
    """One post-LN Transformer layer, RecBole's `TransformerLayer` (MultiHeadAttention + FeedForward)."""

    def __init__(self, hidden_size: int, num_heads: int, inner_size: int, dropout: float,
                 attn_dropout: float, layer_norm_eps: float) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.p = dropout
        self.attn_p = attn_dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)  # RecBole's query/key/value, fused
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.attn_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.ffn_in = nn.Linear(hidden_size, inner_size)
        self.ffn_out = nn.Linear(inner_size, hidden_size)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x (B, L, D), mask (B, 1, L, L) additive -> (B, L, D), or (B, 1, D) with last_only.

        last_only computes queries, the FFN and the output for the last position only: with causal
        attention that output is identical, and the last layer needs nothing else.
        """
        b, length, d = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(b, length, 3, h, d // h).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, Dh)
        if last_only:
            x, q, mask = x[:, -1:], q[:, :, -1:], mask[:, :, -1:]
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h) + mask  # (B, H, Lq, L)
        probs = fast_dropout(scores.softmax(-1), self.attn_p, self.training)
        ctx = (probs @ v).transpose(1, 2).reshape(b, -1, d)  # (B, Lq, D)
        x = self.attn_norm(x + fast_dropout(self.dense(ctx), self.p, self.training))
        ffn = self.ffn_out(F.gelu(self.ffn_in(x)))  # exact (erf) gelu, as RecBole's
        return self.ffn_norm(x + fast_dropout(ffn, self.p, self.training))


class SASRec(nn.Module):
    """Self-attentive sequential recommender; RecBole's model contract with typed arguments.

    Items are 0..num_items-1; sequences are right-aligned, left-padded with PAD (-1), oldest first.
    """

    def __init__(self, num_items: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
                 inner_size: int = 256, dropout: float = 0.5, max_length: int = 50,
                 attn_dropout: float | None = None, layer_norm_eps: float = 1e-12,
                 initializer_range: float = 0.02) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        attn_dropout = dropout if attn_dropout is None else attn_dropout
        # Plain metadata so a checkpoint (safetensors + JSON) can rebuild the module: SASRec(**hparams).
        self.hparams = dict(num_items=num_items, hidden_size=hidden_size, num_layers=num_layers,
                            num_heads=num_heads, inner_size=inner_size, dropout=dropout,
                            max_length=max_length, attn_dropout=attn_dropout,
                            layer_norm_eps=layer_norm_eps, initializer_range=initializer_range)
        self.num_items = num_items
        self.max_length = max_length
        self.item_embedding = nn.Embedding(num_items + 1, hidden_size, padding_idx=0)  # row 0: padding
        self.position_embedding = nn.Embedding(max_length, hidden_size)
        self.input_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.p = dropout
        self.layers = nn.ModuleList(
            SASRecLayer(hidden_size, num_heads, inner_size, dropout, attn_dropout, layer_norm_eps)
            for _ in range(num_layers)
        )
        self.apply(lambda m: self._init_weights(m, initializer_range))

    @staticmethod
    def _init_weights(module: nn.Module, std: float) -> None:
        # RecBole: N(0, std) for Linear and Embedding weights, zero biases, LayerNorm (1, 0).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:
        """item_seq (B, L) int64, right-aligned, PAD-padded -> (B, D): the state after the last item.

        Only the last `max_length` columns are used.
        """
        return self._encode(item_seq, last_only=True)[:, -1]  # (B, D)

    def forward_all(self, item_seq: torch.Tensor) -> torch.Tensor:
        """item_seq (B, L) -> (B, L, D): the state after every item (column t sees columns <= t only)."""
        return self._encode(item_seq, last_only=False)

    def _encode(self, item_seq: torch.Tensor, last_only: bool) -> torch.Tensor:
        seq = item_seq[:, -self.max_length:] + 1  # (B, L), 0 = padding
        present = seq > 0  # (B, L)
        positions = (present.long().cumsum(1) - 1).clamp(min=0)  # oldest item in the window -> 0
        x = self.item_embedding(seq) + self.position_embedding(positions)  # (B, L, D)
        x = fast_dropout(self.input_norm(x), self.p, self.training)
        length = seq.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        allowed = causal & present[:, None, None, :]  # (B, 1, L, L)
        # RecBole's additive -10000 (not -inf): a padding query row stays finite instead of NaN.
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=seq.device).masked_fill(~allowed, -10000.0)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, last_only=last_only and i == len(self.layers) - 1)
        return x  # (B, L, D), or (B, 1, D) with last_only

    def item_embeddings(self) -> torch.Tensor:
        """(N, D) item table without the padding row (a view with grad; `.detach()` it for seq_emb)."""
        return self.item_embedding.weight[1:]

    def full_sort_predict(self, item_seq: torch.Tensor) -> torch.Tensor:
        """item_seq (B, L) -> (B, N) scores of every item: <h, e_i>."""
        return self.forward(item_seq) @ self.item_embeddings().T

    def predict(self, item_seq: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """item_seq (B, L), candidates (B, C) item ids -> (B, C) scores."""
        h = self.forward(item_seq)  # (B, D)
        cand = self.item_embedding(candidates + 1)  # (B, C, D)
        return torch.einsum("bd,bcd->bc", h, cand)

    def all_position_logits(self, item_seq: torch.Tensor) -> torch.Tensor:
        """item_seq (B, L) -> (B, L', N) scores of every item after every column, L' = min(L, max_length)."""
        return self.forward_all(item_seq) @ self.item_embeddings().T

    def calculate_loss(self, item_seq: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """item_seq (B, L), target (B,) -> scalar cross-entropy over all N items."""
        return F.cross_entropy(self.full_sort_predict(item_seq), target)

    def all_position_loss(self, item_seq: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """item_seq (B, L), targets (B, L) with the next item after each column (PAD: not supervised)
        -> scalar cross-entropy over all N items, averaged over the supervised positions."""
        hidden = self.forward_all(item_seq)  # (B, L', D), L' = min(L, max_length)
        keep = targets[:, -hidden.shape[1]:]
        rows = keep >= 0  # (B, L')
        logits = hidden[rows] @ self.item_embeddings().T  # (K, N)
        return F.cross_entropy(logits, keep[rows])

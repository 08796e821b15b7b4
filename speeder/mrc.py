"""MRC: Multimodal Representation Compression (DESIGN 4.2). Every item becomes ONE token.

    text_emb  -> A_t \\
    image_emb -> A_v  > [x_t, x_v, x_s] -> MoME x L -> learned-query fusion -> A_f -> e_item (d_llm)
    seq_emb   -> A_s /

A MoME block is cross-modal self-attention over an item's modality tokens followed by a separate
feed-forward expert per modality (hard routing: token m goes only to FFN_m). Absent modalities (no
image, no sequence embedding for a new item, or a modality the current MPO stage has not switched on)
are masked out of attention and fusion, never zero-filled. The vision branch is scaled by
tanh(g_v), g_v a learned scalar initialised at 0, so vision enters gradually (MPO stage 2).
Item tokens depend only on item features and MRC weights: a catalog is tokenised once per checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from speeder.schema import MODALITIES


@dataclass
class ItemFeatures:
    """Per-item feature tensors for a catalog of N items (row i = item_id i).

    text (N, d_t), image (N, d_v), sequence (N, d_s); each *_mask (N,) bool says whether the item
    has that modality. A modality the catalog lacks entirely has dim 0 and an all-False mask.
    """

    text: torch.Tensor
    text_mask: torch.Tensor
    image: torch.Tensor
    image_mask: torch.Tensor
    sequence: torch.Tensor
    sequence_mask: torch.Tensor

    @property
    def num_items(self) -> int:
        return self.text.shape[0]

    def dims(self) -> dict[str, int]:
        return {"text": self.text.shape[1], "vision": self.image.shape[1], "sequence": self.sequence.shape[1]}

    def has(self, modality: str) -> bool:
        return bool(self.masks()[modality].any())

    def masks(self) -> dict[str, torch.Tensor]:
        return {"text": self.text_mask, "vision": self.image_mask, "sequence": self.sequence_mask}

    def values(self) -> dict[str, torch.Tensor]:
        return {"text": self.text, "vision": self.image, "sequence": self.sequence}

    def to(self, device: torch.device | str) -> ItemFeatures:
        return ItemFeatures(**{k: v.to(device) for k, v in vars(self).items()})

    def select(self, ids: torch.Tensor) -> ItemFeatures:
        """Rows for item ids (K,) -> an ItemFeatures of K items."""
        return ItemFeatures(**{k: v[ids] for k, v in vars(self).items()})


class Adapter(nn.Module):
    """A_m: LayerNorm (encoders differ wildly in scale) -> Linear -> GELU -> Linear. (N, d_in) -> (N, d)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MoMEBlock(nn.Module):
    """Cross-modal attention over the modality tokens, then one FFN expert per modality (hard routing)."""

    def __init__(self, d: int, num_heads: int, dropout: float, modalities: Iterable[str] = MODALITIES) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.experts = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * d, d))
            for m in self.modalities
        })
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """x (N, M, d) modality tokens in MODALITIES order, present (N, M) bool -> (N, M, d)."""
        h = self.norm1(x)
        a, _ = self.attn(h, h, h, key_padding_mask=~present, need_weights=False)  # (N, M, d)
        x = x + self.dropout(a)
        h = self.norm2(x)
        routed = [self.experts[m](h[:, i]) for i, m in enumerate(self.modalities)]  # M x (N, d)
        x = x + self.dropout(torch.stack(routed, dim=1))
        # Absent tokens carry no information; keep them exactly zero so nothing leaks downstream.
        return torch.where(present.unsqueeze(-1), x, 0.0)


class MRC(nn.Module):
    """Item features -> one token per item in the LLM's embedding space.

    forward(features, active) -> (N, d_llm); `active` is the set of modalities the MPO stage uses.
    """

    def __init__(self, feature_dims: dict[str, int], d_llm: int, *, hidden_size: int = 256, num_layers: int = 2,
                 num_heads: int = 4, dropout: float = 0.1, embed_scale: float = 1.0) -> None:
        super().__init__()
        self.feature_dims = dict(feature_dims)
        d = hidden_size
        self.adapters = nn.ModuleDict({m: Adapter(self.feature_dims[m], d) for m in MODALITIES
                                       if self.feature_dims.get(m, 0) > 0})
        self.modality_embed = nn.Parameter(torch.zeros(len(MODALITIES), d))
        nn.init.normal_(self.modality_embed, std=0.02)
        self.vision_gate = nn.Parameter(torch.zeros(1))  # g_v: tanh(0) = 0, vision starts silent
        self.blocks = nn.ModuleList(MoMEBlock(d, num_heads, dropout) for _ in range(num_layers))
        self.fusion_query = nn.Parameter(torch.randn(d) * 0.02)
        self.fusion = nn.MultiheadAttention(d, num_heads, dropout=dropout, batch_first=True)
        self.fusion_norm = nn.LayerNorm(d)
        self.output = nn.Sequential(nn.Linear(d, d_llm), nn.GELU(), nn.Linear(d_llm, d_llm))
        # Item tokens enter the LLM beside word embeddings: match their per-coordinate scale.
        self.output_norm = nn.LayerNorm(d_llm, elementwise_affine=False)
        self.output_scale = nn.Parameter(torch.tensor([float(embed_scale)]))

    def forward(self, features: ItemFeatures, active: Iterable[str]) -> torch.Tensor:
        """features of N items -> item tokens (N, d_llm)."""
        active = set(active)
        values, masks = features.values(), features.masks()
        n = features.num_items
        d = self.modality_embed.shape[1]
        tokens, present = [], []
        for i, m in enumerate(MODALITIES):
            on = m in active and m in self.adapters
            mask = masks[m].bool() if on else torch.zeros(n, dtype=torch.bool, device=self.modality_embed.device)
            if on:
                x = self.adapters[m](values[m].to(self.modality_embed.dtype))  # (N, d)
                if m == "vision":
                    x = torch.tanh(self.vision_gate) * x
                x = x + self.modality_embed[i]
            else:
                x = self.modality_embed.new_zeros(n, d)
            tokens.append(torch.where(mask.unsqueeze(-1), x, 0.0))  # NaN-safe, unlike x * mask
            present.append(mask)
        x = torch.stack(tokens, dim=1)  # (N, M, d)
        present_m = torch.stack(present, dim=1)  # (N, M)
        if not bool(present_m.any(dim=1).all()):
            missing = int((~present_m.any(dim=1)).sum())
            raise ValueError(f"{missing} item(s) have none of the active modalities {sorted(active)}")
        for block in self.blocks:
            x = block(x, present_m)
        q = self.fusion_query.expand(n, 1, d)  # (N, 1, d)
        pooled, _ = self.fusion(q, x, x, key_padding_mask=~present_m, need_weights=False)  # (N, 1, d)
        out = self.output(self.fusion_norm(pooled.squeeze(1)))  # (N, d_llm)
        return self.output_scale * self.output_norm(out)


def embedding_scale(embeddings: torch.Tensor) -> float:
    """Typical per-coordinate size of a word-embedding table (V, D): the RMS of its entries."""
    return float(embeddings.detach().float().pow(2).mean().sqrt())

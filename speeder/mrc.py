"""MRC: Multimodal Representation Compression (docs/model.md#mrc). Every item becomes ONE token.

    text_emb  -> A_t \\
    image_emb -> A_v  > [x_t, x_v, x_s] -> MoME x L -> learned-query fusion -> A_f -> e_item (d_llm)
    seq_emb   -> A_s /

A MoME block is cross-modal self-attention over an item's modality tokens followed by a separate
feed-forward expert per modality (hard routing: token m goes only to FFN_m). Absent modalities (no
image, no sequence embedding for a new item, or a modality the current MPO stage has not switched on)
are masked out of attention and fusion, never zero-filled. What any token reads from the vision
token (attention and the fusion pool) is scaled by tanh(g_v), g_v a learned scalar initialised at 0:
at g_v = 0 the item token is exactly the token without vision, and vision enters gradually (MPO
stage 2).
Item tokens depend only on item features and MRC weights: a catalog is tokenised once per checkpoint.
"""

from __future__ import annotations

import math
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


def _without(present: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key mask with modality `index` removed -> (safe mask (N, M), rows (N,) that still have a key).

    A row left with no key at all (an item whose only active modality is the removed one) keeps its
    original keys in the safe mask, so attention never sees an all-masked row (NaN, also in backward);
    callers zero those rows' results with `rows`.
    """
    keep = present.clone()
    keep[:, index] = False
    rows = keep.any(dim=1)  # (N,)
    return torch.where(rows.unsqueeze(1), keep, present), rows


def _gated_read(read, present: torch.Tensor, gate: torch.Tensor | None, index: int) -> torch.Tensor:
    """read(mask) attends over the keys of `mask` (N, M). With a gate, the gated modality's keys enter as
    a residual: read(without) + gate * (read(all) - read(without)), exactly read(without) at gate 0."""
    full = read(present)
    if gate is None:
        return full
    keep, rows = _without(present, index)
    without = torch.where(rows.view(-1, *([1] * (full.dim() - 1))), read(keep), 0.0)
    return without + gate * (full - without)


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

    def forward(self, x: torch.Tensor, present: torch.Tensor, gate: torch.Tensor | None = None,
                gated: int = 1) -> torch.Tensor:
        """x (N, M, d) modality tokens in MODALITIES order, present (N, M) bool -> (N, M, d).

        gate: a scalar that scales what every token reads from modality `gated` (vision): at 0 the
        block's output equals the output without that modality, exactly.
        """
        h = self.norm1(x)

        def read(mask: torch.Tensor) -> torch.Tensor:
            return self.attn(h, h, h, key_padding_mask=~mask, need_weights=False)[0]  # (N, M, d)

        x = x + self.dropout(_gated_read(read, present, gate, gated))
        h = self.norm2(x)
        routed = [self._expert(m, h[:, i], present[:, i]) for i, m in enumerate(self.modalities)]  # M x (N, d)
        x = x + self.dropout(torch.stack(routed, dim=1))
        # Absent tokens carry no information; keep them exactly zero so nothing leaks downstream.
        return torch.where(present.unsqueeze(-1), x, 0.0)

    def _expert(self, modality: str, h: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """FFN_m on the items that have modality m only (h (N, d), present (N,)) -> (N, d), zero elsewhere:
        a modality the catalog or the stage lacks costs nothing (a third of MRC's time on ML-100K)."""
        if bool(present.all()):
            return self.experts[modality](h)
        out = torch.zeros_like(h)
        if bool(present.any()):
            out = out.index_put((present,), self.experts[modality](h[present]))
        return out


class MRC(nn.Module):
    """Item features -> one token per item in the LLM's embedding space.

    forward(features, active) -> (N, d_llm); `active` is the set of modalities the MPO stage uses.

    sequence_skip adds a linear path from the SASRec embedding straight to the token, c * Q s with
    Q (d_llm, d_s) orthonormal columns: inner products of SASRec embeddings are preserved up to c^2, so
    item tokens carry SASRec's similarity structure from the first step of the sequence stage instead of
    only through randomly initialised layers. sequence_scale, the per-coordinate RMS of the SASRec
    table, sets c so the skip lands at the word embeddings' scale with each item's norm kept (SASRec's
    scores depend on it); without it each item's embedding is normalised (direction only).
    """

    def __init__(self, feature_dims: dict[str, int], d_llm: int, *, hidden_size: int = 256, num_layers: int = 2,
                 num_heads: int = 4, dropout: float = 0.1, embed_scale: float = 1.0,
                 sequence_skip: bool = False, sequence_scale: float | None = None, content_mix: float = 1.0) -> None:
        super().__init__()
        if content_mix <= 0:
            raise ValueError(f"content_mix must be > 0, not {content_mix}")
        self.feature_dims = dict(feature_dims)
        d = hidden_size
        self.adapters = nn.ModuleDict({m: Adapter(self.feature_dims[m], d) for m in MODALITIES
                                       if self.feature_dims.get(m, 0) > 0})
        self.modality_embed = nn.Parameter(torch.zeros(len(MODALITIES), d))
        nn.init.normal_(self.modality_embed, std=0.02)
        # g_v: vision is read through tanh(g_v) (attention keys and fusion pool), so at g_v = 0 it
        # contributes exactly nothing and enters gradually as g_v grows (MPO stage 2).
        self.vision_gate = nn.Parameter(torch.zeros(1))
        self.blocks = nn.ModuleList(MoMEBlock(d, num_heads, dropout) for _ in range(num_layers))
        self.fusion_query = nn.Parameter(torch.randn(d) * 0.02)
        self.fusion = nn.MultiheadAttention(d, num_heads, dropout=dropout, batch_first=True)
        self.fusion_norm = nn.LayerNorm(d)
        self.output = nn.Sequential(nn.Linear(d, d_llm), nn.GELU(), nn.Linear(d_llm, d_llm))
        # Item tokens enter the LLM beside word embeddings: match their per-coordinate scale. The scale is
        # embed_scale * exp(log_gain): a step of Adam moves it by a factor ~exp(lr), never across zero.
        self.output_norm = nn.LayerNorm(d_llm, elementwise_affine=False)
        self.register_buffer("embed_scale", torch.tensor([float(embed_scale)]))
        self.log_gain = nn.Parameter(torch.zeros(1))
        d_s = self.feature_dims.get("sequence", 0)
        self.sequence_skip = None
        self.sequence_scale = sequence_scale
        if sequence_skip and d_s > 0:
            self.sequence_skip = nn.Linear(d_s, d_llm, bias=False)
            q, _ = torch.linalg.qr(torch.randn(d_llm, d_s))  # (d_llm, d_s), orthonormal columns
            with torch.no_grad():  # per-coordinate RMS of the skip = embed_scale, like a word embedding
                self.sequence_skip.weight.copy_(q * float(embed_scale) * (d_llm / d_s) ** 0.5
                                                / (sequence_scale or 1.0))
            # The content path's share of a warm token (one with a SASRec embedding): exp(log_content_mix),
            # log-parametrised like log_gain, from content_mix. Started small (0.1), warm tokens are SASRec's
            # skip plus a small content part and the untrained model ranks like SASRec; items without a
            # SASRec embedding (cold, or hidden by sequence dropout) keep the content path at full scale.
            self.log_content_mix = nn.Parameter(torch.tensor([math.log(content_mix)]))

    def sequence_input(self, s: torch.Tensor) -> torch.Tensor:
        """What the sequence skip reads: SASRec vectors (..., d_s) as they are when the table's scale is
        known, else each normalised to unit RMS."""
        if self.sequence_scale:
            return s
        return s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + 1e-12)

    @property
    def output_scale(self) -> torch.Tensor:
        return self.embed_scale * self.log_gain.exp()

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
                x = self.adapters[m](values[m].to(self.modality_embed.dtype)) + self.modality_embed[i]  # (N, d)
            else:
                x = self.modality_embed.new_zeros(n, d)
            tokens.append(torch.where(mask.unsqueeze(-1), x, 0.0))  # NaN-safe, unlike x * mask
            present.append(mask)
        x = torch.stack(tokens, dim=1)  # (N, M, d)
        present_m = torch.stack(present, dim=1)  # (N, M)
        if not bool(present_m.any(dim=1).all()):
            missing = int((~present_m.any(dim=1)).sum())
            raise ValueError(f"{missing} item(s) have none of the active modalities {sorted(active)}")
        vision = MODALITIES.index("vision")
        gate = torch.tanh(self.vision_gate) if bool(present_m[:, vision].any()) else None
        for block in self.blocks:
            x = block(x, present_m, gate, vision)
        q = self.fusion_query.expand(n, 1, d)  # (N, 1, d)

        def pool(mask: torch.Tensor) -> torch.Tensor:
            return self.fusion(q, x, x, key_padding_mask=~mask, need_weights=False)[0].squeeze(1)  # (N, d)

        pooled = _gated_read(pool, present_m, gate, vision)  # (N, d)
        out = self.output_scale * self.output_norm(self.output(self.fusion_norm(pooled)))  # (N, d_llm)
        if self.sequence_skip is not None and "sequence" in active:
            skip = self.sequence_skip(self.sequence_input(values["sequence"].to(out.dtype)))  # (N, d_llm)
            out = torch.where(masks["sequence"].bool().unsqueeze(-1), self.log_content_mix.exp() * out + skip, out)
        return out


def embedding_scale(embeddings: torch.Tensor) -> float:
    """Typical per-coordinate size of a word-embedding table (V, D): the RMS of its entries."""
    return float(embeddings.detach().float().pow(2).mean().sqrt())

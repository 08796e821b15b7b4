"""SpeederModel: MRC item tokens in a one-slot-per-item prompt, an LLM, and a scoring head.

    item features --MRC--> item tokens E (N, D)            (computed once per checkpoint at inference)
    history (B, H) --prompt--> embeds with E[h] + PPL      (B, T, D), T = template + H
    LLM (LoRA) --> last hidden h (B, D) --head--> scores over 20 candidates or all N items, one pass

Score of candidate c: s = tau * cos(W h, e_c), W (D, D) learned, tau a learned temperature
(DESIGN 4.3's <W h, e_c> on unit vectors: well-conditioned whatever the backbone's scale).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from speeder.backbone import Backbone
from speeder.mrc import MRC, ItemFeatures, embedding_scale
from speeder.prompt import PAD_ITEM, PromptBatch, PromptBuilder
from speeder.spae import PositionPromptLearning, PositionProxyHead, position_proxy_loss, sample_position_pairs


@dataclass
class SpeederSettings:
    """Plain settings of the Speeder parts (the platform builds them from its config)."""

    feature_dims: dict[str, int]
    max_history: int = 20
    mrc_hidden: int = 256
    mrc_layers: int = 2
    mrc_heads: int = 4
    mrc_dropout: float = 0.1
    use_ppl: bool = True
    ppt_lambda: float = 0.1
    ppt_pairs: int = 4
    modalities: list[str] = field(default_factory=lambda: ["text", "vision", "sequence"])


class ScoringHead(nn.Module):
    """h (B, D) -> user vector u = W h; scores = tau * cos(u, e_c)."""

    def __init__(self, d: int, init_temperature: float = 20.0) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)
        nn.init.eye_(self.proj.weight)
        # Shape (1,), not (): DeepSpeed's parameter broadcast cannot view 0-dim tensors as bytes.
        self.log_temperature = nn.Parameter(torch.tensor([math.log(init_temperature)]))

    def user_vectors(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(h), dim=-1)  # (B, D)

    def scores(self, u: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """u (B, D) unit user vectors; items (B, C, D) or (N, D) -> (B, C) or (B, N)."""
        e = F.normalize(items, dim=-1)
        s = torch.einsum("bd,bcd->bc", u, e) if e.dim() == 3 else u @ e.T
        return self.log_temperature.exp() * s


class SpeederModel(nn.Module):
    """The whole recommender; only LoRA, MRC, PPL and the heads train (the backbone stays frozen)."""

    def __init__(self, backbone: Backbone, settings: SpeederSettings) -> None:
        super().__init__()
        self.settings = settings
        self.backbone = backbone.model  # registered: LoRA weights are part of this module
        self._backbone = backbone  # tokenizer and helpers (plain attribute)
        d = backbone.hidden_size
        self.prompt = PromptBuilder(backbone.tokenizer)
        scale = embedding_scale(backbone.input_embeddings().weight)
        self.mrc = MRC(settings.feature_dims, d, hidden_size=settings.mrc_hidden, num_layers=settings.mrc_layers,
                       num_heads=settings.mrc_heads, dropout=settings.mrc_dropout, embed_scale=scale)
        self.ppl = PositionPromptLearning(settings.max_history, d) if settings.use_ppl else None
        self.head = ScoringHead(d)
        self.ppt = PositionProxyHead(d, settings.max_history) if settings.ppt_lambda > 0 else None

    # -- item tokens ------------------------------------------------------------------------------
    def item_tokens(self, features: ItemFeatures, active: Iterable[str]) -> torch.Tensor:
        """The catalog's item tokens (N, D) for the active modalities (those also enabled in settings)."""
        active = [m for m in active if m in self.settings.modalities]
        return self.mrc(features, active)

    # -- prompts ----------------------------------------------------------------------------------
    def encode(self, history: torch.Tensor, item_table: torch.Tensor) -> tuple[torch.Tensor, PromptBatch]:
        """history (B, H) left-padded with -1, item_table (N, D) -> hidden states (B, T, D), batch.

        Histories wider than max_history keep their most recent max_history items.
        """
        batch = self.prompt.build(history[:, -self.settings.max_history:])
        embed = self._backbone.input_embeddings()
        embeds = embed(batch.input_ids)  # (B, T, D)
        slots = batch.slot_items != PAD_ITEM  # (B, T)
        tokens = item_table[batch.slot_items[slots]]  # (K, D)
        if self.ppl is not None:
            tokens = tokens + self.ppl(batch.slot_recency[slots])
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), tokens.to(embeds.dtype))
        out = self._backbone.decoder()(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                       position_ids=batch.position_ids, use_cache=False)
        return out.last_hidden_state, batch

    def user_vectors(self, history: torch.Tensor, item_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      PromptBatch]:
        """-> unit user vectors (B, D), all hidden states (B, T, D) and the prompt batch."""
        hidden, batch = self.encode(history, item_table)
        return self.head.user_vectors(hidden[:, -1].float()), hidden, batch

    # -- scoring ----------------------------------------------------------------------------------
    def score_candidates(self, history: torch.Tensor, candidates: torch.Tensor,
                         item_table: torch.Tensor) -> torch.Tensor:
        """history (B, H), candidates (B, C) -> scores (B, C), one forward pass, no decoding."""
        u, _, _ = self.user_vectors(history, item_table)
        return self.head.scores(u, item_table[candidates].float())

    def score_catalog(self, history: torch.Tensor, item_table: torch.Tensor) -> torch.Tensor:
        """history (B, H) -> scores over every item (B, N)."""
        u, _, _ = self.user_vectors(history, item_table)
        return self.head.scores(u, item_table.float())

    # -- training ---------------------------------------------------------------------------------
    def forward(self, history: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor | None,
                features: ItemFeatures, active: list[str], generator: torch.Generator | None = None,
                cached_table: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training losses. history (B, H), target (B,), candidates (B, C) or None for a softmax over
        the whole catalog -> {"loss", "rec_loss", "ppt_loss"} (scalars).

        cached_table (N, D), detached: for the catalog softmax, tokens of items this batch does not
        touch come from it (refreshed by the training loop every few steps), and only the batch's own
        items (history + target) run through MRC with gradients: cached negatives.
        """
        if candidates is None and cached_table is not None:
            ids = torch.unique(torch.cat([history[history >= 0], target]))
            fresh = self.item_tokens(features.select(ids), active)  # (K, D), with gradients into MRC
            item_table = cached_table.detach().to(fresh.dtype).index_put((ids,), fresh)  # (N, D)
            u, hidden, batch = self.user_vectors(history, item_table)
            logits = self.head.scores(u, item_table.float())  # (B, N)
            labels = target
        elif candidates is None:
            item_table = self.item_tokens(features, active)  # (N, D), with gradients into MRC
            u, hidden, batch = self.user_vectors(history, item_table)
            logits = self.head.scores(u, item_table.float())  # (B, N)
            labels = target
        else:
            # Only the items this batch touches need tokens: MRC runs on K <= B * (H + C) items.
            needed = torch.cat([history[history >= 0], candidates.flatten()])
            ids = torch.unique(needed)
            local = torch.full((features.num_items,), -1, dtype=torch.long, device=ids.device)
            local[ids] = torch.arange(len(ids), device=ids.device)
            item_table = self.item_tokens(features.select(ids), active)  # (K, D)
            u, hidden, batch = self.user_vectors(torch.where(history >= 0, local[history.clamp(min=0)], history),
                                                 item_table)
            cands = local[candidates]
            logits = self.head.scores(u, item_table[cands].float())  # (B, C)
            labels = (candidates == target.unsqueeze(1)).float().argmax(dim=1)
        rec = F.cross_entropy(logits, labels)
        ppt = rec.new_zeros(())
        if self.ppt is not None and self.settings.ppt_lambda > 0:
            rows, i, j = sample_position_pairs(batch.lengths, self.settings.ppt_pairs, generator)
            h = hidden.float()
            start = batch.history_slots.shape[1] - batch.lengths[rows]  # first real history column
            ti = batch.history_slots[rows, start + i]
            tj = batch.history_slots[rows, start + j]
            ppt = position_proxy_loss(self.ppt, h[rows, ti], h[rows, tj], i, j)
        return {"loss": rec + self.settings.ppt_lambda * ppt, "rec_loss": rec.detach(), "ppt_loss": ppt.detach()}

    # -- checkpoints ------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything Speeder trains (LoRA, MRC, PPL, heads): the backbone's frozen weights excluded."""
        return {name: p.detach() for name, p in self.named_parameters()
                if not name.startswith("backbone.") or "lora_" in name}


def build_model(backbone_name: str, settings: SpeederSettings, *, lora_r: int = 8, lora_alpha: int = 16,
                lora_dropout: float = 0.05, lora_targets: list[str] | None = None, num_layers: int | None = None,
                dtype: str = "float32", seed: int = 0, backbone_seed: int = 0) -> SpeederModel:
    """Backbone + LoRA + Speeder parts, initialised from `seed` (every worker builds the same model).

    `backbone_seed` initialises the random tiny presets only (their frozen weights are not in
    checkpoints, so it must stay the same between training and loading; pretrained backbones ignore it).
    """
    from speeder.backbone import add_lora, load_backbone

    backbone = load_backbone(backbone_name, num_layers=num_layers, dtype=dtype, seed=backbone_seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        add_lora(backbone, r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                 target_modules=lora_targets or ["q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"])
        model = SpeederModel(backbone, settings)
    return model

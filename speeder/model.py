"""SpeederModel: MRC item tokens in a one-slot-per-item prompt, an LLM, and a scoring head.

    item features --MRC--> item tokens E (N, D)            (computed once per checkpoint at inference)
    history (B, H) --prompt--> embeds with E[h] + PPL      (B, T, D), T = template + H
    LLM (LoRA) --> last hidden h (B, D) --head--> scores over 20 candidates or all N items, one pass

Score of candidate c: s = tau * cos(W h, e_c), W (D, D) learned, tau a learned temperature
(docs/model.md#head: the bilinear <W h, e_c> on unit vectors, well-conditioned whatever the backbone's scale).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from speeder.backbone import Backbone
from speeder.head import ScoringHead
from speeder.mrc import MRC, ItemFeatures, embedding_scale
from speeder.prompt import PAD_ITEM, PromptBatch, PromptBuilder
from speeder.spae import PositionPromptLearning, PositionProxyHead, position_proxy_loss, sample_position_pairs

READOUTS = ("final", "last_slot", "both")


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
    # The defaults are the measured recipe (docs/model.md); the paper's model is readout="final" with
    # dense_weight=0, item_prior, sequence_skip and readout_skip off.
    # final: the user vector reads the prompt's last token (the paper); last_slot: the last history
    # item's slot; both: the sum of the two projections.
    readout: str = "both"
    # Weight of the dense next-item loss: the hidden state at every history slot predicts the next
    # history item (the last one predicts the target), SASRec's objective on top of the LLM.
    dense_weight: float = 1.0
    item_prior: bool = True  # a learned per-item score term b(e_c) = v . e_c beside the cosine
    sequence_skip: bool = True  # MRC's linear path from the SASRec embedding to the token
    # A linear path around the LLM: user (and slot) vectors add W_x x, x the slot's input token (item
    # token + PPL). W_x starts as the identity and the LLM's projections at zero, so before training the
    # model scores like "the last item's token" and the LLM's part grows from there.
    readout_skip: bool = True
    # The sequence encoder's (SASRec's) user state as a user-side path: user vectors add
    # W_s skip(h_seq), skip = MRC's sequence skip (so user and item share SASRec's geometry), W_s from the
    # identity. Needs sequence_skip and a sequence encoder (so off here by default; the platform turns it
    # on with featurize's SASRec); active only with the sequence modality.
    sequence_user: bool = False
    # Score with the items' norms: tau * <u, e_c> / E (E: the norm of a token at the word embeddings' scale)
    # instead of tau * cos(u, e_c), so what a token's norm says (SASRec's item norms, through the sequence
    # skip) reaches the ranking.
    item_norms: bool = True
    # Training only: each step hides the sequence embedding of this share of the items (those with another
    # active modality), so the model learns to rank items by content alone, as it must for items that have
    # none (cold-start items, never in a training sequence). 0 is the paper's model.
    sequence_dropout: float = 0.15
    # Weight of distillation from a teacher (SASRec) at every history slot: KL(teacher || model) of the
    # next-item distributions over the catalog. Beyond the paper; needs teacher logits in forward().
    distill_weight: float = 0.0
    # With the sequence skip: the content path's share of a warm item's token (one with a SASRec embedding),
    # learned from this value. 1.0: content and skip at equal norm (the content path's random start blurs
    # SASRec's ranking until trained); small (0.1): an untrained model ranks like SASRec. Items without a
    # SASRec embedding keep the content path at full scale either way.
    content_mix: float = 1.0
    # With sequence_user: user (and slot) vectors are unit(W_s seq) + the LLM's part instead of
    # unit(W_s seq + the LLM's part), so SASRec's ranking keeps its weight and the LLM learns a correction.
    residual_readout: bool = False
    # A long-term taste term: user (and slot) vectors add W_t m, m the mean item token of the history so far
    # (every item alike, however old), outside the unit norm; W_t from zero. Beyond the paper.
    history_taste: bool = False

    def __post_init__(self) -> None:
        if self.readout not in READOUTS:
            raise ValueError(f"readout: {self.readout!r} is not one of {', '.join(READOUTS)}")
        if not 0.0 <= self.sequence_dropout < 1.0:
            raise ValueError(f"sequence_dropout must be in [0, 1), not {self.sequence_dropout}")
        if self.content_mix <= 0:
            raise ValueError(f"content_mix must be > 0, not {self.content_mix}")
        if self.sequence_user and not self.sequence_skip:
            raise ValueError("sequence_user needs sequence_skip (the user state enters through the same map)")


class SpeederModel(nn.Module):
    """The whole recommender; only LoRA, MRC, PPL and the heads train (the backbone stays frozen)."""

    def __init__(self, backbone: Backbone, settings: SpeederSettings,
                 sequence_encoder: nn.Module | None = None) -> None:
        super().__init__()
        if settings.sequence_user and sequence_encoder is None:
            raise ValueError("sequence_user needs the sequence encoder (featurize's SASRec)")
        self.settings = settings
        self.backbone = backbone.model  # registered: LoRA weights are part of this module
        self._backbone = backbone  # tokenizer and helpers (plain attribute)
        d = backbone.hidden_size
        self.prompt = PromptBuilder(backbone.tokenizer)
        scale = embedding_scale(backbone.input_embeddings().weight)
        # With the sequence encoder at hand, its item table (= the sequence features) gives the skip its scale.
        seq_scale = (embedding_scale(sequence_encoder.item_embeddings())
                     if sequence_encoder is not None and settings.sequence_user else None)
        self.mrc = MRC(settings.feature_dims, d, hidden_size=settings.mrc_hidden, num_layers=settings.mrc_layers,
                       num_heads=settings.mrc_heads, dropout=settings.mrc_dropout, embed_scale=scale,
                       sequence_skip=settings.sequence_skip, sequence_scale=seq_scale,
                       content_mix=settings.content_mix)
        self.ppl = PositionPromptLearning(settings.max_history, d) if settings.use_ppl else None
        self.head = ScoringHead(d, settings.readout, slots=settings.dense_weight > 0 or settings.distill_weight > 0,
                                item_prior=settings.item_prior, input_skip=settings.readout_skip,
                                sequence_user=settings.sequence_user,
                                item_norm=scale * d ** 0.5 if settings.item_norms else None,
                                residual=settings.residual_readout, taste=settings.history_taste)
        self.ppt = PositionProxyHead(d, settings.max_history) if settings.ppt_lambda > 0 else None
        # Frozen: SASRec as featurize trained it (its item embeddings are the sequence features).
        self.sequence_encoder = sequence_encoder if settings.sequence_user else None
        if self.sequence_encoder is not None:
            self.sequence_encoder.requires_grad_(False).eval()

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

    def sequence_states(self, history: torch.Tensor, active: Iterable[str] | None) -> torch.Tensor | None:
        """The sequence encoder's user state after every history column, mapped into token space by MRC's
        sequence skip: history (B, H) catalog ids -> (B, H, D), or None when the path is off (no encoder,
        or the sequence modality is not active)."""
        if self.sequence_encoder is None or "sequence" not in self._active(active):
            return None
        with torch.no_grad():
            self.sequence_encoder.eval()
            h = self.sequence_encoder.forward_all(history[:, -self.settings.max_history:]).float()  # (B, H, d_s)
        if self.mrc.sequence_scale:  # a user state at the items' scale: <skip(h), skip(s_c)> ~ SASRec's <h, s_c>
            h = h * (self.mrc.sequence_scale * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + 1e-12))
        return self.mrc.sequence_skip(self.mrc.sequence_input(h))

    def _active(self, active: Iterable[str] | None) -> list[str]:
        mine = self.settings.modalities
        return list(mine) if active is None else [m for m in active if m in mine]

    def user_vectors(self, history: torch.Tensor, item_table: torch.Tensor, active: Iterable[str] | None = None,
                     states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, PromptBatch]:
        """-> unit user vectors (B, D), all hidden states (B, T, D) and the prompt batch.

        history holds rows of item_table; active: the modalities item_table was made with (None: all of
        the model's); states (B, H, D): `sequence_states` when history is not in catalog ids.
        """
        if states is None:
            states = self.sequence_states(history, active)
        hidden, batch = self.encode(history, item_table)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last_slot = batch.history_slots[:, -1]  # (B,) token index of the most recent item; -1: no history
        has = (last_slot >= 0).unsqueeze(1)  # (B, 1)
        h_final = hidden[:, -1].float()  # (B, D)
        h_last = torch.where(has, hidden[rows, last_slot.clamp(min=0)].float(), h_final)
        x_last = torch.where(has, self.slot_inputs(history[:, -1:].clamp(min=0), item_table)[:, 0], 0.0)
        seq = None if states is None else torch.where(has, states[:, -1], 0.0)
        taste = (self.history_means(history[:, -self.settings.max_history:], item_table)[:, -1]
                 if self.head.taste is not None else None)
        return self.head.user_vectors(h_final, h_last, x_last, seq, taste), hidden, batch

    def history_means(self, history: torch.Tensor, item_table: torch.Tensor) -> torch.Tensor:
        """The mean item token of the history up to each column: history (B, H) of item_table rows, -1 for
        left padding -> (B, H) prefix means (B, H, D) float (0 where no item yet)."""
        real = (history >= 0).unsqueeze(-1)  # (B, H, 1)
        x = torch.where(real, item_table[history.clamp(min=0)].float(), 0.0)  # (B, H, D)
        return x.cumsum(dim=1) / real.float().cumsum(dim=1).clamp(min=1.0)

    def slot_inputs(self, history: torch.Tensor, item_table: torch.Tensor) -> torch.Tensor:
        """The input tokens of history columns, item token + PPL: history (B, H) of real item rows
        (right-aligned: the last column is the most recent) -> (B, H, D) float."""
        x = item_table[history].float()  # (B, H, D)
        if self.ppl is not None:
            recency = torch.arange(history.shape[1] - 1, -1, -1, device=history.device)  # (H,)
            x = x + self.ppl(recency).float()
        return x

    # -- scoring ----------------------------------------------------------------------------------
    def item_scores(self, u: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """u (B, D) user vectors; items (B, C, D) candidate tokens or (N, D) a table -> (B, C) or (B, N)."""
        return self.head.scores(u, items.float())

    def score_candidates(self, history: torch.Tensor, candidates: torch.Tensor, item_table: torch.Tensor,
                         active: Iterable[str] | None = None) -> torch.Tensor:
        """history (B, H), candidates (B, C) -> scores (B, C), one forward pass, no decoding."""
        u, _, _ = self.user_vectors(history, item_table, active)
        return self.item_scores(u, item_table[candidates])

    def score_catalog(self, history: torch.Tensor, item_table: torch.Tensor,
                      active: Iterable[str] | None = None) -> torch.Tensor:
        """history (B, H) -> scores over every item (B, N)."""
        u, _, _ = self.user_vectors(history, item_table, active)
        return self.item_scores(u, item_table)

    # -- training ---------------------------------------------------------------------------------
    def forward(self, history: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor | None,
                features: ItemFeatures, active: list[str], generator: torch.Generator | None = None,
                cached_table: torch.Tensor | None = None,
                teacher_logits: torch.Tensor | None = None,
                negatives: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training losses. history (B, H), target (B,), candidates (B, C) or None for a softmax over
        the whole catalog -> {"loss", "rec_loss", "dense_loss", "distill_loss", "ppt_loss"} (scalars).

        negatives (M,) item ids, with candidates None: a sampled softmax instead of the catalog one. Every
        loss (rec and dense) ranks over one pool shared by the batch: the items it touches (history and
        targets) and these M negatives, each with a fresh token (MRC with gradients on K <= B * (H + 1) + M
        items instead of N); a negative the batch does not touch scores + log(N / M), the sampled-softmax
        correction for its inclusion probability M / N.

        loss = rec + dense_weight * dense + distill_weight * distill + ppt_lambda * ppt.
        teacher_logits (B, H, N): a teacher's catalog scores after every history column (catalog
        softmax only); distill is KL(teacher || model) at every history slot. rec: cross-entropy of the target from the
        user vector, over the catalog or the sample's candidates; dense: of every history slot's next
        item (see SpeederSettings.dense_weight), over the catalog or, with candidates, over every item
        this batch touches.

        cached_table (N, D), detached: for the catalog softmax, tokens of items this batch does not
        touch come from it (refreshed by the training loop every few steps), and only the batch's own
        items (history + target) run through MRC with gradients: cached negatives.
        """
        history = history[:, -self.settings.max_history:]
        states = self.sequence_states(history, active)  # (B, H, D) or None, from catalog ids
        if self.training and self.settings.sequence_dropout > 0 and "sequence" in active:
            features = self._drop_sequences(features, active, generator)
        if teacher_logits is not None and (candidates is not None or negatives is not None):
            raise ValueError("distillation needs the catalog softmax (trainer.loss_pool=catalog)")
        item_table, history, target, candidates, pool_offset = self._loss_pool(
            history, target, candidates, features, active, cached_table, negatives)
        u, hidden, batch = self.user_vectors(history, item_table, active, states)
        if candidates is None:
            rec = F.cross_entropy(self.item_scores(u, item_table) + pool_offset, target)  # over the catalog or pool
        else:
            labels = (candidates == target.unsqueeze(1)).long().argmax(dim=1)  # (B,)
            rec = F.cross_entropy(self.item_scores(u, item_table[candidates]), labels)  # over the candidates (B, C)
        zero = rec.new_zeros(())
        dense = distill = zero
        if self.settings.dense_weight or (self.settings.distill_weight and teacher_logits is not None):
            logits, labels, real = self._slot_logits(hidden, batch, history, target, item_table, states)
            logits = logits + pool_offset
            if self.settings.dense_weight:
                dense = F.cross_entropy(logits, labels)
            if self.settings.distill_weight and teacher_logits is not None:
                teacher = teacher_logits[:, -history.shape[1]:][real].float()  # (K, N)
                distill = F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True,
                                   reduction="batchmean")
        ppt = zero
        if self.ppt is not None and self.settings.ppt_lambda > 0:
            rows, i, j = sample_position_pairs(batch.lengths, self.settings.ppt_pairs, generator)
            h = hidden.float()
            start = batch.history_slots.shape[1] - batch.lengths[rows]  # first real history column
            ti = batch.history_slots[rows, start + i]
            tj = batch.history_slots[rows, start + j]
            ppt = position_proxy_loss(self.ppt, h[rows, ti], h[rows, tj], i, j)
        s = self.settings
        loss = rec + s.dense_weight * dense + s.distill_weight * distill + s.ppt_lambda * ppt
        return {"loss": loss, "rec_loss": rec.detach(), "dense_loss": dense.detach(),
                "distill_loss": distill.detach(), "ppt_loss": ppt.detach()}

    def _loss_pool(self, history: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor | None,
                   features: ItemFeatures, active: list[str], cached_table: torch.Tensor | None,
                   negatives: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                            torch.Tensor | None, torch.Tensor | float]:
        """The item tokens the losses rank over, with gradients into MRC, and the batch in that table's rows:
        -> (item_table (P, D), history (B, H), target (B,), candidates (B, C) or None, offset (P,) or 0.0).

        catalog: P = N, every token fresh (or, with cached_table, only the batch's own items fresh);
        sampled (negatives): P = K pool items, offset + log(N / M) on drawn items the batch does not touch;
        candidates: P = the K items the batch touches (histories and candidates).
        """
        def local_rows(ids: torch.Tensor) -> torch.Tensor:  # catalog id -> row of the pool table (or -1)
            local = torch.full((features.num_items,), -1, dtype=torch.long, device=ids.device)
            local[ids] = torch.arange(len(ids), device=ids.device)
            return local

        real = history[history >= 0]
        if candidates is None and negatives is None:
            if cached_table is None:
                return self.item_tokens(features, active), history, target, None, 0.0  # (N, D)
            ids = torch.unique(torch.cat([real, target]))
            fresh = self.item_tokens(features.select(ids), active)  # (K, D)
            return cached_table.detach().to(fresh.dtype).index_put((ids,), fresh), history, target, None, 0.0
        if candidates is None:
            touched = torch.unique(torch.cat([real, target]))
            ids = torch.unique(torch.cat([touched, negatives]))
            # Sampled-softmax correction (logit - log q): a touched item is in the pool with probability 1, a
            # drawn one with M / N, so drawn logits get + log(N / M) and the pool's normaliser estimates the
            # catalog's instead of under-weighting the items that are rarely drawn.
            offset = torch.where(torch.isin(ids, touched), 0.0, math.log(features.num_items / len(negatives)))
        else:
            in_pool = (candidates == target.unsqueeze(1)).any(dim=1)  # (B,)
            if not bool(in_pool.all()):
                row = int((~in_pool).nonzero()[0])
                raise ValueError(f"candidate loss: target {int(target[row])} of sample {row} is not among its "
                                 f"candidates {candidates[row].tolist()}")
            ids = torch.unique(torch.cat([real, candidates.flatten()]))  # K <= B * (H + C) items
            offset = 0.0
        local = local_rows(ids)
        history = torch.where(history >= 0, local[history.clamp(min=0)], history)
        candidates = None if candidates is None else local[candidates]
        return self.item_tokens(features.select(ids), active), history, local[target], candidates, offset

    def _drop_sequences(self, features: ItemFeatures, active: list[str],
                        generator: torch.Generator | None) -> ItemFeatures:
        """features with the sequence embedding hidden for a random share (settings.sequence_dropout) of the
        N items; an item without another active modality keeps it (it would have no token otherwise)."""
        masks = features.masks()
        others = torch.zeros_like(masks["sequence"], dtype=torch.bool)
        for m in active:
            if m != "sequence":
                others = others | masks[m].bool()
        draw = torch.rand(features.num_items, generator=generator).to(others.device)  # (N,)
        hide = (draw < self.settings.sequence_dropout) & others
        return dataclasses.replace(features, sequence_mask=masks["sequence"].bool() & ~hide)

    def _slot_logits(self, hidden: torch.Tensor, batch: PromptBatch, history: torch.Tensor, target: torch.Tensor,
                     item_table: torch.Tensor, states: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Next-item scores at every real history slot. hidden (B, T, D); history (B, H) and target (B,) as
        row indices of item_table (P, D); states (B, H, D) or None -> logits (K, P), the next item (K,),
        the real columns (B, H)."""
        slots = batch.history_slots  # (B, H) token index of each history column, -1 for padding
        following = torch.cat([history[:, 1:], target.unsqueeze(1)], dim=1)  # (B, H): the item after each
        real = slots >= 0  # left padding: a real column is always followed by a real item or the target
        rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1).expand_as(slots)[real]  # (K,)
        x = self.slot_inputs(history.clamp(min=0), item_table)[real]  # (K, D)
        taste = self.history_means(history, item_table)[real] if self.head.taste is not None else None
        v = self.head.slot_vectors(hidden[rows, slots[real]].float(), x,
                                   None if states is None else states[real], taste)  # (K, D)
        return self.item_scores(v, item_table), following[real], real

    # -- checkpoints ------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything Speeder trains (LoRA, MRC, PPL, heads): the frozen backbone and sequence encoder
        excluded (the encoder is featurize's SASRec, loaded from the features)."""
        return {name: p.detach() for name, p in self.named_parameters()
                if not name.startswith(("backbone.", "sequence_encoder.")) or "lora_" in name}


def build_model(backbone_name: str, settings: SpeederSettings, *, lora_r: int = 8, lora_alpha: int = 16,
                lora_dropout: float = 0.05, lora_targets: list[str] | None = None, num_layers: int | None = None,
                dtype: str = "float32", seed: int = 0, backbone_seed: int = 0,
                sequence_encoder: nn.Module | None = None) -> SpeederModel:
    """Backbone + LoRA + Speeder parts, initialised from `seed` (every worker builds the same model).

    `backbone_seed` initialises the random tiny presets only (their frozen weights are not in
    checkpoints, so it must stay the same between training and loading; pretrained backbones ignore it).
    """
    from speeder.backbone import add_lora, load_backbone
    from speeder.defaults import LORA_TARGETS

    backbone = load_backbone(backbone_name, num_layers=num_layers, dtype=dtype, seed=backbone_seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        add_lora(backbone, r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                 target_modules=lora_targets or list(LORA_TARGETS))
        model = SpeederModel(backbone, settings, sequence_encoder)
    return model

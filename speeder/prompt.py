"""The prompt: a fixed template with ONE placeholder slot per history item (docs/model.md#prompt).

    "A user interacted with <i><i>...<i>. The next item the user will interact with is"

Histories arrive as a left-padded id matrix (B, H) with -1 for padding (oldest item first, most
recent last). Prompts are left-padded too, so every row's last token is the prediction position.
Placeholder slots hold the tokenizer's pad id; their embeddings are replaced by item tokens in
`SpeederModel`, so the prompt costs len(template) + len(history) tokens, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PREFIX = "A user interacted with"
SUFFIX = ". The next item the user will interact with is"
PAD_ITEM = -1


@dataclass
class PromptBatch:
    """Token layout of B prompts of length T (left-padded).

    input_ids (B, T), attention_mask (B, T), position_ids (B, T);
    slot_items (B, T): item id at placeholder slots, -1 elsewhere;
    slot_recency (B, T): 0 for the most recent history item, 1 for the one before, ...; -1 elsewhere;
    history_slots (B, H): index into T of each history position (oldest first), -1 for padding;
    lengths (B,): history lengths.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    slot_items: torch.Tensor
    slot_recency: torch.Tensor
    history_slots: torch.Tensor
    lengths: torch.Tensor

    def to(self, device: torch.device | str) -> PromptBatch:
        return PromptBatch(**{k: v.to(device) for k, v in vars(self).items()})


def pad_histories(histories: list, max_history: int) -> np.ndarray:
    """Ragged histories (each oldest-first) -> (B, max_history) int64, left-padded with -1.

    Longer histories keep their most recent `max_history` items.
    """
    out = np.full((len(histories), max_history), PAD_ITEM, dtype=np.int64)
    for b, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)[-max_history:]
        if h.size:
            out[b, max_history - h.size:] = h
    return out


class PromptBuilder:
    """Builds `PromptBatch`es for one tokenizer and template; the template is tokenised once."""

    def __init__(self, tokenizer, prefix: str = PREFIX, suffix: str = SUFFIX) -> None:
        ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        bos = getattr(tokenizer, "bos_token_id", None)
        # Llama-2 style tokenizers expect BOS first; SmolLM2's "BOS" is a chat marker it never prepends.
        if bos is not None and getattr(tokenizer, "add_bos_token", False):
            ids = [bos] + ids
        self.prefix_ids = torch.tensor(ids, dtype=torch.long)
        self.suffix_ids = torch.tensor(tokenizer(suffix, add_special_tokens=False)["input_ids"], dtype=torch.long)
        self.pad_id = int(tokenizer.pad_token_id)

    @property
    def template_length(self) -> int:
        """Tokens the template costs besides the item slots."""
        return len(self.prefix_ids) + len(self.suffix_ids)

    def build(self, history: torch.Tensor) -> PromptBatch:
        """history (B, H) int64, left-padded with -1 -> PromptBatch with T = template_length + H."""
        b, h = history.shape
        device = history.device
        p, s = len(self.prefix_ids), len(self.suffix_ids)
        t = p + h + s
        lengths = (history >= 0).sum(dim=1)  # (B,)
        start = h - lengths  # (B,) first real token column
        col = torch.arange(t, device=device).expand(b, t)  # (B, T)
        rel = col - start.unsqueeze(1)  # position within the real prompt; < 0 is padding
        attention_mask = (rel >= 0).long()
        input_ids = torch.full((b, t), self.pad_id, dtype=torch.long, device=device)
        in_prefix = (rel >= 0) & (rel < p)
        input_ids[in_prefix] = self.prefix_ids.to(device)[rel[in_prefix]]
        is_slot = (rel >= p) & (rel < p + lengths.unsqueeze(1))
        in_suffix = rel >= p + lengths.unsqueeze(1)
        input_ids[in_suffix] = self.suffix_ids.to(device)[(rel - p - lengths.unsqueeze(1))[in_suffix]]
        # Slot k (0-based among the real items) holds history column start + k.
        hist_col = (start.unsqueeze(1) + (rel - p)).clamp(0, h - 1)  # (B, T)
        slot_items = torch.where(is_slot, history.gather(1, hist_col), torch.full_like(input_ids, PAD_ITEM))
        slot_recency = torch.where(is_slot, lengths.unsqueeze(1) - 1 - (rel - p), torch.full_like(input_ids, -1))
        position_ids = rel.clamp(min=0)
        # History column c (real when c >= start) is item k = c - start, at token start + p + k = p + c.
        hcol = torch.arange(h, device=device).expand(b, h)
        history_slots = torch.where(hcol >= start.unsqueeze(1), hcol + p, torch.full_like(hcol, -1))
        return PromptBatch(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           slot_items=slot_items, slot_recency=slot_recency, history_slots=history_slots,
                           lengths=lengths)

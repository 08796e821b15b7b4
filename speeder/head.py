"""The scoring head: hidden states -> unit user vectors -> scores over item tokens
(docs/model.md#head). Built and owned by SpeederModel (speeder/model.py).

Score of candidate c: s = tau * cos(u, e_c), or tau * <u, e_c> / item_norm with the items' norms, + b(e_c)
with the item prior.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ScoringHead(nn.Module):
    """Hidden states -> unit user vectors; scores = tau * cos(u, e_c), or tau * <u, e_c> / item_norm with the
    items' norms (+ b(e_c) with the item prior).

    proj reads the prompt's last token, slot_proj a history slot (the last-slot readout and the dense
    next-item loss); both start as the identity.
    """

    def __init__(self, d: int, readout: str = "final", slots: bool = False, item_prior: bool = False,
                 input_skip: bool = False, sequence_user: bool = False, item_norm: float | None = None,
                 init_temperature: float = 20.0, residual: bool = False, taste: bool = False) -> None:
        super().__init__()
        self.readout = readout
        self.residual = residual  # with SASRec's state: unit(W_s seq) + the rest, not unit(W_s seq + the rest)
        self.proj = nn.Linear(d, d, bias=False) if readout in ("final", "both") else None
        self.slot_proj = nn.Linear(d, d, bias=False) if slots or readout != "final" else None
        self.input_skip = nn.Linear(d, d, bias=False) if input_skip else None
        self.sequence_skip = nn.Linear(d, d, bias=False) if sequence_user else None
        # History taste: + W_t m, m the mean token of the history so far, outside the unit norm (a score term
        # <W_t m, e_c> beside the cosine); from zero, so an untrained model is the model without it.
        self.taste = nn.Linear(d, d, bias=False) if taste else None
        if self.taste is not None:
            nn.init.zeros_(self.taste.weight)
        for linear in (self.proj, self.slot_proj):
            if linear is not None:  # with the input skip the LLM's part starts at zero
                nn.init.zeros_(linear.weight) if input_skip else nn.init.eye_(linear.weight)
        # The readout starts as SASRec's user state where the model has it (the input skip from zero: the last
        # item's token alone ranks below SASRec), else as the last item's token.
        for linear in (self.input_skip, self.sequence_skip):
            if linear is not None:
                nn.init.eye_(linear.weight)
        if self.input_skip is not None and self.sequence_skip is not None:
            nn.init.zeros_(self.input_skip.weight)
        # Shape (1,), not (): DeepSpeed's parameter broadcast cannot view 0-dim tensors as bytes.
        self.log_temperature = nn.Parameter(torch.tensor([math.log(init_temperature)]))
        self.item_norm = item_norm  # None: cosine scores; else dot products over this typical token norm
        self.prior = nn.Linear(d, 1, bias=False) if item_prior else None
        if self.prior is not None:
            nn.init.zeros_(self.prior.weight)  # starts as no prior at all

    def user_vectors(self, h_final: torch.Tensor, h_last: torch.Tensor, x_last: torch.Tensor,
                     seq: torch.Tensor | None = None, taste: torch.Tensor | None = None) -> torch.Tensor:
        """h_final (B, D) at the prompt's last token, h_last (B, D) at the last history slot, x_last (B, D)
        that slot's input token, seq (B, D) the sequence encoder's user state in token space, taste (B, D) the
        history's mean item token -> (B, D) user vectors (unit, except with `residual`: unit SASRec part + the
        learnt part, and with the taste term: + W_t taste)."""
        if self.readout == "final":
            u = self.proj(h_final)
        elif self.readout == "last_slot":
            u = self.slot_proj(h_last)
        else:
            u = self.proj(h_final) + self.slot_proj(h_last)
        if self.input_skip is not None:
            u = u + self.input_skip(x_last)
        return self._with_taste(self._with_sequence(u, seq), taste)  # (B, D)

    def _with_taste(self, u: torch.Tensor, taste: torch.Tensor | None) -> torch.Tensor:
        """u (..., D) + W_t taste' (..., D) where the head has the taste term and taste is given; taste' is the mean
        token over the typical token norm (unit-sized, its own length kept) or, scoring by cosines, unit: so W_t
        needs entries of the user vector's size, ~1 / sqrt(D), which a few hundred steps can reach."""
        if self.taste is None or taste is None:
            return u
        taste = F.normalize(taste, dim=-1) if self.item_norm is None else taste / self.item_norm
        return u + self.taste(taste)

    def _with_sequence(self, u: torch.Tensor, seq: torch.Tensor | None) -> torch.Tensor:
        """The LLM's (and readout skip's) part u (..., D) with SASRec's user state seq (..., D) or None.

        Default: unit(u + W_s seq). Residual: unit(W_s seq) + u / max(1, |u|), so SASRec's part keeps its
        scale however the learnt part grows, and the learnt part (from zero, its norm capped at SASRec's) is
        a correction on top of SASRec's ranking.
        """
        if self.sequence_skip is None or seq is None:
            return F.normalize(u, dim=-1)
        if self.residual:
            return F.normalize(self.sequence_skip(seq), dim=-1) + u / u.norm(dim=-1, keepdim=True).clamp(min=1.0)
        return F.normalize(u + self.sequence_skip(seq), dim=-1)

    def slot_vectors(self, h: torch.Tensor, x: torch.Tensor, seq: torch.Tensor | None = None,
                     taste: torch.Tensor | None = None) -> torch.Tensor:
        """h (K, D) at history slots, x (K, D) their input tokens, seq (K, D) the sequence encoder's state
        after them in token space, taste (K, D) the mean item token of the history up to them -> vectors (K, D)
        for the next item (as `user_vectors`)."""
        v = self.slot_proj(h)
        if self.input_skip is not None:
            v = v + self.input_skip(x)
        return self._with_taste(self._with_sequence(v, seq), taste)

    def scores(self, u: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """u (B, D) unit user vectors; items (B, C, D) or (N, D) -> (B, C) or (B, N)."""
        e = F.normalize(items, dim=-1) if self.item_norm is None else items / self.item_norm
        s = torch.einsum("bd,bcd->bc", u, e) if e.dim() == 3 else u @ e.T
        s = self.log_temperature.exp() * s
        if self.prior is not None:
            s = s + self.prior(items).squeeze(-1)  # (B, C) or (N,), broadcast over users
        return s

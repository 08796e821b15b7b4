"""A multi-token LLM recommender in the LLaRA style: the reference for Speeder's speed ratios.

Every item is spelled out as its title tokens plus one behaviour token (its SASRec embedding through
an MLP projector: LLaRA's hybrid item representation). Candidates are listed by title in the prompt;
the model GENERATES an answer, which is matched to the candidates: valid iff it names exactly one.

    "This user has interacted with Toy Story (1995) <b>, Heat (1995) <b>, ... . Choose the next item
     from these candidates: Fargo (1996) <b>, ... . The answer is" -> " Fargo (1996)<eos>"

Training is teacher-forced language modelling on the answer tokens; LoRA on the same backbone and
target modules as Speeder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from speeder.backbone import Backbone
from speeder.prompt import PAD_ITEM

PREFIX = "This user has interacted with"
MIDDLE = ". Choose the next item from these candidates:"
SUFFIX = ". The answer is"
CATALOG_SUFFIX = ". The next item the user will interact with is"
IGNORE = -100


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


class LlaraRecommender(nn.Module):
    """Titles + behaviour tokens in, a generated title out."""

    def __init__(self, backbone: Backbone, titles: Sequence[str], behaviour: torch.Tensor | None,
                 max_title_tokens: int = 16) -> None:
        super().__init__()
        self.backbone = backbone.model
        self._backbone = backbone
        tok = backbone.tokenizer
        self.titles = list(titles)
        self._norm_titles = [_normalise(t) for t in self.titles]
        self.title_ids = [tok(" " + t, add_special_tokens=False)["input_ids"][:max_title_tokens] for t in titles]
        self.max_title_tokens = max_title_tokens

        def ids(text: str) -> list[int]:
            return tok(text, add_special_tokens=False)["input_ids"]

        self.prefix, self.middle, self.suffix = ids(PREFIX), ids(MIDDLE), ids(SUFFIX)
        self.catalog_suffix, self.sep = ids(CATALOG_SUFFIX), ids(",")
        self.pad_id, self.eos_id = int(tok.pad_token_id), int(tok.eos_token_id)
        d = backbone.hidden_size
        if behaviour is not None:
            self.register_buffer("behaviour", behaviour.float(), persistent=False)  # (N, d_s)
            self.projector = nn.Sequential(nn.Linear(behaviour.shape[1], d), nn.GELU(), nn.Linear(d, d))
        else:
            self.behaviour, self.projector = None, None

    # -- prompts ----------------------------------------------------------------------------------
    def _item(self, item: int, ids: list[int], slots: list[tuple[int, int]]) -> None:
        ids.extend(self.title_ids[item])
        if self.projector is not None:
            slots.append((len(ids), item))
            ids.append(self.pad_id)  # the behaviour token's slot; its embedding is replaced

    def prompt(self, history: Sequence[int], candidates: Sequence[int] | None) -> tuple[list[int], list]:
        """Token ids of one prompt and its behaviour slots [(position, item)]; candidates None = no list."""
        ids, slots = list(self.prefix), []
        for n, item in enumerate(i for i in history if i != PAD_ITEM):
            if n:
                ids.extend(self.sep)
            self._item(int(item), ids, slots)
        if candidates is None:
            ids.extend(self.catalog_suffix)
            return ids, slots
        ids.extend(self.middle)
        for n, item in enumerate(candidates):
            if n:
                ids.extend(self.sep)
            self._item(int(item), ids, slots)
        ids.extend(self.suffix)
        return ids, slots

    def _batch(self, rows: list[tuple[list[int], list, list[int]]]) -> dict[str, torch.Tensor]:
        """Left-pad (prompt + answer) rows -> input embeddings, mask, positions, labels."""
        width = max(len(p) + len(a) for p, _, a in rows)
        b = len(rows)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        labels = torch.full((b, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        slot_rows, slot_cols, slot_items = [], [], []
        for r, (prompt, slots, answer) in enumerate(rows):
            full = prompt + answer
            start = width - len(full)
            input_ids[r, start:] = torch.tensor(full)
            mask[r, start:] = 1
            if answer:
                labels[r, width - len(answer):] = torch.tensor(answer)
            for pos, item in slots:
                slot_rows.append(r)
                slot_cols.append(start + pos)
                slot_items.append(item)
        embeds = self._backbone.input_embeddings()(input_ids)  # (B, T, D)
        if slot_items:
            behaviour = self.projector(self.behaviour[torch.tensor(slot_items)]).to(embeds.dtype)  # (K, D)
            embeds = embeds.index_put((torch.tensor(slot_rows), torch.tensor(slot_cols)), behaviour)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, "labels": labels}

    def prompt_lengths(self, history: torch.Tensor, candidates: torch.Tensor | None) -> list[int]:
        return [len(self.prompt(h.tolist(), None if candidates is None else c.tolist())[0])
                for h, c in zip(history, candidates if candidates is not None else [None] * len(history),
                                strict=True)]

    # -- training ---------------------------------------------------------------------------------
    def forward(self, history: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        """Teacher-forced LM loss on the answer (target title + EOS). history (B, H), target (B,)."""
        rows = []
        for b in range(len(target)):
            prompt, slots = self.prompt(history[b].tolist(), None if candidates is None else candidates[b].tolist())
            rows.append((prompt, slots, self.title_ids[int(target[b])] + [self.eos_id]))
        batch = self._batch(rows)
        out = self.backbone(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                            position_ids=batch["position_ids"], use_cache=False)
        logits = out.logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=IGNORE)

    # -- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, history: torch.Tensor, candidates: torch.Tensor | None,
                 max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers (decoded text), one per row."""
        rows = [(*self.prompt(history[b].tolist(), None if candidates is None else candidates[b].tolist()), [])
                for b in range(len(history))]
        batch = self._batch(rows)
        out = self.backbone.generate(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                                     max_new_tokens=max_new_tokens or self.max_title_tokens + 1, do_sample=False,
                                     pad_token_id=self.pad_id, eos_token_id=self.eos_id)
        return self._backbone.tokenizer.batch_decode(out, skip_special_tokens=True)

    def match(self, answer: str, pool: Sequence[int]) -> int | None:
        """The one item of `pool` whose title the answer names; None when it names none or several."""
        text = _normalise(answer)
        named = [i for i in pool if self._norm_titles[int(i)] and self._norm_titles[int(i)] in text]
        # A title contained in a longer named title ("Heat" in "Heathers") is not a second answer.
        named = [i for i in named if not any(j != i and self._norm_titles[int(i)] in self._norm_titles[int(j)]
                                             for j in named)]
        return int(named[0]) if len(set(named)) == 1 else None

    def rank_candidates(self, history: torch.Tensor, candidates: torch.Tensor, target: torch.Tensor) -> np.ndarray:
        """Ranks for the candidate protocol: 0 = named the target, 1 = named another, -1 = invalid."""
        answers = self.generate(history, candidates)
        ranks = []
        for answer, cands, t in zip(answers, candidates.tolist(), target.tolist(), strict=True):
            item = self.match(answer, cands)
            ranks.append(-1 if item is None else (0 if item == t else 1))
        return np.asarray(ranks, dtype=np.int64)

"""The synthetic generator's truth on a test split: what a model can expect there, and where hits come from
(docs/benchmarks.md#by-kind-of-target, docs/data.md#synthetic).

Each candidate of a sample gets its tier, the generator's odds of drawing it next (its rule, data/synthetic.py):

    3  the last history item's successor, not yet seen (drawn with probability markov_strength)
    2  an item of the user's preferred group (estimated from the history, see `preferred_group`)
    1  an item sharing the preferred group's category or colour (the related pool)
    0  any other item (noise)

Within a tier every candidate is equally likely, so ranking by tier is the generator's own ranking up to ties,
and even that ranking hits a sample only with probability 1 / n, n the candidates in its best tier: on the
draws from the related pool (about a third of the targets) HR@1 is a lottery among ~5-9 equally likely items.
Its expected HR@1 is the reference ceiling (a model could only beat it where the group estimate is wrong);
per model, the share of samples whose target it ranks within the best tier's first n places says how well it
knows the odds, which HR@1 alone hides under the lottery's noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from speeder import schema
from speeder.loop import Samples
from speeder_platform import storage

if TYPE_CHECKING:
    from speeder_platform.data.synthetic import SyntheticCatalog


@dataclass
class SyntheticTruth:
    """Per test sample (S of them), from the generator's truth."""

    successor: np.ndarray  # (S,) bool: the target is the last history item's successor
    top: np.ndarray  # (S,) int: candidates in the sample's best tier (n >= 1)
    target_on_top: np.ndarray  # (S,) bool: the target is one of them

    def ceiling(self) -> dict[str, float]:
        """Expected HR@1 of the generator's ranking (ties drawn at random): on all, successor and other targets,
        and lottery_sd, the standard deviation of its HR@1 over the draws alone (how far luck moves any model)."""
        expected = np.where(self.target_on_top, 1.0 / self.top, 0.0)  # (S,)
        sd = float(np.sqrt((expected * (1 - expected)).sum()) / len(expected)) if len(expected) else float("nan")
        return {"all": _mean(expected), "successor": _mean(expected[self.successor]),
                "other": _mean(expected[~self.successor]), "lottery_sd": sd}

    def by_target(self, ranks: np.ndarray) -> dict[str, float]:
        """A model's ranks (S,) of the target among the candidates (0-based) ->

        successor / other: HR@1 on each kind of target; in_top / in_top_other: of the samples whose target is in
        the best tier (all of them / those whose target is not the successor), the share the model ranks within
        that tier's first n places (1.0 for the generator's ranking).
        """
        ranks = np.asarray(ranks)
        hits = ranks == 0
        in_top = self.target_on_top & (ranks < self.top)  # (S,)
        on_top_other = self.target_on_top & ~self.successor
        return {"successor": _mean(hits[self.successor]), "other": _mean(hits[~self.successor]),
                "in_top": _mean(in_top[self.target_on_top]), "in_top_other": _mean(in_top[on_top_other])}


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else float("nan")


def preferred_group(history: np.ndarray, truth: SyntheticCatalog, num_colors: int) -> int:
    """The user's preferred group from a history (H',) of generator indices: the group whose related pool
    (same category or colour) holds the most history items, as every draw but noise does; on a tie the group
    with the most history items, then the earliest seen. (A history cut to its last max_history items often
    no longer shows the preferred group itself, only its related draws and their successor chains.)"""
    groups = np.arange(int(truth.group.max()) + 1)  # (G,)
    related = ((truth.category[history][None, :] == (groups // num_colors)[:, None])
               | (truth.colour[history][None, :] == (groups % num_colors)[:, None])).sum(1)  # (G,)
    members = np.bincount(truth.group[history], minlength=len(groups))  # (G,)
    first = np.full(len(groups), len(history))
    for position, g in reversed(list(enumerate(truth.group[history].tolist()))):
        first[g] = position
    return int(np.lexsort((first, -members, -related))[0])


def synthetic_truth(data_uri: str, samples: Samples) -> SyntheticTruth | None:
    """The tiers of `samples`' candidates on a synthetic catalog prepared at data_uri; None on other data."""
    from speeder_platform.config import SyntheticConfig
    from speeder_platform.data.synthetic import SOURCE, item_source_id, synthetic_catalog

    meta = storage.read_json(storage.join(data_uri, schema.META_FILE))
    if meta.get("source") != SOURCE or "synthetic" not in meta:
        return None
    cfg = SyntheticConfig(**meta["synthetic"])
    truth = synthetic_catalog(cfg)
    items = storage.read_table(storage.join(data_uri, schema.ITEMS_FILE), columns=[schema.ITEM_ID, schema.SOURCE_ID])
    index_of = {item_source_id(i): i for i in range(cfg.num_items)}
    gen = np.full(items.num_rows, -1, np.int64)  # item id -> the generator's item index
    gen[items.column(schema.ITEM_ID).to_numpy()] = [index_of.get(s, -1) for s in
                                                    items.column(schema.SOURCE_ID).to_pylist()]
    if (gen < 0).any():
        raise ValueError(f"{data_uri}: items the synthetic generator did not make (source_id not item-NNNNN)")
    n = len(samples)
    successor, top, on_top = np.zeros(n, bool), np.ones(n, np.int64), np.zeros(n, bool)
    for s in range(n):
        history = gen[samples.history[s][samples.history[s] >= 0]]  # (H',) oldest first
        candidates = gen[samples.candidates[s]]  # (C,)
        target = int(gen[samples.target[s]])
        if not len(history):  # no history: every candidate is as likely as the next
            top[s], on_top[s] = len(candidates), True
            continue
        nxt = int(truth.successor[history[-1]])
        successor[s] = nxt == target
        group = preferred_group(history, truth, cfg.num_colors)
        category, colour = divmod(group, cfg.num_colors)
        tiers = np.where((candidates == nxt) & ~np.isin(candidates, history), 3,
                         np.where(truth.group[candidates] == group, 2,
                                  np.where((truth.category[candidates] == category)
                                           | (truth.colour[candidates] == colour), 1, 0)))  # (C,)
        best = tiers.max()
        top[s] = int((tiers == best).sum())
        on_top[s] = bool(tiers[candidates == target].max(initial=-1) == best)
    return SyntheticTruth(successor=successor, top=top, target_on_top=on_top)

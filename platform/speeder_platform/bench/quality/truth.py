"""The synthetic generator's truth on a test split: what a model can expect there, and where hits come from
(docs/benchmarks.md#by-kind-of-target, docs/data.md#synthetic).

The generator is a function of its config (in the data's meta.json), so it is replayed: every user's preferred
group and whole sequence, and from them the exact odds with which each test target was drawn
(`data.synthetic.next_item_odds`): markov_strength on the last item's successor when unseen, the rest spread over
the unseen items of the user's preferred group (or its related pool, or everything, once the pools are used
up), NOISE over every unseen item.

Given a sample's candidates (the target and negatives drawn uniformly from the items the user never met), each
candidate was the target with probability proportional to its odds. So for a model whose first choice is
candidate f the chance of a hit is odds_f / sum(odds over the candidates): its **expected HR@1**, with the same
expectation as HR@1 and none of the draw's noise. About a third of the targets are uniform draws among ~5-9
equally likely candidates, where HR@1 is a lottery for any model; the expected HR@1 of ranking by the odds is the
reference ceiling, and two models' paired difference in expected HR@1 says which one ranks by the odds more
often, which their HR@1 hides under the lottery's noise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from speeder import schema
from speeder.loop import Samples
from speeder.metrics import first_choice, paired_mean_difference, target_rank
from speeder_platform import storage

if TYPE_CHECKING:
    from speeder_platform.data.synthetic import SyntheticCatalog

log = logging.getLogger(__name__)


@dataclass
class SyntheticTruth:
    """Per test sample (S of them, C candidates each), from the generator's truth."""

    odds: np.ndarray  # (S, C) float: the chance the generator drew each candidate next
    target: np.ndarray  # (S,) int: the target's position among the candidates
    successor_at: np.ndarray  # (S,) int: the position of the last history item's unseen successor, -1 if absent
    in_pool: np.ndarray  # (S, C) bool: in the user's related pool (the preferred group's category or colour)
    near_last: np.ndarray  # (S, C) bool: sharing the last history item's category or colour
    rule_scores: np.ndarray  # (S, C) float: the history-content rule (`content_rule_scores`)

    @property
    def successor(self) -> np.ndarray:
        """(S,) bool: the target is the last history item's successor."""
        return self.successor_at == self.target

    @property
    def top(self) -> np.ndarray:
        """(S,) int: candidates as likely as the likeliest one (n >= 1)."""
        return np.isclose(self.odds, self.odds.max(1, keepdims=True), rtol=1e-9, atol=0).sum(1)

    @property
    def target_on_top(self) -> np.ndarray:
        """(S,) bool: the target is one of them."""
        rows = np.arange(len(self.target))
        return np.isclose(self.odds[rows, self.target], self.odds.max(1), rtol=1e-9, atol=0)

    def expected_hits(self, first: np.ndarray, *, not_successor: bool = False) -> np.ndarray:
        """A model's first choices (S,) (position among the candidates, -1 for a tied first place) -> (S,) the
        chance each is the target given the candidates: odds_first / sum(odds). With `not_successor`, given also
        that the target is not the last item's successor (the successor's odds left out)."""
        odds = self.odds.copy()
        rows = np.arange(len(odds))
        if not_successor:
            has = self.successor_at >= 0
            odds[rows[has], self.successor_at[has]] = 0.0
        first = np.asarray(first, np.int64)
        chosen = np.where(first >= 0, odds[rows, np.maximum(first, 0)], 0.0)  # (S,)
        total = odds.sum(1)
        return np.divide(chosen, total, out=np.zeros_like(chosen), where=total > 0)

    def generator_first(self) -> np.ndarray:
        """(S,) the generator's own first choice: the likeliest candidate (which of a tie does not change its
        expected hits)."""
        return self.odds.argmax(1)

    def ceiling(self) -> dict[str, float]:
        """Expected HR@1 of ranking by the odds, on all, successor and other targets, and lottery_sd, the standard
        deviation of its HR@1 over the draws alone (how far luck moves any model's HR@1 on these samples)."""
        first = self.generator_first()
        expected = self.expected_hits(first)  # (S,)
        sd = float(np.sqrt((expected * (1 - expected)).sum()) / len(expected)) if len(expected) else float("nan")
        on_top = np.where(self.target_on_top, 1.0 / self.top, 0.0)  # given the target: a draw among the tied
        other = self.expected_hits(first, not_successor=True)
        return {"all": _mean(expected), "successor": _mean(on_top[self.successor]),
                "other": _mean(other[~self.successor]), "lottery_sd": sd}

    def by_target(self, ranks: np.ndarray, first: np.ndarray | None = None) -> dict[str, float]:
        """A model's ranks (S,) of the target among the candidates (0-based), and its first choices (S,) ->

        successor / other: HR@1 on each kind of target; in_top / in_top_other: of the samples whose target is
        among the likeliest candidates (all of them / those whose target is not the successor), the share the
        model ranks within the first n places, n the likeliest candidates (1.0 for ranking by the odds); with
        `first`, expected / expected_other: its expected HR@1 on all targets, and given that the target is not
        the successor.
        """
        ranks = np.asarray(ranks)
        hits = ranks == 0
        on_top, successor = self.target_on_top, self.successor
        in_top = on_top & (ranks < self.top)  # (S,)
        out = {"successor": _mean(hits[successor]), "other": _mean(hits[~successor]),
               "in_top": _mean(in_top[on_top]), "in_top_other": _mean(in_top[on_top & ~successor])}
        if first is not None:
            out.update(expected=_mean(self.expected_hits(first)),
                       expected_other=_mean(self.expected_hits(first, not_successor=True)[~successor]),
                       **self.first_choices(first))
        return out

    def first_choices(self, first: np.ndarray) -> dict[str, float]:
        """Where a model's first choices (S,) fall on the samples whose target is not the successor (and whose
        successor is not a candidate): first_in_pool, in the user's related pool (where the target was drawn);
        first_near_last, outside it but sharing the last item's category or colour; first_elsewhere, the rest
        (a tied first place included)."""
        first = np.asarray(first, np.int64)
        rows = np.flatnonzero(self.successor_at < 0)
        chosen = np.maximum(first[rows], 0)
        pool = self.in_pool[rows, chosen] & (first[rows] >= 0)
        near = ~pool & self.near_last[rows, chosen] & (first[rows] >= 0)
        return {"first_in_pool": _mean(pool), "first_near_last": _mean(near),
                "first_elsewhere": _mean(~pool & ~near)}

    def content_rule(self, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The history-content rule as a model, its ties (whole counts tie often) drawn at random: -> its ranks
        of the targets (S,) and first choices (S,)."""
        scores = torch.from_numpy(self.rule_scores + 1e-3 * np.random.default_rng(seed).random(self.rule_scores.shape))
        return (target_rank(scores, torch.from_numpy(self.target)).numpy(),
                first_choice(scores).numpy())


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else float("nan")


def content_rule_scores(history: np.ndarray, candidates: np.ndarray, catalog: SyntheticCatalog) -> np.ndarray:
    """A rule with no training that knows each item's category and colour and the successor rule: the last
    history item's successor first, then the candidates whose category and colour the history (H',) holds most
    often, every history item alike -> scores (C,): 1000 for the successor + #same category + #same colour."""
    successor = candidates == catalog.successor[history[-1]] if len(history) else np.zeros(len(candidates), bool)
    same = ((catalog.category[candidates][:, None] == catalog.category[history][None, :]).sum(1)
            + (catalog.colour[candidates][:, None] == catalog.colour[history][None, :]).sum(1))  # (C,)
    return 1000.0 * successor + same


def synthetic_truth(data_uri: str, samples: Samples) -> SyntheticTruth | None:
    """The generator's odds for `samples`' candidates on a synthetic catalog prepared at data_uri; None on other
    data, or where prepare dropped generated interactions (the k-core), so the sequences are no longer the ones
    the generator drew. Raises if the samples do not follow the generator's sequences."""
    from speeder_platform.config import SyntheticConfig
    from speeder_platform.data.synthetic import (
        SOURCE,
        generate_users,
        group_pools,
        item_source_id,
        next_item_odds,
        synthetic_catalog,
    )

    meta = storage.read_json(storage.join(data_uri, schema.META_FILE))
    if meta.get("source") != SOURCE or "synthetic" not in meta:
        return None
    cfg = SyntheticConfig(**meta["synthetic"])
    catalog = synthetic_catalog(cfg)
    sequences, groups = generate_users(cfg, catalog)
    counts = meta.get("counts", {})
    if counts.get("users") != cfg.num_users or counts.get("interactions") != sum(map(len, sequences)):
        log.warning("%s: prepare kept %s of %d users and %s of %d interactions; the generator's odds describe "
                    "only the sequences it drew, so HR@1 by kind of target is left out", data_uri,
                    counts.get("users"), cfg.num_users, counts.get("interactions"), sum(map(len, sequences)))
        return None
    items = storage.read_table(storage.join(data_uri, schema.ITEMS_FILE), columns=[schema.ITEM_ID, schema.SOURCE_ID])
    index_of = {item_source_id(i): i for i in range(cfg.num_items)}
    gen = np.full(items.num_rows, -1, np.int64)  # item id -> the generator's item index
    gen[items.column(schema.ITEM_ID).to_numpy()] = [index_of.get(s, -1) for s in
                                                    items.column(schema.SOURCE_ID).to_pylist()]
    if (gen < 0).any():
        raise ValueError(f"{data_uri}: items the synthetic generator did not make (source_id not item-NNNNN)")
    if samples.user_id is None:
        raise ValueError("the synthetic truth needs each sample's user id (to replay that user's sequence)")
    n = len(samples)
    odds = np.zeros(samples.candidates.shape)  # (S, C)
    target, successor_at = np.zeros(n, np.int64), np.full(n, -1, np.int64)
    in_pool, near_last = np.zeros(odds.shape, bool), np.zeros(odds.shape, bool)
    rule = np.zeros(odds.shape)
    related = np.zeros((cfg.num_categories * cfg.num_colors, cfg.num_items), bool)  # (G, N): the generator's pools
    for group in range(len(related)):
        related[group, group_pools(cfg, catalog, group)[1]] = True
    for s in range(n):
        user = int(samples.user_id[s])  # every user kept: ids follow the generator's order (user-NNNNN)
        sequence = sequences[user]
        history = gen[samples.history[s][samples.history[s] >= 0]].tolist()  # oldest first
        candidates = gen[samples.candidates[s]]  # (C,)
        t = int(gen[samples.target[s]])
        at = sequence.index(t) if t in sequence else -1
        if at < 0 or sequence[max(at - len(history), 0):at] != history:
            raise ValueError(f"{data_uri}: user {user}'s sample is not a stretch of the sequence the synthetic "
                             "generator drew for that user (data prepared from another config?)")
        odds[s] = next_item_odds(cfg, catalog, int(groups[user]), sequence[:at])[candidates]
        target[s] = int(np.flatnonzero(candidates == t)[0])
        in_pool[s] = related[groups[user], candidates]
        rule[s] = content_rule_scores(np.asarray(history, np.int64), candidates, catalog)
        if at:
            last = sequence[at - 1]
            near_last[s] = related[catalog.group[last], candidates]  # sharing the last item's category or colour
            where = np.flatnonzero((candidates == catalog.successor[last]) & (odds[s] > 0))
            successor_at[s] = int(where[0]) if len(where) else -1
    return SyntheticTruth(odds=odds, target=target, successor_at=successor_at, in_pool=in_pool,
                          near_last=near_last, rule_scores=rule)


# A reference row of the by-kind table: the history-content rule (content_rule_scores), no training.
CONTENT_RULE = "rule: successor, then the history's categories and colours (truth, no training)"


def synthetic_by_target(truth: SyntheticTruth, rows: dict[str, dict]) -> dict[str, Any]:
    """The synthetic truth's view of every row ranked on all test users, and of the history-content rule: HR@1 by
    kind of target, how often it ranks by the odds, its expected HR@1 and (`expected_vs_speeder`) that minus the
    full model's, paired, and where its first choices fall on the draws from the related pool."""
    ranked = {k: r["ranks"] for k, r in rows.items() if r.get("ranks") is not None and r.get("users_index") is None}
    rule_ranks, rule_first = truth.content_rule()
    ranked[CONTENT_RULE] = {"candidates": rule_ranks, "first": rule_first}
    models = {k: truth.by_target(r["candidates"], r.get("first")) for k, r in ranked.items()}
    ref = rows.get("Speeder", {}).get("ranks", {}).get("first")
    ref_hits = None if ref is None else truth.expected_hits(ref)
    for name, m in models.items():
        first = ranked[name].get("first")
        if ref_hits is not None and first is not None and name != "Speeder":
            mean, half = paired_mean_difference(truth.expected_hits(first), ref_hits)
            m["expected_vs_speeder"] = {"mean": mean, "ci95": half}
    return {"successor_share": float(truth.successor.mean()), "test_users": len(truth.successor),
            "ceiling": truth.ceiling(), "models": models}

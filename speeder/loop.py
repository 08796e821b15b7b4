"""The single-process train / evaluate loop. The Ray Train worker loop calls the same pieces.

    samples = Samples.from_rows(histories, targets, candidates, max_history=20)
    opt = torch.optim.AdamW(apply_stage(model, STAGES[1], lr=1e-3, lora_lr=3e-4))
    for batch in samples.batches(16, shuffle=True, seed=epoch):
        train_step(model, opt, batch, features, STAGES[1].modalities, step=step)
    metrics = evaluate(model, valid, features, STAGES[1].modalities)

At evaluation the whole catalog's item tokens are computed once; history tokens are then lookups.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from speeder.defaults import LOSS_POOLS, LR_SCHEDULES, SAMPLED_NEGATIVES
from speeder.metrics import candidate_metrics, concat_ranks, first_choice, full_ranking_metrics, target_rank
from speeder.mrc import ItemFeatures
from speeder.prompt import PAD_ITEM, pad_histories

log = logging.getLogger(__name__)


@dataclass
class Samples:
    """A split as arrays. history (S, H) left-padded with -1, target (S,), candidates (S, C)."""

    history: np.ndarray
    target: np.ndarray
    candidates: np.ndarray
    user_id: np.ndarray | None = None

    @classmethod
    def from_rows(cls, histories: Sequence, targets: Sequence[int], candidates: Sequence,
                  max_history: int, user_ids: Sequence[int] | None = None) -> Samples:
        cand = np.asarray([np.asarray(c, dtype=np.int64) for c in candidates], dtype=np.int64)
        return cls(history=pad_histories(list(histories), max_history),
                   target=np.asarray(targets, dtype=np.int64), candidates=cand.reshape(len(targets), -1),
                   user_id=None if user_ids is None else np.asarray(user_ids, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.target)

    def subset(self, index: np.ndarray) -> Samples:
        return Samples(self.history[index], self.target[index], self.candidates[index],
                       None if self.user_id is None else self.user_id[index])

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start:start + batch_size]
            yield {"history": torch.from_numpy(self.history[idx]), "target": torch.from_numpy(self.target[idx]),
                   "candidates": torch.from_numpy(self.candidates[idx])}


class NegativeCache:
    """The catalog's item tokens without gradients, refreshed every `refresh_every` steps.

    With the catalog softmax, MRC over every item at every step costs more than the LLM for small
    backbones; with the cache only the batch's own items pass through MRC with gradients, and the
    other N - K logits use tokens at most `refresh_every` steps old. refresh_every=0 disables it.

    Caveat, measured on ML-100K (1,349 items, ~250 in a batch of 16 histories): the fresh tokens
    (train mode, current weights) differ systematically from the cached ones (eval mode, older
    weights), and the model learned to rank "fresh" above "cached": the loss fell to about
    log(items in the batch) while validation accuracy stayed at chance. Trainers therefore default to
    refresh_every=0; use the cache only where a full MRC pass per step is unaffordable, and check it.
    """

    def __init__(self, refresh_every: int) -> None:
        self.refresh_every = refresh_every
        self.table: torch.Tensor | None = None
        self.refreshed_at = -1

    def get(self, module: nn.Module, features: ItemFeatures, active: Iterable[str], step: int) -> torch.Tensor | None:
        if self.refresh_every <= 0:
            return None
        if self.table is None or step - self.refreshed_at >= self.refresh_every:
            was_training = module.training
            with torch.no_grad():
                module.eval()  # no dropout in the cached tokens
                self.table = module.item_tokens(features, list(active))
            module.train(was_training)
            self.refreshed_at = step
        return self.table


def lr_factor(schedule: str, step: int, total: int, warmup: float = 0.0) -> float:
    """The multiplier of every parameter group's base lr at optimizer step `step` (0-based) of a stage's `total`.

    constant: 1 throughout. cosine: a linear warmup over the first `warmup` share of the steps (1/w, 2/w, ...,
    1), then a half cosine from 1 towards 0: the k-th of the D steps after warmup gets (1 + cos(pi k / D)) / 2,
    so no step is wasted at lr 0. Steps past `total` (a stage that ran longer than planned) keep the last
    step's value. Stateless: a run resumed at step s gets the lr it would have had.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule {schedule!r}: expected one of {LR_SCHEDULES}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"lr warmup share {warmup}: must be in [0, 1)")
    if schedule == "constant" or total <= 0:
        return 1.0
    step = min(max(step, 0), total - 1)
    warm = int(warmup * total)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + float(np.cos(np.pi * (step - warm) / (total - warm))))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's lr to its base lr x `factor`; the base is the lr a group had when first set (kept
    in the group as "initial_lr", the key torch's schedulers use, so it travels in optimizer checkpoints)."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               features: ItemFeatures, active: Iterable[str], *, step: int, seed: int = 0,
               loss_pool: str = "catalog", max_grad_norm: float | None = 5.0,
               cache: NegativeCache | None = None, teacher: nn.Module | None = None,
               negatives: int = SAMPLED_NEGATIVES) -> dict[str, float]:
    """One optimisation step; returns the losses as floats.

    loss_pool: "catalog" (softmax over every item), "sampled" (over the batch's items and `negatives`
    items drawn uniformly per step) or "candidates" (over each sample's candidates); see loss_pool_inputs.

    `model` may be a DDP wrapper around SpeederModel (its forward computes the losses, so gradient
    synchronisation happens). The PPT pair sampler is seeded from (seed, step): reproducible runs.
    teacher: a SASRec whose next-item scores the model distils (model.distill_weight > 0).
    """
    module = getattr(model, "module", model)
    cached = cache.get(module, features, active, step) if cache is not None and loss_pool == "catalog" else None
    model.train()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    device = features.text.device
    history = batch["history"].to(device)
    candidates, pool = loss_pool_inputs(loss_pool, batch, features.num_items, negatives, generator, device)
    out = model(history, batch["target"].to(device), candidates, features, list(active), generator, cached,
                teacher_scores(teacher, history), negatives=pool)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if max_grad_norm is not None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return {k: float(v.detach()) for k, v in out.items()}


def loss_pool_inputs(loss_pool: str, batch: dict[str, torch.Tensor], num_items: int, negatives: int,
                     generator: torch.Generator, device: torch.device | None = None
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The model's (candidates, negatives) arguments for a loss pool, on `device` (the model's; default the
    batch's): candidates (B, C) for "candidates", negatives (M,) ids drawn without replacement
    (M = min(negatives, N), from `generator`, a CPU generator) for "sampled", neither for "catalog"."""
    device = batch["history"].device if device is None else device
    if loss_pool == "catalog":
        return None, None
    if loss_pool == "candidates":
        return batch["candidates"].to(device), None
    if loss_pool == "sampled":
        if negatives < 1:
            raise ValueError(f"sampled softmax: negatives must be >= 1, got {negatives}")
        ids = torch.randperm(num_items, generator=generator)[:negatives]
        return None, ids.to(device)
    raise ValueError(f"loss_pool must be one of {LOSS_POOLS}, got {loss_pool!r}")


@torch.no_grad()
def teacher_scores(teacher: nn.Module | None, history: torch.Tensor) -> torch.Tensor | None:
    """A SASRec teacher's catalog scores after every history column: history (B, H) -> (B, H, N)."""
    if teacher is None:
        return None
    teacher.eval()
    return teacher.all_position_logits(history)


@torch.no_grad()
def catalog_tokens(model: nn.Module, features: ItemFeatures, active: Iterable[str]) -> torch.Tensor:
    """All item tokens (N, D), computed once per checkpoint for evaluation, scoring and serving."""
    model.eval()
    return model.item_tokens(features, list(active))


@torch.no_grad()
def rank_targets(model: nn.Module, samples: Samples, item_table: torch.Tensor, *, batch_size: int = 64,
                 full: bool = True, mask_history: bool = True,
                 active: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Ranks of each sample's target: among its candidates, and (if `full`) among the whole catalog.

    item_table: the catalog's tokens made with the `active` modalities (None: all of the model's).
    Full ranking masks the user's history items (the target itself is never masked).
    -> {"candidates": (S,) ranks, "first": (S,) the position in its candidate list of the candidate each sample
    ranks first (-1 for a tied first place; the target is ranked 0 exactly there), "full": (S,) ranks when `full`}.
    """
    model.eval()
    device = item_table.device
    cand_ranks, firsts, full_ranks = [], [], []
    for batch in samples.batches(batch_size):
        history = batch["history"].to(device)
        target = batch["target"].to(device)
        cands = batch["candidates"].to(device)
        u, _, _ = model.user_vectors(history, item_table, active)
        cand_scores = model.item_scores(u, item_table[cands])  # (B, C)
        cand_ranks.append(target_rank(cand_scores, (cands == target.unsqueeze(1)).long().argmax(1)).cpu())
        firsts.append(first_choice(cand_scores).cpu())
        if full:
            scores = model.item_scores(u, item_table)  # (B, N)
            if mask_history:
                hist = history.clone()
                hist[hist == target.unsqueeze(1)] = PAD_ITEM
                rows, cols = torch.nonzero(hist >= 0, as_tuple=True)
                scores[rows, hist[rows, cols]] = float("-inf")
            full_ranks.append(target_rank(scores, target).cpu())
    out = {"candidates": concat_ranks(cand_ranks), "first": concat_ranks(firsts)}
    if full:
        out["full"] = concat_ranks(full_ranks)
    return out


def evaluate(model: nn.Module, samples: Samples, features: ItemFeatures, active: Iterable[str], *,
             batch_size: int = 64, full: bool = True, k: int = 10) -> dict[str, float]:
    """Both protocols' metrics on a split: candidate HR@1/ValidRatio/VHR@1 and full-ranking HR@K/NDCG@K."""
    t0 = time.perf_counter()
    table = catalog_tokens(model, features, active)
    ranks = rank_targets(model, samples, table, batch_size=batch_size, full=full, active=active)
    metrics = {f"cand_{k_}": v for k_, v in candidate_metrics(ranks["candidates"]).items()}
    if full:
        metrics.update({f"full_{k_}": v for k_, v in full_ranking_metrics(ranks["full"], k).items()})
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, train: Samples, features: ItemFeatures,
        active: Iterable[str], *, epochs: int, batch_size: int, seed: int = 0, loss_pool: str = "catalog",
        log_every: int = 50, max_steps: int | None = None, negative_cache_steps: int = 0,
        teacher: nn.Module | None = None, negatives: int = SAMPLED_NEGATIVES,
        lr_at: Callable[[int], float] | None = None) -> list[dict[str, float]]:
    """Plain single-process training for `epochs`; returns per-epoch mean losses and throughput.

    lr_at: step (0-based, this call's) -> the factor of every group's base lr for that step (see `lr_factor`);
    None leaves the optimizer's lr as it is.
    """
    history = []
    step = 0
    cache = NegativeCache(negative_cache_steps)
    for epoch in range(epochs):
        t0, losses, seen = time.perf_counter(), [], 0
        for batch in train.batches(batch_size, shuffle=True, seed=seed * 7919 + epoch):
            if lr_at is not None:
                set_lr(optimizer, lr_at(step))
            out = train_step(model, optimizer, batch, features, active, step=step, seed=seed, loss_pool=loss_pool,
                             cache=cache, teacher=teacher, negatives=negatives)
            losses.append(out["loss"])
            seen += len(batch["target"])
            step += 1
            if log_every and step % log_every == 0:
                log.info("epoch %d step %d loss %.4f (%.1f samples/s)", epoch, step, np.mean(losses[-log_every:]),
                         seen / (time.perf_counter() - t0))
            if max_steps is not None and step >= max_steps:
                break
        seconds = time.perf_counter() - t0
        history.append({"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                        "samples_per_s": seen / max(seconds, 1e-9), "seconds": seconds})
        if max_steps is not None and step >= max_steps:
            break
    return history

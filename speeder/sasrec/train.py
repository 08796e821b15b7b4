"""Training and evaluating SASRec as RecBole does: every prefix of a train sequence is one sample
(or a window, all positions supervised), Adam, full-catalog ranking (see speeder.sasrec)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from speeder.metrics import full_ranking_metrics, target_rank
from speeder.sasrec.model import PAD, SASRec, _check_item_ids, pad_sequences

logger = logging.getLogger("speeder.sasrec")

def build_training_samples(user_sequences: Sequence[np.ndarray],
                           max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """RecBole's sequential augmentation: every prefix of every sequence predicts the next item.

    -> inputs (S, max_length) int64 right-aligned PAD-padded (the last max_length items of the prefix),
       targets (S,) int64; S = sum(len(seq) - 1).
    """
    inputs, targets = [], []
    for seq in user_sequences:
        seq = np.asarray(seq, dtype=np.int64)
        if seq.size < 2:
            continue
        padded = np.concatenate([np.full(max_length, PAD, dtype=np.int64), seq])
        # window t of `padded` ends just before seq[t]: the (<= max_length) items preceding it.
        inputs.append(np.lib.stride_tricks.sliding_window_view(padded, max_length)[1:seq.size])
        targets.append(seq[1:])
    if not inputs:
        return np.empty((0, max_length), dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(inputs), np.concatenate(targets)


def build_window_samples(user_sequences: Sequence[np.ndarray], max_length: int,
                         stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The all-position objective (SASRec's original one): windows of a sequence, every position of a
    window predicting the item after it, each target supervised exactly once.

    A sequence's first window holds its first `max_length` inputs and supervises all of them; each
    next window moves `stride` (default max_length // 2) items on and supervises only its last
    `stride` positions, so every target keeps at least max_length - stride items of context (or its
    whole prefix). -> inputs (W, max_length) and targets (W, max_length), right-aligned, PAD where
    there is no input / no supervised target; sum(targets >= 0) = sum(len(seq) - 1).
    """
    stride = stride or max(1, max_length // 2)
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in 1..{max_length}, got {stride}")
    inputs, targets = [], []
    for seq in user_sequences:
        seq = np.asarray(seq, dtype=np.int64)
        n = seq.size
        done = 0  # targets seq[1..done] are supervised
        while done < n - 1:
            hi = min(n - 1, max_length if done == 0 else done + stride)  # inputs seq[lo:hi] -> seq[lo+1:hi+1]
            lo = max(0, hi - max_length)
            width = hi - lo
            row_in = np.full(max_length, PAD, dtype=np.int64)
            row_out = np.full(max_length, PAD, dtype=np.int64)
            row_in[max_length - width:] = seq[lo:hi]
            new = hi - done  # the window's last `new` positions predict targets not supervised yet
            row_out[max_length - new:] = seq[done + 1:hi + 1]
            inputs.append(row_in)
            targets.append(row_out)
            done = hi
    if not inputs:
        return np.empty((0, max_length), dtype=np.int64), np.empty((0, max_length), dtype=np.int64)
    return np.stack(inputs), np.stack(targets)


@torch.inference_mode()
def evaluate_full_ranking(model: SASRec, histories: Sequence[np.ndarray], targets: np.ndarray | Sequence[int],
                          k: int = 10, mask_history: bool = True, batch_size: int = 1024) -> dict[str, float]:
    """Rank every item for each (history, target); HR@K, NDCG@K, MRR@K via speeder.metrics.

    The model reads the last `max_length` items of each history. With mask_history, every item of the
    given history is scored -inf (docs/data.md#full-ranking), except the target itself: a re-consumed target would
    otherwise be unreachable. RecBole masks history for general models (Pop) but not for sequential
    ones (its FullSortEvalDataLoader passes no history for SASRec): pass mask_history=False to
    reproduce RecBole's SASRec figures.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if len(histories) != len(targets):
        raise ValueError(f"{len(histories)} histories but {len(targets)} targets")
    _check_item_ids(targets, model.num_items, "targets")
    for h in histories:
        _check_item_ids(np.asarray(h), model.num_items, "histories")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ranks = []
    for start in range(0, len(targets), batch_size):
        hist = histories[start:start + batch_size]
        tgt = torch.from_numpy(targets[start:start + batch_size]).to(device)  # (B,)
        scores = model.full_sort_predict(pad_sequences(hist, model.max_length).to(device))  # (B, N)
        if mask_history:
            rows = np.repeat(np.arange(len(hist)), [len(h) for h in hist])
            cols = np.concatenate([np.asarray(h, dtype=np.int64) for h in hist] + [np.empty(0, np.int64)])
            target_score = scores.gather(1, tgt[:, None])  # (B, 1)
            scores[torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)] = -math.inf
            scores.scatter_(1, tgt[:, None], target_score)
        ranks.append(target_rank(scores, tgt).cpu())
    model.train(was_training)
    return full_ranking_metrics(torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long), k)


def _train_epoch(model: SASRec, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, lengths: torch.Tensor,
                 targets: torch.Tensor, order: torch.Tensor, batch_size: int, micro_batch_size: int,
                 device: str) -> float:
    """One pass over the samples in `order`; -> mean training loss per supervised target.

    inputs (S, L) right-aligned, lengths (S,); targets (S,) (one per prefix sample) or (S, L) (every
    position of a window, PAD where unsupervised). Each batch's gradient is accumulated over
    micro-batches of samples of similar length (sorted inside the batch, so batches stay random), each
    cut to its longest sequence: left padding never changes SASRec's output, so this is the batch's
    exact gradient (dropout masks aside) for less work.
    """
    model.train()
    total, count = 0.0, 0
    windows = targets.dim() == 2
    weights = (targets >= 0).sum(dim=1) if windows else torch.ones(len(targets), dtype=torch.long)  # (S,)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        batch = batch[torch.argsort(lengths[batch], stable=True)]
        optimizer.zero_grad(set_to_none=True)
        in_batch = int(weights[batch].sum())
        for micro in batch.split(micro_batch_size):
            width = max(1, int(lengths[micro].max()))
            seq = inputs[micro, -width:].to(device)
            if windows:
                loss = model.all_position_loss(seq, targets[micro, -width:].to(device))
            else:
                loss = model.calculate_loss(seq, targets[micro].to(device))
            n = int(weights[micro].sum())
            (loss * (n / in_batch)).backward()  # mean over the batch's targets, as one big step
            total += loss.item() * n
            count += n
        optimizer.step()
    return total / max(count, 1)


def train_sasrec(
    user_sequences: Sequence[np.ndarray],
    num_items: int,
    *,
    epochs: int = 8,
    batch_size: int = 2048,  # RecBole train_batch_size
    lr: float = 1e-3,  # RecBole learning_rate, Adam, no weight decay
    seed: int = 2020,  # RecBole's default seed
    max_length: int = 50,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    inner_size: int = 256,
    dropout: float = 0.5,
    weight_decay: float = 0.0,
    micro_batch_size: int = 256,
    objective: str = "prefix",
    num_threads: int | None = None,
    device: str = "cpu",
    valid: tuple[Sequence[np.ndarray], np.ndarray] | None = None,
    log_every_epoch: bool = True,
    progress: Callable[[dict], None] | None = None,
) -> tuple[SASRec, list[dict]]:
    """Train SASRec with CE over all items on every prefix of each user's train sequence.

    user_sequences: each user's chronological train item ids (their sequence minus valid and test).
    valid: optional (histories, targets) for per-epoch full-ranking HR@10 / NDCG@10.
    micro_batch_size: each batch's gradient is accumulated over micro-batches of this size, cut to
    their longest sequence (see _train_epoch): the same gradient, but cache-sized activations made a
    2048-sample step ~25% faster on a 2-core CPU (micro 128-256 best, 64 slower again), and trimming
    the padding saves ~20% more on ML-100K.
    objective: "prefix" (RecBole's: every prefix of a sequence is one sample, batch_size samples) or
    "all_positions" (SASRec's original: windows of max_length items whose every position predicts the
    next item, `build_window_samples`; batch_size windows). Both supervise every train target once
    per epoch; all_positions runs ~1/25 of the forward passes on ML-100K.
    num_threads: torch intra-op threads while training (None: leave the process setting). Measured on
    2 cores on ML-100K batches of 2048: 2 threads 0.63-0.82 s/batch, 1 thread 1.07-1.17 s; tiny models
    want 1.
    Seeded and deterministic on CPU for a fixed thread count; the caller's RNG state is restored.
    Returns the model (eval mode) and one dict per epoch: loss, seconds, samples_per_s, and
    hr@10 / ndcg@10 / mrr@10 when `valid` is given.
    """
    for seq in user_sequences:
        _check_item_ids(np.asarray(seq), num_items, "user_sequences")
    if objective == "prefix":
        inputs_np, targets_np = build_training_samples(user_sequences, max_length)
    elif objective == "all_positions":
        inputs_np, targets_np = build_window_samples(user_sequences, max_length)
    else:
        raise ValueError(f"objective: {objective!r} is not one of prefix, all_positions")
    if not len(targets_np):
        raise ValueError("user_sequences hold no training sample (every sequence has < 2 items)")
    inputs, targets = torch.from_numpy(inputs_np), torch.from_numpy(targets_np)
    lengths = (inputs != PAD).sum(dim=1)  # (S,)
    saved_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    stats: list[dict] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SASRec(num_items, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                           inner_size=inner_size, dropout=dropout, max_length=max_length).to(device)
            optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
            order_rng = torch.Generator().manual_seed(seed)
            for epoch in range(epochs):
                started = time.perf_counter()
                order = torch.randperm(len(targets), generator=order_rng)
                mean_loss = _train_epoch(model, optimizer, inputs, lengths, targets, order, batch_size,
                                          micro_batch_size, device)
                seconds = time.perf_counter() - started
                supervised = int((targets >= 0).sum())  # = len(targets) for prefix samples
                row = {"epoch": epoch + 1, "loss": mean_loss, "seconds": seconds,
                       "samples_per_s": supervised / seconds}
                if valid is not None:
                    row.update(evaluate_full_ranking(model, valid[0], valid[1], k=10))
                stats.append(row)
                if log_every_epoch:
                    logger.info("sasrec epoch %d: %s", epoch + 1,
                                ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
                if progress is not None:
                    progress(row)
    finally:
        torch.set_num_threads(saved_threads)
    model.eval()
    return model, stats

"""Popularity and SASRec on the same split and protocols as Speeder (docs/data.md#protocol, docs/model.md#baselines).

    from speeder_platform.baselines_eval import run_baselines
    run_baselines(load_config("jobs/demo.yaml"))      # -> <evaluate.out>/baselines.json + baselines.md

Both baselines see exactly what Speeder's evaluation sees: the split's histories (the last
`max_history` items), its 20 candidates, and the whole catalog with the history items masked.
Popularity counts the train part of every user's sequence (the part SASRec trains on: everything
but the last two items). SASRec is the model featurize already trained for the sequence features
(`features/<name>/sasrec`), loaded, not trained again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from speeder import schema
from speeder.baselines.popularity import Popularity
from speeder.loop import Samples
from speeder.metrics import candidate_metrics, concat_ranks, first_choice, full_ranking_metrics, target_rank
from speeder_platform import storage

log = logging.getLogger("speeder.baselines")

BASELINES_FILE = "baselines.json"
# history (B, H) left-padded with -1 -> scores of every item (B, N)
CatalogScorer = Callable[[torch.Tensor], torch.Tensor]


def sample_histories(history: np.ndarray) -> list[np.ndarray]:
    """Left-padded histories (S, H) with -1 -> S arrays of item ids, oldest first."""
    return [row[row >= 0] for row in history]


def rank_with(scorer: CatalogScorer, samples: Samples, *, batch_size: int = 256,
              full: bool = True) -> dict[str, np.ndarray]:
    """Ranks of each target among its candidates and (if `full`) the whole catalog, history masked.

    The same rule and output as `speeder.loop.rank_targets` (with "first", the position of the candidate
    ranked first): a history item is scored -inf unless it is the target.
    """
    cand_ranks, firsts, full_ranks = [], [], []
    with torch.no_grad():
        for batch in samples.batches(batch_size):
            history, target, cands = batch["history"], batch["target"], batch["candidates"]
            scores = scorer(history).float()  # (B, N)
            cand_scores = scores.gather(1, cands)  # (B, C)
            cand_ranks.append(target_rank(cand_scores, (cands == target[:, None]).long().argmax(1)))
            firsts.append(first_choice(cand_scores))
            if full:
                hist = history.clone()
                hist[hist == target[:, None]] = -1
                rows, cols = torch.nonzero(hist >= 0, as_tuple=True)
                scores[rows, hist[rows, cols]] = float("-inf")
                full_ranks.append(target_rank(scores, target))
    out = {"candidates": concat_ranks(cand_ranks), "first": concat_ranks(firsts)}
    if full:
        out["full"] = concat_ranks(full_ranks)
    return out


def metrics_from_ranks(ranks: dict[str, np.ndarray], k: int = 10) -> dict[str, float]:
    """Ranks -> the metric keys of `speeder.loop.evaluate` (cand_* and, when ranked, full_*)."""
    out = {f"cand_{key}": v for key, v in candidate_metrics(ranks["candidates"]).items()}
    if "full" in ranks:
        out.update({f"full_{key}": v for key, v in full_ranking_metrics(ranks["full"], k).items()})
    return out


RANKS_DIR = "ranks"  # <evaluate.out>/ranks/<model>.parquet: user_id, cand_rank, full_rank per test user


def write_ranks(out: str, model: str, user_ids: np.ndarray, ranks: dict[str, np.ndarray]) -> str:
    """Per-user ranks of one model on a split, so reports can pair models user by user."""
    import pyarrow as pa

    table = pa.table({"user_id": np.asarray(user_ids, np.int64), "cand_rank": np.asarray(ranks["candidates"], np.int64),
                      "full_rank": np.asarray(ranks.get("full", np.full(len(user_ids), -1)), np.int64)})
    uri = storage.join(out, RANKS_DIR, f"{model}.parquet")
    storage.write_table(table, uri)
    return uri


def read_ranks(out: str, model: str) -> dict[str, np.ndarray] | None:
    """{"user_id", "candidates", "full"} arrays written by `write_ranks`, or None if absent."""
    uri = storage.join(out, RANKS_DIR, f"{model}.parquet")
    if not storage.exists(uri):
        return None
    table = storage.read_table(uri)
    return {"user_id": table.column("user_id").to_numpy(), "candidates": table.column("cand_rank").to_numpy(),
            "full": table.column("full_rank").to_numpy()}


def popularity_scorer(model: Popularity) -> CatalogScorer:
    return lambda history: model.score_catalog(len(history))


def sasrec_scorer(model: Any) -> CatalogScorer:
    """SASRec reads the same left-padded history (its PAD is -1 too); -> <h, e_i> over all items."""
    model.eval()
    return lambda history: model.full_sort_predict(history[:, -model.max_length:])


def train_item_counts(data_uri: str) -> tuple[list[np.ndarray], int]:
    """The train part of every user's sequence (featurize.sequence.train_sequences) and the catalog size."""
    from speeder_platform.featurize.sequence import train_sequences

    inter = storage.read_table(storage.join(data_uri, schema.INTERACTIONS_FILE),
                               columns=[schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP])
    num_items = storage.read_table(storage.join(data_uri, schema.ITEMS_FILE), columns=[schema.ITEM_ID]).num_rows
    return train_sequences(inter), num_items


def popularity_from_sequences(sequences: Sequence[np.ndarray], num_items: int) -> Popularity:
    flat = np.concatenate(list(sequences)) if len(sequences) else np.zeros(0, np.int64)
    return Popularity(num_items, flat)


def baseline_ranks(samples: Samples, popularity: Popularity, sasrec: Any | None,
                   full: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """{"Popularity": ranks, "SASRec": ranks} on `samples` (SASRec only when given)."""
    out = {"Popularity": rank_with(popularity_scorer(popularity), samples, full=full)}
    if sasrec is not None:
        out["SASRec"] = rank_with(sasrec_scorer(sasrec), samples, full=full)
    return out


def evaluate_baselines(samples: Samples, popularity: Popularity, sasrec: Any | None,
                       full: bool = True) -> dict[str, dict[str, float]]:
    """{"Popularity": metrics, "SASRec": metrics} on `samples` (SASRec only when given)."""
    return {name: metrics_from_ranks(r) for name, r in baseline_ranks(samples, popularity, sasrec, full).items()}


def run_baselines(cfg: Any) -> dict[str, Any]:
    """Popularity and featurize's SASRec on cfg.evaluate.split; writes baselines.json and baselines.md.

    The job step `baselines` (after featurize; it needs no Speeder checkpoint).
    """
    from speeder_platform.evaluate import metrics_table
    from speeder_platform.featurize.pipeline import features_dir
    from speeder_platform.featurize.sequence import SASREC_META, load_sasrec, sasrec_dir
    from speeder_platform.tables import load_samples

    t0 = time.perf_counter()
    samples = load_samples(cfg.data.uri, cfg.evaluate.split, cfg.model.max_history)
    sequences, num_items = train_item_counts(cfg.data.uri)
    directory = sasrec_dir(features_dir(cfg))
    sasrec, sasrec_info = None, {"source": directory, "status": "absent (featurize.sasrec.epochs=0?)"}
    if storage.exists(storage.join(directory, SASREC_META)):
        sasrec, meta = load_sasrec(directory)
        stats = meta.get("stats") or []
        sasrec_info = {"source": directory, "status": "loaded", "hparams": meta["hparams"], "epochs": len(stats),
                       "train_seconds": round(sum(s.get("seconds", 0.0) for s in stats), 1)}
    ranks = baseline_ranks(samples, popularity_from_sequences(sequences, num_items), sasrec)
    rows = {name: metrics_from_ranks(r) for name, r in ranks.items()}
    for name, r in ranks.items():
        write_ranks(cfg.evaluate.out, name.lower(), samples.user_id, r)
    result = {"split": cfg.evaluate.split, "samples": len(samples), "models": rows, "sasrec": sasrec_info,
              "seconds": round(time.perf_counter() - t0, 2)}
    storage.write_json(storage.join(cfg.evaluate.out, BASELINES_FILE), result)
    table = metrics_table(rows)
    storage.write_bytes(storage.join(cfg.evaluate.out, "baselines.md"),
                        f"# Baselines, {cfg.evaluate.split} split, {len(samples)} users\n\n{table}\n".encode())
    log.info("baselines on %d %s samples in %.1fs\n%s", len(samples), cfg.evaluate.split, result["seconds"], table)
    return result

"""`speeder diagnose CONFIG [--checkpoint URI]`: why a trained Speeder ranks the way it does.

    speeder diagnose jobs/demo.yaml          # -> <evaluate.out>/diagnose.json and diagnose.md

Figures that tell a model that personalises from one that has collapsed to a global ranking:
- user vectors over validation users: mean and minimum pairwise cosine (near 1: every user gets the
  same vector), and how many distinct items their top-10 lists hold together;
- Spearman rank correlation of the mean catalog score with item popularity (near 1: a popularity list);
- training-free rules on the test split, "user vector = the last history item's embedding", scored
  by cosine over the same 20 candidates: with SASRec's item embeddings, the text embeddings, and the
  model's own item tokens (what the model's inputs give before any sequence modelling);
- the vision gate tanh(g_v), the temperature, the item-prior spread, and the RMS of item tokens and
  position prompts against the backbone's word embeddings (tokens must live at the words' scale).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from speeder.loop import Samples, catalog_tokens, rank_targets
from speeder.metrics import hit_rate
from speeder.mrc import ItemFeatures, embedding_scale
from speeder_platform import storage
from speeder_platform.baselines_eval import metrics_from_ranks, rank_with

log = logging.getLogger("speeder.diagnose")

DIAGNOSE_FILE = "diagnose.json"


def rank_average(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of x, ties sharing their average rank (for Spearman's rho)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: Pearson correlation of the average ranks of a and b."""
    ra, rb = rank_average(np.asarray(a, np.float64)), rank_average(np.asarray(b, np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def last_item_rule(table: torch.Tensor, samples: Samples) -> dict[str, float]:
    """Metrics of the training-free rule: score(c) = cos(e_last, e_c) with e = rows of `table` (N, d),
    e_last the most recent history item's row; history items masked in full ranking, as for models."""
    unit = F.normalize(table.float(), dim=-1)  # (N, d)

    def scorer(history: torch.Tensor) -> torch.Tensor:
        last = history[:, -1].clamp(min=0)  # left-padded: the last column is the most recent item
        scores = unit[last] @ unit.T  # (B, N)
        return torch.where((history[:, -1] >= 0).unsqueeze(1), scores, torch.zeros_like(scores))

    return metrics_from_ranks(rank_with(scorer, samples))


def pairwise_cosine(u: torch.Tensor) -> tuple[float, float]:
    """u (B, D) -> (mean, min) cosine over distinct pairs."""
    unit = F.normalize(u.float(), dim=-1)
    sim = unit @ unit.T  # (B, B)
    off = ~torch.eye(len(unit), dtype=torch.bool)
    return float(sim[off].mean()), float(sim[off].min())


@torch.no_grad()
def diagnose_model(model: Any, features: ItemFeatures, active: list[str], valid: Samples, test: Samples, *,
                   item_counts: np.ndarray, sequence_table: torch.Tensor | None = None, users: int = 300,
                   seed: int = 0, batch_size: int = 64) -> dict[str, Any]:
    """The figures of this module's docstring for a trained SpeederModel (see `speeder diagnose`).

    item_counts (N,): train interactions per item; sequence_table (N, d_s): SASRec's item embeddings
    (default: the features' seq_emb); users: validation users for the user-vector figures.
    """
    t0 = time.perf_counter()
    model.eval()
    table = catalog_tokens(model, features, active)  # (N, D)
    pick = np.arange(len(valid))
    if users and users < len(valid):
        pick = np.sort(np.random.default_rng([seed, 11]).choice(len(valid), users, replace=False))
    sub = valid.subset(pick)
    vectors, top, mean_scores = [], [], torch.zeros(len(table), dtype=torch.float64)
    for batch in sub.batches(batch_size):
        history = batch["history"]
        u, _, _ = model.user_vectors(history, table, active)
        vectors.append(u.float())
        scores = model.item_scores(u, table).float()  # (B, N)
        mean_scores += scores.double().sum(dim=0)
        rows, cols = torch.nonzero(history >= 0, as_tuple=True)
        scores[rows, history[rows, cols]] = float("-inf")
        top.append(scores.topk(min(10, scores.shape[1]), dim=1).indices)
    u_all = torch.cat(vectors)
    cos_mean, cos_min = pairwise_cosine(u_all)
    rules = {}
    seq = sequence_table if sequence_table is not None else (features.sequence if features.has("sequence") else None)
    if seq is not None:
        rules["sasrec_last_item"] = last_item_rule(seq, test)
    if features.has("text"):
        rules["text_last_item"] = last_item_rule(features.text, test)
    rules["item_token_last_item"] = last_item_rule(table, test)
    word_rms = embedding_scale(model._backbone.input_embeddings().weight)
    token_rms = float(table.float().pow(2).mean().sqrt())
    out: dict[str, Any] = {
        "users": len(sub),
        "user_cosine_mean": cos_mean,
        "user_cosine_min": cos_min,
        "distinct_top10_items": int(torch.unique(torch.cat(top)).numel()),
        "top10_slots": int(torch.cat(top).numel()),
        "popularity_spearman": spearman((mean_scores / len(sub)).numpy(), item_counts),
        "rules_test": {name: {k: m[k] for k in ("cand_hr@1", "full_hr@10", "full_ndcg@10")}
                       for name, m in rules.items()},
        "vision_gate": float(torch.tanh(model.mrc.vision_gate)),
        "temperature": float(model.head.log_temperature.exp()),
        "item_prior_std": float(model.head.prior(table.float()).std()) if model.head.prior is not None else 0.0,
        "item_token_rms": token_rms,
        "word_embedding_rms": word_rms,
        "token_to_word_rms": token_rms / word_rms if word_rms else float("nan"),
        "ppl_rms": float(model.ppl.table.float().pow(2).mean().sqrt()) if model.ppl is not None else 0.0,
        "valid_hr@1_sample": hit_rate(rank_targets(model, sub, table, full=False, active=active)["candidates"], 1),
        "seconds": 0.0,
    }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def diagnose_table(d: dict[str, Any]) -> str:
    """Markdown of a `diagnose_model` result."""
    lines = ["| figure | value | reading |", "|---|---|---|",
             f"| user vectors, mean / min pairwise cosine ({d['users']} valid users) | {d['user_cosine_mean']:.3f} / "
             f"{d['user_cosine_min']:.3f} | ~1: every user gets the same vector |",
             f"| distinct items in their top-10 lists | {d['distinct_top10_items']} of {d['top10_slots']} | "
             "few: one global list |",
             f"| Spearman(mean catalog score, item popularity) | {d['popularity_spearman']:.3f} | ~1: a popularity "
             "ranking |",
             f"| valid HR@1 of these users (20 cand.) | {d['valid_hr@1_sample']:.4f} | |"]
    for name, m in d["rules_test"].items():
        lines.append(f"| rule without training, test HR@1 / NDCG@10: {name.replace('_', ' ')} | "
                     f"{m['cand_hr@1']:.4f} / {m['full_ndcg@10']:.4f} | what the inputs give for free |")
    lines += [f"| vision gate tanh(g_v) | {d['vision_gate']:.4f} | 0: vision silent |",
              f"| temperature tau / item prior std | {d['temperature']:.2f} / {d['item_prior_std']:.3f} | |",
              f"| item token RMS / word embedding RMS | {d['item_token_rms']:.4f} / {d['word_embedding_rms']:.4f} "
              f"({d['token_to_word_rms']:.2f}x) | ~1x: tokens at the words' scale |",
              f"| position prompt (PPL) RMS | {d['ppl_rms']:.4f} | |"]
    return "\n".join(lines)


def run_diagnose(cfg: Any, checkpoint: str | None = None, users: int = 300) -> dict[str, Any]:
    """Diagnose a trained checkpoint (default: the run's final one); writes diagnose.json and diagnose.md
    under evaluate.out and returns the result."""
    from speeder_platform.baselines_eval import train_item_counts
    from speeder_platform.tables import load_samples
    from speeder_platform.trained import load_trained, resolve_checkpoint

    uri = resolve_checkpoint(cfg, checkpoint or cfg.evaluate.checkpoint)
    trained = load_trained(uri, cfg.data.uri, cfg.featurize.name)
    max_history = trained.model.settings.max_history
    valid = load_samples(cfg.data.uri, "valid", max_history)
    test = load_samples(cfg.data.uri, "test", max_history)
    sequences, num_items = train_item_counts(cfg.data.uri)
    flat = np.concatenate(sequences) if sequences else np.zeros(0, np.int64)
    counts = np.bincount(flat, minlength=num_items)[:num_items]
    result = diagnose_model(trained.model, trained.features, trained.active, valid, test, item_counts=counts,
                            users=users, seed=cfg.trainer.seed)
    result = {"checkpoint": uri, "model_version": trained.version, **result}
    storage.write_json(storage.join(cfg.evaluate.out, DIAGNOSE_FILE), result)
    table = diagnose_table(result)
    storage.write_bytes(storage.join(cfg.evaluate.out, "diagnose.md"),
                        f"# Diagnosis of {trained.version}\n\n{table}\n".encode())
    log.info("diagnosis of %s in %.1fs\n%s", trained.version, result["seconds"], table)
    return result


"""`speeder evaluate CONFIG [--checkpoint URI]`: test-split metrics for both protocols.

    speeder evaluate jobs/smoke.yaml                       # the run's final checkpoint
    speeder evaluate jobs/smoke.yaml --checkpoint s3://bucket/train/speeder-stage1/checkpoint_...

Writes `<evaluate.out>/metrics.json` and `metrics.md`: 20-candidate HR@1 / ValidRatio / VHR@1 and
full-ranking HR@10 / NDCG@10 (history items masked).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from speeder.loop import catalog_tokens, rank_targets
from speeder_platform import storage
from speeder_platform.baselines_eval import metrics_from_ranks, write_ranks
from speeder_platform.config import SpeederConfig
from speeder_platform.tables import load_samples
from speeder_platform.trained import load_trained, resolve_checkpoint

log = logging.getLogger("speeder.evaluate")


def metrics_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table of both protocols, one row per model."""
    head = "| model | HR@1 (20 cand.) | ValidRatio | VHR@1 | HR@10 (full) | NDCG@10 (full) |\n|---|---|---|---|---|---|"
    lines = [head]
    for name, m in rows.items():
        lines.append(f"| {name} | {m['cand_hr@1']:.4f} | {m['cand_valid_ratio']:.4f} | {m['cand_vhr@1']:.4f} | "
                     f"{m['full_hr@10']:.4f} | {m['full_ndcg@10']:.4f} |")
    return "\n".join(lines)


def run_evaluate(cfg: SpeederConfig, checkpoint: str | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint on cfg.evaluate.split and write metrics.json + metrics.md."""
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    uri = resolve_checkpoint(cfg, checkpoint or cfg.evaluate.checkpoint)
    trained = load_trained(uri, cfg.data.uri, cfg.featurize.name)
    samples = load_samples(cfg.data.uri, cfg.evaluate.split, trained.model.settings.max_history)
    table = catalog_tokens(trained.model, trained.features, trained.active)
    ranks = rank_targets(trained.model, samples, table, batch_size=cfg.evaluate.batch_size, active=trained.active)
    metrics = {**metrics_from_ranks(ranks), "eval_seconds": time.perf_counter() - t0}
    write_ranks(cfg.evaluate.out, "speeder", samples.user_id, ranks)
    result = {"checkpoint": uri, "model_version": trained.version, "split": cfg.evaluate.split,
              "stage": trained.meta["stage"], "modalities": trained.active, "metrics": metrics,
              "seconds": time.perf_counter() - t0}
    storage.write_json(storage.join(cfg.evaluate.out, "metrics.json"), result)
    table = metrics_table({f"Speeder ({trained.version})": metrics})
    storage.write_bytes(storage.join(cfg.evaluate.out, "metrics.md"),
                        f"# {cfg.evaluate.split} split, {len(samples)} users\n\n{table}\n".encode())
    log.info("evaluated %s on %d %s samples in %.1fs\n%s", trained.version, len(samples), cfg.evaluate.split,
             result["seconds"], table)
    return result

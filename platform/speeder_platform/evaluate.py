"""`speeder evaluate CONFIG [--checkpoint URI]`: test-split metrics for both protocols.

    speeder evaluate jobs/smoke.yaml                       # the run's final checkpoint
    speeder evaluate jobs/smoke.yaml --checkpoint s3://bucket/train/speeder-stage1/checkpoint_...

Writes `<evaluate.out>/metrics.json` and `metrics.md`: 20-candidate HR@1 / ValidRatio / VHR@1 and
full-ranking HR@10 / NDCG@10 (history items masked).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from speeder.checkpoint import load_checkpoint, read_meta
from speeder.loop import catalog_tokens, rank_targets
from speeder.model import SpeederModel
from speeder.mrc import ItemFeatures
from speeder_platform import storage
from speeder_platform.baselines_eval import metrics_from_ranks, write_ranks
from speeder_platform.config import SpeederConfig, from_dict
from speeder_platform.lineage import check_checkpoint, committed_features
from speeder_platform.modeling import build_from_config
from speeder_platform.tables import features_folder, load_item_features, load_samples

log = logging.getLogger("speeder.evaluate")


@dataclass
class TrainedModel:
    """A model restored from a checkpoint, with the item features and modalities it was trained on."""

    model: SpeederModel
    features: ItemFeatures
    active: list[str]
    meta: dict[str, Any]
    checkpoint: str

    @property
    def version(self) -> str:
        """A readable model version: run, stage and step of the checkpoint."""
        cfg = self.meta.get("config", {}).get("trainer", {})
        return f"{cfg.get('run_name', 'speeder')}/stage{self.meta['stage']}/step{self.meta['step']}"


def resolve_checkpoint(cfg: SpeederConfig, explicit: str | None) -> str:
    from speeder_platform.train import final_checkpoint

    return explicit or final_checkpoint(cfg)


def load_trained(checkpoint: str, dataset: str | None = None, features_name: str | None = None,
                 device: str = "cpu") -> TrainedModel:
    """Rebuild the model a checkpoint was trained as (its own stored config) and load its weights.

    `dataset` / `features_name` default to the ones the model was trained on.
    """
    with tempfile.TemporaryDirectory() as local:
        storage.download_dir(checkpoint, local)
        meta = read_meta(local)
        train_cfg = from_dict(meta["config"])
        dataset, features_name = dataset or train_cfg.data.uri, features_name or train_cfg.featurize.name
        # Features it was not trained on (or not whole) are refused: with equal dims they would load and rank.
        check_checkpoint(meta, committed_features(dataset, features_name), checkpoint)
        features = load_item_features(dataset, features_name)
        dims = features.dims()
        if dims != meta["feature_dims"]:
            raise ValueError(f"features {dims} do not match the checkpoint's {meta['feature_dims']} "
                             f"({checkpoint}); featurize with the encoders it was trained with")
        model = build_from_config(train_cfg.model, dims, seed=train_cfg.trainer.seed,
                                  features_dir=features_folder(dataset, features_name))
        load_checkpoint(local, model)
    model.to(device).eval()
    return TrainedModel(model=model, features=features.to(device), active=list(meta["modalities"]), meta=meta,
                        checkpoint=checkpoint)


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

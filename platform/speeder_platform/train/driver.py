"""`speeder train CONFIG`: the MPO stages as Ray Train runs, each resuming from the previous best.

    speeder train jobs/smoke.yaml trainer.num_workers=2 trainer.strategy=deepspeed

One `TorchTrainer` per stage (`<run_name>-stage<k>` under `trainer.storage_path`, local or s3://).
A stage that finished is recorded in `<storage>/<run_name>/stages.json`, so a driver restarted with
the same spec skips finished stages and Ray Train resumes the unfinished one from its latest
checkpoint. `final.json` names the checkpoint that evaluation, scoring and serving use by default.
The next stage starts from the last finished one's weights only if it was trained on the same features
with the same backbone (checked here, once, before any worker starts; the workers check again).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from speeder.checkpoint import META_FILE
from speeder.mpo import plan_stages
from speeder_platform import storage
from speeder_platform.config import SpeederConfig, to_dict
from speeder_platform.lineage import committed_features
from speeder_platform.ray_utils import ensure_ray
from speeder_platform.tables import available_modalities, is_small, load_item_features, split_uri
from speeder_platform.train.worker import METRIC, check_restorable, train_loop_per_worker
from speeder_platform.trained import FINAL_FILE, STAGES_FILE, run_uri

log = logging.getLogger("speeder.train")

@dataclass
class TrainSummary:
    checkpoint: str  # the final stage's best checkpoint (URI)
    stages: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        lines = ["| stage | modalities | epochs | valid HR@1 | valid HR@10 | samples/s | seconds |",
                 "|---|---|---|---|---|---|---|"]
        for s in self.stages:
            m = s["metrics"]
            lines.append(f"| {s['stage']} {s['name']} | {', '.join(s['modalities'])} | {m.get('epoch', '?')} | "
                         f"{m.get(METRIC, float('nan')):.4f} | {m.get('valid_hr10', float('nan')):.4f} | "
                         f"{m.get('samples_per_s', float('nan')):.1f} | {s.get('seconds', 0):.0f} |")
        return "\n".join(lines)


def stage_sample_limit(cfg: SpeederConfig, stage_index: int) -> int | None:
    """Training samples drawn for a stage: trainer.stage_samples (aligned with trainer.stages) when set,
    else trainer.max_train_samples; None: the whole train split."""
    t = cfg.trainer
    if t.stage_samples:
        position = list(t.stages).index(stage_index) if stage_index in t.stages else len(t.stages) - 1
        return t.stage_samples[position]
    return t.max_train_samples


def stage_sample_indices(num_rows: int, count: int, seed: int, stage_index: int) -> np.ndarray:
    """Row indices of a stage's training samples: `count` rows drawn without replacement, seeded by
    (seed, stage), so every stage draws fresh samples; more than num_rows repeats seeded permutations.
    The trainer and `speeder bench quality` draw the same rows for the same stage."""
    rng = np.random.default_rng([seed, stage_index])
    first = rng.choice(num_rows, min(count, num_rows), replace=False)
    more = [rng.permutation(num_rows) for _ in range(-(-max(0, count - num_rows) // num_rows))]
    return np.concatenate([first, *more])[:count]


def steps_per_epoch(samples: int, cfg: SpeederConfig) -> int:
    """Optimiser steps of one epoch over `samples` (whole batches on every worker, trainer.max_steps_per_epoch)."""
    t = cfg.trainer
    steps = max(1, samples // (t.num_workers * t.batch_size))
    return min(steps, t.max_steps_per_epoch) if t.max_steps_per_epoch else steps


def _train_dataset(cfg: SpeederConfig, stage_index: int):
    """One stage's training samples as a materialised Ray Dataset: the whole train split, or `stage_table`'s draw
    seeded by (trainer.seed, stage): fewer rows (fresh samples per stage) or more (further passes). With a
    limit the driver reads the split itself, whatever its size.

    Materialised before the trainers start: the read tasks then never compete with the training
    workers for CPUs (on a 2-core machine they would never get one), and every restarted worker
    group of the stage reads the same blocks from the object store.
    """
    import ray.data

    uri = split_uri(cfg.data.uri, "train")
    limit = stage_sample_limit(cfg, stage_index)
    if limit is None and not is_small(uri):
        fs, path = storage.resolve(uri)
        return ray.data.read_parquet(path, filesystem=fs).materialize()
    table = storage.read_table(uri)  # a small split: one read by the driver, no read tasks to start
    return ray.data.from_arrow(stage_table(table, limit, cfg.trainer.seed, stage_index)).materialize()


def stage_table(table: pa.Table, limit: int | None, seed: int, stage_index: int) -> pa.Table:
    """A stage's training rows of the train split `table`: all of them (limit None or equal), `limit` rows drawn
    without replacement in split order (fewer), or every row once then further seeded passes in their drawn
    order (more: the stage runs that many samples, a seeded permutation per extra pass)."""
    if limit is None or limit == table.num_rows:
        return table
    order = stage_sample_indices(table.num_rows, limit, seed, stage_index)
    return table.take(np.sort(order) if limit < table.num_rows else order)


def _cpus_per_worker(cfg: SpeederConfig) -> float:
    import ray

    if cfg.trainer.cpus_per_worker is not None:
        return cfg.trainer.cpus_per_worker
    cpus = ray.cluster_resources().get("CPU", 1.0)
    # Leave half a CPU to Ray Data's split coordinator and read tasks, or they starve
    # (docs/stack-notes.md#ray-data-cpus).
    return max(0.25, min(1.0, (cpus - 0.5) / cfg.trainer.num_workers))


def run_training(cfg: SpeederConfig) -> TrainSummary:
    """Run every planned stage that has not finished yet; returns the final checkpoint and metrics."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    ensure_ray(cfg)
    t = cfg.trainer
    # Refuse broken or half-committed features here, once, before any worker starts (and retries).
    features_set = committed_features(cfg.data.uri, cfg.featurize.name)
    features = load_item_features(cfg.data.uri, cfg.featurize.name)
    available = available_modalities(features) & set(cfg.model.modalities)
    plan = plan_stages(list(t.stages), available, cfg.model.use_mpo)
    if not plan:
        raise ValueError(f"trainer.stages: nothing to train with modalities {sorted(available)}")
    root = run_uri(cfg)
    stages_uri = storage.join(root, STAGES_FILE)
    done: list[dict[str, Any]] = storage.read_json(stages_uri)["stages"] if storage.exists(stages_uri) else []
    done_index = {s["stage"] for s in done}

    cpus = _cpus_per_worker(cfg)
    log.info("training %s: stages %s, %d worker(s) x %.2g CPU%s, %d epoch(s) per stage", cfg.model.backbone,
             [s.index for s in plan], t.num_workers, cpus, " + 1 GPU" if t.use_gpu else "", t.epochs)
    fs, storage_path = storage.resolve(t.storage_path)
    init = done[-1]["checkpoint"] if done else None
    if init and any(stage.index not in done_index for stage in plan):
        # A rerun whose spec changed the features or the backbone: refused in one line, before any worker.
        check_restorable(storage.read_json(storage.join(init, META_FILE)), cfg, features_set, init)
    for stage in plan:
        if stage.index in done_index:
            log.info("stage %d (%s) already finished in %s; skipping", stage.index, stage.name, root)
            continue
        stage_t0 = time.perf_counter()
        train_ds = _train_dataset(cfg, stage.index)
        n_train = train_ds.count()
        steps = steps_per_epoch(n_train, cfg)
        log.info("stage %d (%s): %d samples, %d steps/epoch", stage.index, stage.name, n_train, steps)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": to_dict(cfg), "stage": stage.index, "init_checkpoint": init,
                               "steps_per_epoch": steps, "threads": max(1, math.ceil(cpus))},
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                         resources_per_worker={"CPU": cpus},
                                         placement_strategy=t.placement_strategy),
            run_config=RunConfig(
                name=f"{t.run_name}-stage{stage.index}",
                storage_path=storage_path,
                storage_filesystem=fs,
                failure_config=FailureConfig(max_failures=t.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=3, checkpoint_score_attribute=METRIC,
                                                   checkpoint_score_order="max"),
            ),
            datasets={"train": train_ds},
            # Shards by position, not by where blocks live: the same seed gives the same samples to the
            # same rank on any cluster shape (locality would only save copies of a small table).
            dataset_config=DataConfig(enable_shard_locality=False),
        )
        result = trainer.fit()
        if result.error:
            raise RuntimeError(f"stage {stage.index} failed: {result.error}")
        best = result.get_best_checkpoint(METRIC, "max")
        if best is None:
            raise RuntimeError(f"stage {stage.index} reported no checkpoint")
        metrics = next(m for c, m in result.best_checkpoints if c.path == best.path)
        init = storage.uri_of(best.path, best.filesystem)
        record = {"stage": stage.index, "name": stage.name, "checkpoint": init,
                  "modalities": [m for m in stage.modalities if m in available],
                  "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
                  "seconds": time.perf_counter() - stage_t0}
        done.append(record)
        storage.write_json(stages_uri, {"stages": done})
        log.info("stage %d (%s) done in %.0fs: best valid HR@1 %.4f -> %s", stage.index, stage.name,
                 record["seconds"], record["metrics"].get(METRIC, math.nan), init)
    summary = TrainSummary(checkpoint=done[-1]["checkpoint"], stages=done, seconds=time.perf_counter() - t0)
    storage.write_json(storage.join(root, FINAL_FILE), {"checkpoint": summary.checkpoint, "stages": done})
    return summary


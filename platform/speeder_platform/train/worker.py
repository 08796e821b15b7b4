"""The Ray Train worker loop: one MPO stage on one worker (DDP or DeepSpeed).

Each worker builds the same model (same seed), applies the stage, restores state (this stage's
latest checkpoint after a failure, else the previous stage's best weights), then trains on its
shard of the train dataset. Every epoch ends with validation HR@1 on the 20-candidate valid split
(sharded over workers, summed with all-reduce so every rank takes the same early-stopping decision)
and a checkpoint. A checkpoint's meta.json carries the loop state (epoch, step, best, patience), so
a restarted worker group continues where the failed one stopped.

A checkpoint is restored (resumed, or a previous stage's weights taken) only when it belongs to this run:
trained on the same features (lineage.check_checkpoint) and with the same backbone (`check_backbone`:
name, truncation, LoRA shape and scale). Both are checked before any weight is loaded (`check_restorable`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from speeder.checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from speeder.loop import (
    NegativeCache,
    Samples,
    catalog_tokens,
    loss_pool_inputs,
    lr_factor,
    rank_targets,
    set_lr,
    teacher_scores,
    train_step,
)
from speeder.metrics import hit_rate, ndcg
from speeder.mpo import ALL_AT_ONCE, STAGES, Stage
from speeder.prompt import pad_histories
from speeder_platform import storage
from speeder_platform.config import from_dict, to_dict
from speeder_platform.lineage import FeaturesSet, check_checkpoint, checkpoint_record, committed_features
from speeder_platform.modeling import build_from_config, describe_groups, sequence_encoder_from, stage_groups
from speeder_platform.redact import redact
from speeder_platform.tables import available_modalities, features_folder, load_item_features, load_samples

log = logging.getLogger("speeder.train")

METRIC = "valid_hr1"  # checkpoint selection and early stopping
# The model settings a checkpoint's weights only mean something with (config.model paths): the pretrained
# backbone its LoRA deltas were learnt on, how many of its layers were kept, and the LoRA adapters' shape,
# scale and placement. Trainer settings (workers, strategy, stages) may change between runs.
BACKBONE_KEYS = ("backbone", "num_layers", "lora.r", "lora.alpha", "lora.target_modules")


def stage_from_index(index: int, use_mpo: bool) -> Stage:
    return STAGES[index] if use_mpo else ALL_AT_ONCE


def resolve_strategy(strategy: str, use_gpu: bool) -> str:
    """auto -> DeepSpeed ZeRO on GPUs, DDP on CPU."""
    if strategy == "auto":
        return "deepspeed" if use_gpu else "ddp"
    return strategy


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _batch_tensors(batch: dict[str, np.ndarray], max_history: int) -> dict[str, torch.Tensor]:
    return {
        "history": torch.from_numpy(pad_histories(list(batch["history"]), max_history)),
        "target": torch.from_numpy(np.array(batch["target"], dtype=np.int64)),  # a writable copy
        "candidates": torch.from_numpy(np.stack([np.asarray(c, dtype=np.int64) for c in batch["candidates"]])),
    }


def validate(module: torch.nn.Module, valid: Samples, features, active: list[str], batch_size: int,
             rank: int, world: int) -> dict[str, float]:
    """Valid-split metrics over all workers: each ranks its shard, sums are all-reduced."""
    import torch.distributed as dist

    shard = valid.subset(np.arange(rank, len(valid), world))
    table = catalog_tokens(module, features, active)
    ranks = rank_targets(module, shard, table, batch_size=batch_size, full=True, active=active)
    n = len(shard)
    sums = torch.tensor([n, hit_rate(ranks["candidates"], 1) * n, hit_rate(ranks["full"], 10) * n,
                         ndcg(ranks["full"], 10) * n], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    total = max(float(sums[0]), 1.0)
    return {METRIC: float(sums[1]) / total, "valid_hr10": float(sums[2]) / total,
            "valid_ndcg10": float(sums[3]) / total}


class _Engine:
    """DDP or DeepSpeed behind one interface: step(batch) -> losses, module, optimizer."""

    def __init__(self, model: torch.nn.Module, groups: list[dict], strategy: str, cfg, device: torch.device):
        self.strategy = strategy
        self.module = model
        self.cache = NegativeCache(cfg.trainer.negative_cache_steps)
        if strategy == "deepspeed":
            import deepspeed

            ds_config = {
                "train_micro_batch_size_per_gpu": cfg.trainer.batch_size,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": 5.0,
                "zero_optimization": {"stage": cfg.trainer.zero_stage},
                "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 10**9,
            }
            # A client AdamW: DeepSpeed's fused CPU Adam would compile C++ ops on first use (~90 s).
            optimizer = torch.optim.AdamW(groups, weight_decay=cfg.trainer.weight_decay)
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                     config=ds_config)
            if self.engine.global_rank == 0:
                log.info("DeepSpeed ZeRO-%d on %s (%s backend), client AdamW, micro-batch %d, bf16 %s",
                         cfg.trainer.zero_stage, deepspeed.get_accelerator().device_name(),
                         deepspeed.get_accelerator().communication_backend_name(), cfg.trainer.batch_size,
                         ds_config["bf16"]["enabled"])
        else:
            import ray.train.torch

            self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.trainer.weight_decay)
            # Unused parameters happen legitimately (a batch without any image item in stage 3).
            self.engine = ray.train.torch.prepare_model(
                model, move_to_device=device, parallel_strategy="ddp" if _world() > 1 else None,
                parallel_strategy_kwargs={"find_unused_parameters": True} if _world() > 1 else None)

    def step(self, batch, features, active, *, step: int, seed: int, loss_pool: str, negatives: int,
             teacher: torch.nn.Module | None = None) -> dict[str, float]:
        if self.strategy != "deepspeed":
            return train_step(self.engine, self.optimizer, batch, features, active, step=step, seed=seed,
                              loss_pool=loss_pool, max_grad_norm=5.0, cache=self.cache, teacher=teacher,
                              negatives=negatives)
        cached = self.cache.get(self.module, features, active, step) if loss_pool == "catalog" else None
        self.engine.train()
        device = features.text.device
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        history = batch["history"].to(device)
        candidates, pool = loss_pool_inputs(loss_pool, batch, features.num_items, negatives, generator, device)
        out = self.engine(history, batch["target"].to(device), candidates, features, list(active), generator,
                          cached, teacher_scores(teacher, history), negatives=pool)
        self.engine.backward(out["loss"])
        self.engine.step()
        return {k: float(v.detach()) for k, v in out.items()}


def _without_shm_comm() -> None:
    """DeepSpeed on CPU: no shared-memory all-reduce op. DeepSpeed JIT-compiles it (deepspeed_shm_comm, C++)
    when its comm backend starts, ~1 min on 2 cores on every machine without a build cache; it speeds up
    CPU inference all-reduces, while training here reduces through gloo (torch.distributed) without it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _world() -> int:
    import ray.train

    return ray.train.get_context().get_world_size()


def _save(model, optimizer, meta: dict[str, Any], strategy: str) -> str:
    """Write a checkpoint to a fresh local folder (rank 0). DDP also keeps the optimizer moments;
    DeepSpeed partitions them over ranks, so its resume restores weights and loop state only."""
    directory = tempfile.mkdtemp(prefix="speeder-ckpt-")
    save_checkpoint(directory, model, meta, optimizer=optimizer if strategy == "ddp" else None)
    return directory


def backbone_settings(model: dict[str, Any]) -> dict[str, Any]:
    """The BACKBONE_KEYS of a `config.model` mapping (as to_dict writes it), by dotted path."""
    out = {}
    for key in BACKBONE_KEYS:
        value: Any = model
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out[key] = value
    return out


def check_backbone(meta: dict[str, Any], cfg, checkpoint: str) -> None:
    """Refuse (CheckpointError, one line naming both) a checkpoint trained with other backbone settings
    (BACKBONE_KEYS) than `cfg`: its LoRA weights would load, or fail with a shape error, into another model."""
    recorded_model = (meta.get("config") or {}).get("model")
    if not isinstance(recorded_model, dict):
        raise CheckpointError(f"checkpoint {checkpoint} records no model config (config.model in meta.json), so "
                              "its backbone is unknown; start the stage without it (a new trainer.run_name)")
    # Compared as the checkpoint records its config: redacted (a secret in a backbone path would differ).
    recorded, current = backbone_settings(recorded_model), backbone_settings(redact(to_dict(cfg))["model"])
    differ = [key for key in BACKBONE_KEYS if recorded[key] != current[key]]
    if differ:
        def show(values: dict[str, Any]) -> str:
            return ", ".join(f"model.{key}={values[key]!r}" for key in differ)

        raise CheckpointError(f"checkpoint {checkpoint} was trained with {show(recorded)}, but this run's config "
                              f"has {show(current)}; set them back, or train from scratch under a new "
                              "trainer.run_name")


def check_restorable(meta: dict[str, Any], cfg, features_set: FeaturesSet, checkpoint: str) -> None:
    """A checkpoint this stage may resume from or start with: trained on these features (FeaturesError)
    and with this backbone (CheckpointError); both one-line errors naming the checkpoint's and the run's."""
    check_checkpoint(meta, features_set, checkpoint)  # features re-made since it was saved: refused
    check_backbone(meta, cfg, checkpoint)


def _load_resume(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, cfg,
                 features_set: FeaturesSet, checkpoint: str) -> dict[str, Any]:
    """Load this stage's own checkpoint (a local folder) into the model (and optimizer), checked first."""
    check_restorable(read_meta(directory), cfg, features_set, checkpoint)
    return load_checkpoint(directory, model, optimizer)


def _load_init(checkpoint: str, model: torch.nn.Module, cfg, features_set: FeaturesSet) -> None:
    """Load the previous stage's weights (a checkpoint URI) into the model, checked first."""
    with tempfile.TemporaryDirectory() as d:
        storage.download_dir(checkpoint, d)
        check_restorable(read_meta(d), cfg, features_set, checkpoint)
        load_checkpoint(d, model)


def _restore(model: torch.nn.Module, groups: list[dict], strategy: str, cfg, device: torch.device, stage: Stage,
             state: dict[str, Any], features_set: FeaturesSet, loop_config: dict[str, Any], rank: int) -> _Engine:
    """Restores the model (and, with DDP, the optimizer) and returns the engine: this stage's own latest
    checkpoint after a failure (state updated from it, resumes counted), else the previous stage's weights,
    else the model as built. Either checkpoint only if trained on these features with this backbone."""
    import ray.train

    resume = ray.train.get_checkpoint()
    engine = None
    if strategy == "ddp":  # DDP restores the optimizer's moments too, so it is built first
        engine = _Engine(model, groups, strategy, cfg, device)
    if resume is not None:
        with resume.as_directory() as d:
            meta = _load_resume(d, model, engine.optimizer if engine is not None else None, cfg, features_set,
                                resume.path)
        state.update(meta["train_state"])
        state["resumes"] += 1
        if rank == 0:
            log.info("stage %d resumes from its checkpoint at epoch %d step %d", stage.index, state["epoch"],
                     state["step"])
    elif loop_config.get("init_checkpoint"):
        _load_init(loop_config["init_checkpoint"], model, cfg, features_set)
        if rank == 0:
            log.info("stage %d starts from %s", stage.index, loop_config["init_checkpoint"])
    return engine if engine is not None else _Engine(model, groups, strategy, cfg, device)


def _worker_nodes(world: int) -> list[str]:
    """The Ray node id of every rank (gathered over the process group when there is more than one)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    import torch.distributed as dist

    nodes: list = [None] * world
    dist.all_gather_object(nodes, node)
    return nodes


def _log_progress(stage: Stage, cfg, epoch: int, i: int, steps_per_epoch: int, losses: list[float],
                  out: dict[str, float], seen: int, t0: float, world: int, lr: float) -> None:
    """One progress line: losses over the last log_every steps, the lr factor (trainer.lr_schedule), samples/s
    and the stage's ETA."""
    t = cfg.trainer
    rate = seen / max(time.perf_counter() - t0, 1e-9)
    left = (steps_per_epoch * t.epochs - (epoch * steps_per_epoch + i + 1)) * t.batch_size * world / max(rate, 1e-9)
    log.info("stage %d (%s) epoch %d/%d step %d/%d loss %.4f rec %.4f dense %.4f ppt %.4f | lr x%.3f | "
             "%.1f samples/s | ETA %s", stage.index, stage.name, epoch + 1, t.epochs, i + 1,
             steps_per_epoch, np.mean(losses[-t.log_every:]), out["rec_loss"], out["dense_loss"],
             out["ppt_loss"], lr, rate, _format_eta(left))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point run by Ray Train on every worker for one stage."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = from_dict(loop_config["config"])
    t = cfg.trainer
    stage = stage_from_index(loop_config["stage"], cfg.model.use_mpo)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(loop_config.get("threads", 1))
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
    strategy = resolve_strategy(t.strategy, t.use_gpu)
    if strategy == "deepspeed" and not t.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _without_shm_comm()

    # Whole features only (table = what meta.json committed); their fingerprint goes into every checkpoint.
    features_set = committed_features(cfg.data.uri, cfg.featurize.name)
    features = load_item_features(cfg.data.uri, cfg.featurize.name).to(device)
    available = available_modalities(features)
    active = [m for m in stage.modalities if m in cfg.model.modalities and m in available]
    valid = load_samples(cfg.data.uri, "valid", cfg.model.max_history)
    model = build_from_config(cfg.model, features.dims(), seed=t.seed,
                              features_dir=features_folder(cfg.data.uri, cfg.featurize.name)).to(device)
    groups = stage_groups(model, stage, t)
    # Described before the engine takes them: DeepSpeed ZeRO replaces each group's parameters with this
    # rank's flat partition, which would record a shard's size instead of the model's.
    optimizer_groups = describe_groups(groups)
    # Dropout draws from the global generator (build_from_config seeds only its own fork): seeded by
    # (seed, stage, rank), so a run is repeatable and the same on any cluster shape.
    torch.manual_seed(t.seed * 1_000_003 + stage.index * 1_009 + rank)
    # model.distill_weight: featurize's SASRec is the teacher (only where the stage feeds sequences).
    teacher = None
    if cfg.model.distill_weight and "sequence" in active:
        teacher = sequence_encoder_from(features_folder(cfg.data.uri, cfg.featurize.name)).to(device)

    # Loop state, saved in every checkpoint; "resumes" counts restarts from this stage's own checkpoints.
    # loss_curve: the mean training loss of every log_every steps and the lr factor of its last step (the
    # stage's trainer.lr_schedule), [{"step", "loss", "lr_factor"}], for the report.
    state = {"epoch": 0, "step": 0, "step_in_epoch": 0, "best": -1.0, "bad_epochs": 0, "resumes": 0,
             "loss_curve": []}
    engine = _restore(model, groups, strategy, cfg, device, stage, state, features_set, loop_config, rank)

    nodes = _worker_nodes(world)
    steps_per_epoch = loop_config["steps_per_epoch"]
    shard = ray.train.get_dataset_shard("train")
    # The config without secrets: its runtime_env.env_vars are where users put environment variables.
    meta_base = {"stage": stage.index, "stage_name": stage.name, "modalities": active,
                 "config": redact(to_dict(cfg)), "feature_dims": features.dims(), "backbone": cfg.model.backbone,
                 "strategy": strategy, "worker_nodes": nodes, "features": checkpoint_record(features_set),
                 "optimizer_groups": optimizer_groups}

    def report(metrics: dict[str, float], with_checkpoint: bool) -> None:
        meta = {**meta_base, "step": state["step"], "epoch": state["epoch"], "train_state": dict(state),
                "metrics": metrics}
        directory = _save(model, engine.optimizer, meta, strategy) if with_checkpoint and rank == 0 else None
        # The local folder goes once Ray Train has copied it to storage (it defaults to keeping it: a
        # leaked folder per epoch, ~70 MB each on the demo's model).
        ray.train.report({**metrics, "stage": stage.index, "epoch": state["epoch"], "step": state["step"]},
                         checkpoint=Checkpoint.from_directory(directory) if directory else None,
                         delete_local_checkpoint_after_upload=directory is not None)

    while state["epoch"] < t.epochs:
        epoch = state["epoch"]
        t0, seen, losses = time.perf_counter(), 0, []
        batches = shard.iter_batches(batch_size=t.batch_size, batch_format="numpy", drop_last=True,
                                     local_shuffle_buffer_size=max(4 * t.batch_size, 256),
                                     local_shuffle_seed=t.seed * 1000 + epoch)
        for i, raw in enumerate(batches):
            if i >= steps_per_epoch:
                break
            if i < state["step_in_epoch"]:
                continue  # resumed mid-epoch: these batches were already trained on
            # The stage's lr schedule, from the step alone: a resumed run continues where it stopped.
            factor = lr_factor(t.lr_schedule, state["step"], steps_per_epoch * t.epochs, t.lr_warmup)
            set_lr(engine.optimizer, factor)
            out = engine.step(_batch_tensors(raw, cfg.model.max_history), features, active, step=state["step"],
                              seed=t.seed, loss_pool=t.loss_pool, negatives=t.sampled_negatives,
                              teacher=teacher)
            state["step"] += 1
            state["step_in_epoch"] = i + 1
            seen += t.batch_size * world
            losses.append(out["loss"])
            if state["step"] % t.log_every == 0 or i + 1 == steps_per_epoch:
                state["loss_curve"].append({"step": state["step"], "loss": float(np.mean(losses[-t.log_every:])),
                                            "lr_factor": factor})
            if rank == 0 and (state["step"] % t.log_every == 0 or i + 1 == steps_per_epoch):
                _log_progress(stage, cfg, epoch, i, steps_per_epoch, losses, out, seen, t0, world, factor)
            if t.checkpoint_every and state["step"] % t.checkpoint_every == 0 and i + 1 < steps_per_epoch:
                report({METRIC: -1.0, "train_loss": float(np.mean(losses))}, with_checkpoint=True)
        metrics = validate(engine.module, valid, features, active, t.eval_batch_size, rank, world)
        metrics["train_loss"] = float(np.mean(losses)) if losses else float("nan")
        metrics["samples_per_s"] = seen / max(time.perf_counter() - t0, 1e-9)
        improved = metrics[METRIC] > state["best"]
        state.update(epoch=epoch + 1, step_in_epoch=0, best=max(state["best"], metrics[METRIC]),
                     bad_epochs=0 if improved else state["bad_epochs"] + 1)
        if rank == 0:
            log.info("stage %d epoch %d: valid HR@1 %.4f (best %.4f), HR@10 %.4f, NDCG@10 %.4f, %.1f samples/s",
                     stage.index, epoch + 1, metrics[METRIC], state["best"], metrics["valid_hr10"],
                     metrics["valid_ndcg10"], metrics["samples_per_s"])
        report(metrics, with_checkpoint=True)
        if state["bad_epochs"] >= t.patience:
            if rank == 0:
                log.info("stage %d stops early: no better valid HR@1 for %d epoch(s)", stage.index, t.patience)
            break

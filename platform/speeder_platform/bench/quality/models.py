"""Training the systems `speeder bench quality` compares, in one process, with the trainer's recipe.

Every Speeder variant starts from a job spec's model and trainer settings (jobs/demo.yaml for ML-100K,
jobs/synthetic.yaml for the synthetic catalog) plus the variant's model overrides, and trains with the
trainer's own pieces: the same optimizer groups (`modeling.stage_groups`, the vision gate's lr scale
included), the same loss and step (`speeder.loop.train_step`), the same per-stage samples
(`train.stage_sample_indices`) and steps per stage (`train.steps_per_epoch` x trainer.epochs). What
differs from `speeder train` is only the process: one, without Ray Train. A variant with fewer stages
gets the full model's total steps spread over the stages it runs (equal compute).

The multi-token baseline (LLaRA style, `speeder.baselines.llara`) trains on the same backbone with the
same LoRA settings, teacher-forced on the candidate prompts, for its own (smaller, stated) budget:
its prompts are ~10x longer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from speeder.loop import Samples, evaluate, fit, lr_factor
from speeder.mpo import Stage, plan_stages
from speeder.mrc import ItemFeatures
from speeder_platform.config import ModelConfig, SpeederConfig, load_config
from speeder_platform.tables import available_modalities

log = logging.getLogger("speeder.bench")

@dataclass
class Budget:
    """What the bench adds to a recipe: validation, curve resolution, and the multi-token baseline's budget."""

    curve_points: int = 8  # loss points per stage
    valid_users: int = 300  # stage-end validation on a seeded subset of the valid split (0: all)
    llara_steps: int = 60
    llara_batch_size: int = 4
    llara_eval_users: int = 200  # seeded subset of the test split (generation is slow); 0: all

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class TrainedSpeeder:
    model: Any  # SpeederModel
    active: list[str]  # modalities of the last stage
    stages: list[dict[str, Any]] = field(default_factory=list)  # curve, valid metrics, seconds per stage
    seconds: float = 0.0


def variant_config(spec: str, base: list[str], variant: list[str]) -> SpeederConfig:
    """The validated config of a variant: the spec, the bench's overrides, then the variant's."""
    return load_config(spec, [*base, *variant])


def plan_for(cfg: ModelConfig, features: ItemFeatures) -> list[Stage]:
    """The MPO stages a variant runs on this catalog (stage 2 is a no-op without images)."""
    return plan_stages([1, 2, 3], available_modalities(features) & set(cfg.modalities), cfg.use_mpo)


def recipe_steps(cfg: SpeederConfig, features: ItemFeatures, num_train: int) -> dict[int, int]:
    """Optimiser steps per stage that `speeder train` runs with cfg on one worker (the bench is one
    process): samples per stage (trainer.stage_samples / max_train_samples, more than the split included; else the
    split) / batch x epochs."""
    from speeder_platform.train.driver import stage_sample_limit, steps_per_epoch

    one = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, num_workers=1))
    return {s.index: steps_per_epoch(stage_sample_limit(one, s.index) or num_train, one)
            * one.trainer.epochs for s in plan_for(cfg.model, features)}


def equal_compute_steps(full: dict[int, int], plan: list[Stage]) -> dict[int, int]:
    """Steps per stage for a variant running `plan`, so it spends the full model's total: each stage keeps
    its share of the full model's steps (a stage the full model lacks counts as the last one's)."""
    total = sum(full.values())
    base = {s.index: full.get(s.index, full[max(full)]) for s in plan}
    scale = total / sum(base.values())
    steps = {i: max(1, math.floor(n * scale)) for i, n in base.items()}
    steps[plan[-1].index] += total - sum(steps.values())  # rounding goes to the last stage
    return steps


def valid_subset(valid: Samples, users: int, seed: int) -> Samples:
    if not users or users >= len(valid):
        return valid
    return valid.subset(np.sort(np.random.default_rng([seed, 5]).choice(len(valid), users, replace=False)))


def _stage_lr(step: int, *, t: Any, offset: int, total: int) -> float:
    return lr_factor(t.lr_schedule, offset + step, total, t.lr_warmup)


def _train_stage(model: Any, stage: Stage, active: list[str], train: Samples, features: ItemFeatures, steps: int,
                 cfg: SpeederConfig, curve_points: int, teacher: Any = None) -> tuple[list[dict[str, float]],
                                                                                      list[dict]]:
    """`steps` optimiser steps of one stage through `fit`, in `curve_points` chunks -> the loss curve and the
    optimizer groups (as `modeling.describe_groups`)."""
    from speeder_platform.modeling import describe_groups, stage_groups
    from speeder_platform.train.driver import stage_sample_indices

    t = cfg.trainer
    groups = stage_groups(model, stage, t)
    optimizer = torch.optim.AdamW(groups, weight_decay=t.weight_decay)
    bs = t.batch_size
    order = stage_sample_indices(len(train), steps * bs, t.seed, stage.index)
    bounds = np.linspace(0, steps, min(curve_points, steps) + 1).astype(int)
    curve = []
    for c in range(len(bounds) - 1):
        chunk = train.subset(order[bounds[c] * bs:bounds[c + 1] * bs])
        # The trainer's schedule over the stage's steps (this chunk starts at step bounds[c]).
        lr_at = partial(_stage_lr, t=t, offset=int(bounds[c]), total=steps)
        epoch = fit(model, optimizer, chunk, features, active, epochs=1, batch_size=bs, seed=t.seed * 1000 + c,
                    loss_pool=t.loss_pool, log_every=0, negative_cache_steps=t.negative_cache_steps,
                    teacher=teacher, negatives=t.sampled_negatives, lr_at=lr_at)[0]
        first = optimizer.param_groups[0]  # the lr its last step used, over the group's base: the schedule's factor
        curve.append({"step": int(bounds[c + 1]), "loss": epoch["loss"], "samples_per_s": epoch["samples_per_s"],
                      "lr_factor": first["lr"] / first.get("initial_lr", first["lr"])})
        log.info("  stage %d (%s) step %d/%d loss %.4f (%.1f samples/s)", stage.index, stage.name, bounds[c + 1],
                 steps, epoch["loss"], epoch["samples_per_s"])
    return curve, describe_groups(groups)


def train_speeder(cfg: SpeederConfig, train: Samples, valid: Samples | None, features: ItemFeatures,
                  steps_per_stage: dict[int, int], curve_points: int = 8,
                  features_dir: str | None = None) -> TrainedSpeeder:
    """Build a variant (cfg.model, seeded by trainer.seed) and run its MPO stages for `steps_per_stage`;
    each stage continues from the last one's weights. features_dir: features/<name>, for the variants
    that read featurize's SASRec (sequence user state, distillation)."""
    from speeder_platform.modeling import build_from_config, sequence_encoder_from

    t0 = time.perf_counter()
    seed = cfg.trainer.seed
    torch.manual_seed(seed)  # dropout draws from the global generator: every variant starts from the same state
    model = build_from_config(cfg.model, features.dims(), seed=seed, features_dir=features_dir)
    available = available_modalities(features)
    plan = plan_for(cfg.model, features)
    if not plan:
        raise ValueError(f"model.modalities {cfg.model.modalities}: nothing to train on modalities {sorted(available)}")
    teacher = sequence_encoder_from(features_dir) if cfg.model.distill_weight and features_dir else None
    result = TrainedSpeeder(model=model, active=[])
    for stage in plan:
        s0 = time.perf_counter()
        active = [m for m in stage.modalities if m in cfg.model.modalities and m in available]
        curve, groups = _train_stage(model, stage, active, train, features, steps_per_stage[stage.index], cfg,
                                     curve_points, teacher=teacher if "sequence" in active else None)
        train_seconds = time.perf_counter() - s0
        metrics = evaluate(model, valid, features, active) if valid is not None and len(valid) else {}
        result.stages.append({"stage": stage.index, "name": stage.name, "modalities": active,
                              "steps": steps_per_stage[stage.index], "curve": curve, "valid": metrics,
                              "optimizer_groups": groups,
                              "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - s0, 1)})
        result.active = active
        if metrics:
            log.info("  stage %d (%s): valid HR@1 %.4f, HR@10 %.4f in %.0fs", stage.index, stage.name,
                     metrics["cand_hr@1"], metrics["full_hr@10"], time.perf_counter() - s0)
    result.seconds = time.perf_counter() - t0
    return result


# -- the multi-token baseline ------------------------------------------------------------------------
def build_llara(cfg: ModelConfig, titles: list[str], behaviour: torch.Tensor, seed: int) -> Any:
    """LlaraRecommender on cfg's backbone, with cfg's LoRA (the same settings as Speeder)."""
    from speeder.backbone import add_lora, load_backbone
    from speeder.baselines.llara import LlaraRecommender

    backbone = load_backbone(cfg.backbone, num_layers=cfg.num_layers, dtype=cfg.dtype)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        add_lora(backbone, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                 target_modules=list(cfg.lora.target_modules))
        return LlaraRecommender(backbone, titles, behaviour)


def train_llara(model: Any, train: Samples, budget: Budget, seed: int, lr: float,
                lora_lr: float) -> list[dict[str, float]]:
    """Teacher-forced answer loss on candidate prompts for budget.llara_steps steps -> the loss curve."""
    from speeder_platform.train.driver import stage_sample_indices

    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    optimizer = torch.optim.AdamW([{"params": lora, "lr": lora_lr}, {"params": other, "lr": lr}],
                                  weight_decay=0.0)
    bs, steps = budget.llara_batch_size, budget.llara_steps
    torch.manual_seed(seed)
    order = stage_sample_indices(len(train), steps * bs, seed, 0)
    every = max(1, steps // budget.curve_points)
    losses, curve, t0 = [], [], time.perf_counter()
    model.train()
    for step in range(steps):
        batch = train.subset(order[step * bs:(step + 1) * bs])
        loss = model(torch.from_numpy(batch.history), torch.from_numpy(batch.target),
                     torch.from_numpy(batch.candidates))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora + other, 5.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % every == 0 or step + 1 == steps:
            rate = (step + 1) * bs / (time.perf_counter() - t0)
            curve.append({"step": step + 1, "loss": float(np.mean(losses[-every:])), "samples_per_s": rate})
            log.info("  LLaRA step %d/%d loss %.4f (%.2f samples/s)", step + 1, steps, curve[-1]["loss"], rate)
    return curve


def llara_ranks(model: Any, test: Samples, batch_size: int = 8) -> np.ndarray:
    """Candidate-protocol ranks of a generating model: 0 named the target, 1 another, -1 invalid."""
    model.eval()
    ranks = [model.rank_candidates(b["history"], b["candidates"], b["target"]) for b in test.batches(batch_size)]
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)

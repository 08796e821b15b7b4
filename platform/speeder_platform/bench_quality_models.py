"""Training the systems `speeder bench quality` compares, in one process, on a fixed step budget.

Speeder and its ablations train with the project's single-process loop (`speeder.loop.fit`, the
MPO stages of `speeder.mpo`): one optimiser per stage, the stage's step budget cut into a few
`fit` calls so each stage leaves a training curve, then validation at the end of the stage.
The budget is per MPO stage, as `trainer.epochs` is: a variant runs `steps` optimiser steps in every
stage it has (text only: stage 1; no vision: stages 1 and 3), except "no MPO", whose single stage
gets as many steps as the full model's stages together (the same compute, all modalities at once).

The multi-token baseline (LLaRA style, `speeder.baselines.llara`) trains on the same backbone with the
same LoRA settings, teacher-forced on the candidate prompts, for its own (smaller, stated) budget:
its prompts are ~10x longer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from speeder.loop import Samples, evaluate, fit
from speeder.mpo import GATE_LR_SCALE, Stage, apply_stage, plan_stages
from speeder.mrc import ItemFeatures
from speeder_platform.config import ModelConfig, load_config
from speeder_platform.tables import available_modalities

log = logging.getLogger("speeder.bench")

# Ablations of DESIGN 4 as model-config overrides (the list; "no MPO" = every modality at once).
VARIANTS: dict[str, list[str]] = {
    "Speeder": [],
    "no PPT": ["model.ppt_lambda=0"],
    "no PPL": ["model.use_ppl=false"],
    "no MPO": ["model.use_mpo=false"],
    "text only": ["model.modalities=[text]"],
    "no vision": ["model.modalities=[text,sequence]"],
    "no sequence": ["model.modalities=[text,vision]"],  # content only: what vision adds where ids do not
}


@dataclass
class Budget:
    """What every model may spend. Defaults are set per dataset by the bench's CLI."""

    steps: int  # optimiser steps per MPO stage (no MPO: the full model's stages x steps in its one stage)
    batch_size: int = 16
    lr: float = 1e-3  # MRC, PPL, heads (and the LLaRA projector)
    lora_lr: float = 3e-4
    text_lr_scale: float = 0.1  # MPO stage 2
    negative_cache_steps: int = 0  # the trainer's default (fresh tokens for every item)
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


def model_config(base: list[str], variant: list[str]) -> ModelConfig:
    """The validated model config of a variant: the bench's base overrides, then the variant's."""
    return load_config(None, [*base, *variant]).model


def plan_for(cfg: ModelConfig, features: ItemFeatures) -> list[Stage]:
    """The MPO stages a variant runs on this catalog (stage 2 is a no-op without images)."""
    return plan_stages([1, 2, 3], available_modalities(features) & set(cfg.modalities), cfg.use_mpo)


def sample_order(n: int, count: int, seed: int) -> np.ndarray:
    """`count` sample indices: seeded permutations of 0..n-1, one after the other (epochs)."""
    rng = np.random.default_rng(seed)
    reps = -(-count // n)
    return np.concatenate([rng.permutation(n) for _ in range(reps)])[:count]


def valid_subset(valid: Samples, users: int, seed: int) -> Samples:
    if not users or users >= len(valid):
        return valid
    return valid.subset(np.sort(np.random.default_rng([seed, 5]).choice(len(valid), users, replace=False)))


def _train_stage(model: Any, stage: Stage, active: list[str], train: Samples, features: ItemFeatures, steps: int,
                 budget: Budget, seed: int, teacher: Any = None) -> list[dict[str, float]]:
    """`steps` optimiser steps of one stage through `fit`, in `curve_points` chunks -> the loss curve."""
    groups = apply_stage(model, stage, lr=budget.lr, lora_lr=budget.lora_lr, text_lr_scale=budget.text_lr_scale,
                         gate_lr_scale=GATE_LR_SCALE)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    bs = budget.batch_size
    order = sample_order(len(train), steps * bs, seed)
    bounds = np.linspace(0, steps, min(budget.curve_points, steps) + 1).astype(int)
    curve = []
    for c in range(len(bounds) - 1):
        chunk = train.subset(order[bounds[c] * bs:bounds[c + 1] * bs])
        epoch = fit(model, optimizer, chunk, features, active, epochs=1, batch_size=bs, seed=seed * 1000 + c,
                    log_every=0, negative_cache_steps=budget.negative_cache_steps, teacher=teacher)[0]
        curve.append({"step": int(bounds[c + 1]), "loss": epoch["loss"], "samples_per_s": epoch["samples_per_s"]})
        log.info("  stage %d (%s) step %d/%d loss %.4f (%.1f samples/s)", stage.index, stage.name, bounds[c + 1],
                 steps, epoch["loss"], epoch["samples_per_s"])
    return curve


def train_speeder(cfg: ModelConfig, train: Samples, valid: Samples | None, features: ItemFeatures, budget: Budget,
                  seed: int, steps_per_stage: int | None = None, teacher: Any = None,
                  features_dir: str | None = None) -> TrainedSpeeder:
    """Build a variant and run its MPO stages (`steps_per_stage`, default budget.steps, each); each stage
    continues from the last one's weights."""
    from speeder_platform.modeling import build_from_config

    t0 = time.perf_counter()
    torch.manual_seed(seed)  # dropout draws from the global generator: every variant starts from the same state
    model = build_from_config(cfg, features.dims(), seed=seed, features_dir=features_dir)
    available = available_modalities(features)
    plan = plan_for(cfg, features)
    if not plan:
        raise ValueError(f"model.modalities {cfg.modalities}: nothing to train on modalities {sorted(available)}")
    per_stage = steps_per_stage or budget.steps
    if isinstance(per_stage, int):
        per_stage = {stage.index: per_stage for stage in plan}
    result = TrainedSpeeder(model=model, active=[])
    for stage in plan:
        s0 = time.perf_counter()
        active = [m for m in stage.modalities if m in cfg.modalities and m in available]
        curve = _train_stage(model, stage, active, train, features, per_stage[stage.index], budget,
                             seed * 100 + stage.index,
                             teacher=teacher if cfg.distill_weight else None)
        train_seconds = time.perf_counter() - s0
        metrics = evaluate(model, valid, features, active) if valid is not None and len(valid) else {}
        result.stages.append({"stage": stage.index, "name": stage.name, "modalities": active,
                              "steps": per_stage[stage.index],
                              "curve": curve, "valid": metrics, "train_seconds": round(train_seconds, 1),
                              "seconds": round(time.perf_counter() - s0, 1)})
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


def train_llara(model: Any, train: Samples, budget: Budget, seed: int) -> list[dict[str, float]]:
    """Teacher-forced answer loss on candidate prompts for budget.llara_steps steps -> the loss curve."""
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    optimizer = torch.optim.AdamW([{"params": lora, "lr": budget.lora_lr}, {"params": other, "lr": budget.lr}],
                                  weight_decay=0.0)
    bs, steps = budget.llara_batch_size, budget.llara_steps
    torch.manual_seed(seed)
    order = sample_order(len(train), steps * bs, seed)
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

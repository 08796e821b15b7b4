"""The config boundary of the model: `ModelConfig` -> typed `SpeederSettings` and a built model."""

from __future__ import annotations

import numpy as np
from torch import nn

from speeder.model import SpeederModel, SpeederSettings, build_model
from speeder.mpo import Stage, apply_stage
from speeder_platform.config import ModelConfig, TrainerConfig

# Feature sizes of the default encoders (MiniLM, EfficientNet-Lite0, SASRec with hidden 64), used
# where a model is described before any features exist (`speeder model info`).
DEFAULT_FEATURE_DIMS = {"text": 384, "vision": 1280, "sequence": 64}


def settings_from_config(model: ModelConfig, feature_dims: dict[str, int]) -> SpeederSettings:
    return SpeederSettings(
        feature_dims=dict(feature_dims),
        max_history=model.max_history,
        mrc_hidden=model.mrc.hidden_size,
        mrc_layers=model.mrc.num_layers,
        mrc_heads=model.mrc.num_heads,
        mrc_dropout=model.mrc.dropout,
        use_ppl=model.use_ppl,
        ppt_lambda=model.ppt_lambda,
        ppt_pairs=model.ppt_pairs,
        modalities=list(model.modalities),
        readout=model.readout,
        dense_weight=model.dense_weight,
        item_prior=model.item_prior,
        sequence_skip=model.sequence_skip,
        distill_weight=model.distill_weight,
        readout_skip=model.readout_skip,
        # Without sequence features (featurize.sasrec.epochs=0) there is no SASRec to read a user state from.
        sequence_user=model.sequence_user and feature_dims.get("sequence", 0) > 0,
        item_norms=model.item_norms,
        sequence_dropout=model.sequence_dropout,
        content_mix=model.content_mix,
        residual_readout=model.residual_readout,
        history_taste=model.history_taste,
    )


def sequence_encoder_from(features_dir: str) -> nn.Module:
    """featurize's SASRec (features/<name>/sasrec), in eval mode: the sequence encoder whose item
    embeddings are the sequence features (model.sequence_user reads it, distillation learns from it)."""
    from speeder import schema
    from speeder_platform import storage
    from speeder_platform.featurize.sequence import SASREC_META, load_sasrec, sasrec_dir
    from speeder_platform.tables import dense_column

    directory = sasrec_dir(features_dir)
    if not storage.exists(storage.join(directory, SASREC_META)):
        raise FileNotFoundError(f"no trained SASRec in {directory}: model.sequence_user and model.distill_weight "
                                "read featurize's SASRec (featurize trains it unless featurize.sasrec.epochs=0; "
                                "or set model.sequence_user=false)")
    encoder = load_sasrec(directory)[0]
    # The encoder and the table's seq_emb must be one SASRec (a featurize cut short between the two would not be).
    table = storage.read_table(storage.join(features_dir, schema.ITEMS_FILE), columns=[schema.ITEM_ID, schema.SEQ_EMB])
    values, present = dense_column(table.sort_by(schema.ITEM_ID).column(schema.SEQ_EMB), table.num_rows)
    mine = encoder.item_embeddings().detach().numpy()
    if mine.shape != values.shape or not np.allclose(mine[present], values[present], atol=1e-5):
        raise ValueError(f"{directory}: the SASRec weights are not the ones whose item embeddings are the table's "
                         "seq_emb (featurize interrupted between them?): run `speeder featurize --force`")
    return encoder


def build_from_config(model: ModelConfig, feature_dims: dict[str, int], seed: int = 0,
                      features_dir: str | None = None, sequence_encoder: nn.Module | None = None) -> SpeederModel:
    """Backbone + LoRA + Speeder parts as the config says, initialised from `seed`. A model that reads
    featurize's SASRec (model.sequence_user, with sequence features) takes it from features_dir
    (features/<name>), or from `sequence_encoder` when given."""
    settings = settings_from_config(model, feature_dims)
    if settings.sequence_user and sequence_encoder is None:
        if features_dir is None:
            raise ValueError("model.sequence_user: build_from_config needs the features folder (its SASRec)")
        sequence_encoder = sequence_encoder_from(features_dir)
    speeder = build_model(
        model.backbone,
        settings,
        lora_r=model.lora.r,
        lora_alpha=model.lora.alpha,
        lora_dropout=model.lora.dropout,
        lora_targets=list(model.lora.target_modules),
        num_layers=model.num_layers,
        dtype=model.dtype,
        seed=seed,
        sequence_encoder=sequence_encoder if settings.sequence_user else None,
    )
    if model.gradient_checkpointing:
        speeder.backbone.gradient_checkpointing_enable()
    return speeder


def describe_groups(groups: list[dict]) -> list[dict]:
    """Optimizer parameter groups as plain data: name, parameter count, base lr (before trainer.lr_schedule),
    weight decay (recorded by the trainer in checkpoints and by the quality bench in its results, so the two
    can be compared)."""
    return [{"name": g["name"], "params": sum(p.numel() for p in g["params"]), "lr": g.get("initial_lr", g["lr"]),
             "weight_decay": g["weight_decay"]} for g in groups]


def stage_groups(model: nn.Module, stage: Stage, trainer: TrainerConfig) -> list[dict]:
    """The optimizer's parameter groups for an MPO stage, from the trainer config: the one recipe that
    `speeder train` and `speeder bench quality` both use."""
    return apply_stage(model, stage, lr=trainer.lr, lora_lr=trainer.lora_lr, text_lr_scale=trainer.text_lr_scale,
                       weight_decay=trainer.weight_decay, gate_lr_scale=trainer.gate_lr_scale)

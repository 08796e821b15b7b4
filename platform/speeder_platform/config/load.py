"""Loading, validating and serialising configs: YAML plus dotlist overrides -> a checked `SpeederConfig`.

Errors (unknown key, wrong type, missing value, value out of range) raise `ConfigError` with a one-line
message that names the key, before any work starts.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from speeder.defaults import LOSS_POOLS, LR_SCHEDULES
from speeder_platform.config.schema import PREPARE_SOURCES, STEPS, ConfigError, SpeederConfig


def _choice(key: str, value: Any, allowed: tuple | list) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(key: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(cfg: SpeederConfig) -> SpeederConfig:
    """Range and choice checks OmegaConf's types cannot express; raises ConfigError naming the key."""
    for i, step in enumerate(cfg.steps):
        _choice(f"steps[{i}]", step, STEPS)
    _choice("prepare.source", cfg.prepare.source, PREPARE_SOURCES)
    if cfg.prepare.kcore < 1:
        raise ConfigError(f"prepare.kcore: must be >= 1, got {cfg.prepare.kcore}")
    if cfg.prepare.num_candidates < 2:
        raise ConfigError(f"prepare.num_candidates: must be >= 2, got {cfg.prepare.num_candidates}")
    _positive("prepare.max_history", cfg.prepare.max_history)
    syn = cfg.prepare.synthetic
    for name in ("num_users", "num_items", "num_categories", "num_colors", "min_length", "image_size"):
        _positive(f"prepare.synthetic.{name}", getattr(syn, name))
    if syn.max_length < syn.min_length:
        raise ConfigError(f"prepare.synthetic.max_length: {syn.max_length} < min_length {syn.min_length}")
    if not 0.0 <= syn.missing_image_rate <= 1.0:
        raise ConfigError(
            f"prepare.synthetic.missing_image_rate: must be in [0, 1], got {syn.missing_image_rate}"
        )
    for name in ("batch_size", "text_actors", "vision_actors", "actor_num_cpus", "image_size"):
        _positive(f"featurize.{name}", getattr(cfg.featurize, name))
    _choice("featurize.sasrec.objective", cfg.featurize.sasrec.objective, ("all_positions", "prefix"))
    _positive("featurize.actor_num_gpus", cfg.featurize.actor_num_gpus, allow_zero=True)
    for i, m in enumerate(cfg.model.modalities):
        _choice(f"model.modalities[{i}]", m, ("text", "vision", "sequence"))
    if not cfg.model.modalities:
        raise ConfigError("model.modalities: needs at least one modality")
    _choice("model.dtype", cfg.model.dtype, ("float32", "bfloat16", "float16"))
    _positive("model.max_history", cfg.model.max_history)
    _positive("model.ppt_lambda", cfg.model.ppt_lambda, allow_zero=True)
    _positive("model.content_mix", cfg.model.content_mix)
    if not 0.0 <= cfg.model.sequence_dropout < 1.0:
        raise ConfigError(f"model.sequence_dropout: must be in [0, 1), got {cfg.model.sequence_dropout}")
    _positive("model.dense_weight", cfg.model.dense_weight, allow_zero=True)
    _positive("model.distill_weight", cfg.model.distill_weight, allow_zero=True)
    _choice("model.readout", cfg.model.readout, ("final", "last_slot", "both"))
    if cfg.model.sequence_user and not cfg.model.sequence_skip:
        raise ConfigError("model.sequence_user: needs model.sequence_skip=true (the user state enters through it)")
    _positive("model.lora.r", cfg.model.lora.r)
    if cfg.model.mrc.hidden_size % cfg.model.mrc.num_heads:
        raise ConfigError(
            f"model.mrc.hidden_size: {cfg.model.mrc.hidden_size} is not divisible by "
            f"model.mrc.num_heads={cfg.model.mrc.num_heads}"
        )
    t = cfg.trainer
    _choice("trainer.strategy", t.strategy, ("auto", "ddp", "deepspeed"))
    if t.zero_stage == 3:  # refused rather than saving empty shards: see the message
        raise ConfigError("trainer.zero_stage: 3 is not supported: ZeRO-3 partitions the parameters themselves, and "
                          "checkpoints and validation read whole parameters on rank 0; use 2 (optimizer states and "
                          "gradients partitioned; the trainable part, LoRA and MRC, is small)")
    _choice("trainer.zero_stage", t.zero_stage, (1, 2))
    _choice("trainer.loss_pool", t.loss_pool, LOSS_POOLS)
    _choice("trainer.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    if not 0.0 <= t.lr_warmup < 1.0:
        raise ConfigError(f"trainer.lr_warmup: a share of each stage's steps in [0, 1), got {t.lr_warmup}")
    _positive("trainer.sampled_negatives", t.sampled_negatives)
    if cfg.model.distill_weight and t.loss_pool != "catalog":
        raise ConfigError(f"trainer.loss_pool: model.distill_weight > 0 needs the catalog softmax (the teacher scores "
                          f"every item), got {t.loss_pool!r}")
    _choice("trainer.placement_strategy", t.placement_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    if not t.stages:
        raise ConfigError("trainer.stages: needs at least one stage")
    for i, s in enumerate(t.stages):
        _choice(f"trainer.stages[{i}]", s, (1, 2, 3))
    if list(t.stages) != sorted(set(t.stages)):
        raise ConfigError(f"trainer.stages: must be increasing without repeats, got {list(t.stages)}")
    for name in ("num_workers", "epochs", "batch_size", "eval_batch_size", "lr", "lora_lr", "log_every"):
        _positive(f"trainer.{name}", getattr(t, name))
    for name in ("max_steps_per_epoch", "max_train_samples", "checkpoint_every"):
        _positive(f"trainer.{name}", getattr(t, name))
    if t.stage_samples and len(t.stage_samples) != len(t.stages):
        raise ConfigError(f"trainer.stage_samples: {len(t.stage_samples)} value(s) for {len(t.stages)} stage(s) "
                          f"{list(t.stages)}")
    for i, n in enumerate(t.stage_samples):
        _positive(f"trainer.stage_samples[{i}]", n)
    if t.stage_samples and t.max_train_samples is not None:  # one would be ignored without a word
        raise ConfigError(f"trainer.max_train_samples={t.max_train_samples} and trainer.stage_samples="
                          f"{list(t.stage_samples)} are both set; stage_samples would win: set one (stage_samples=[] "
                          "clears it)")
    _positive("trainer.text_lr_scale", t.text_lr_scale, allow_zero=True)
    _positive("trainer.gate_lr_scale", t.gate_lr_scale)
    _positive("trainer.cpus_per_worker", t.cpus_per_worker)
    _positive("trainer.negative_cache_steps", t.negative_cache_steps, allow_zero=True)
    _positive("trainer.patience", t.patience)
    _choice("evaluate.split", cfg.evaluate.split, ("valid", "test"))
    for name in ("k", "batch_size", "num_actors", "actor_num_cpus"):
        _positive(f"score.{name}", getattr(cfg.score, name))
    _positive("score.actor_num_gpus", cfg.score.actor_num_gpus, allow_zero=True)
    if cfg.score.date is not None:
        import datetime

        try:
            datetime.date.fromisoformat(cfg.score.date)
        except ValueError:
            raise ConfigError(f"score.date: {cfg.score.date!r} is not a YYYY-MM-DD date") from None
    s = cfg.serve
    if not 0 < s.port < 65536:
        raise ConfigError(f"serve.port: {s.port} is not a TCP port")
    for name in ("num_replicas", "max_batch_size", "max_history", "max_k", "max_batch_requests", "max_body_bytes",
                 "replica_num_cpus", "max_ongoing_requests", "max_queued_requests", "request_timeout_s"):
        _positive(f"serve.{name}", getattr(s, name))
    _positive("serve.replica_num_gpus", s.replica_num_gpus, allow_zero=True)
    if s.api_key_file is not None and "://" in s.api_key_file:
        raise ConfigError(f"serve.api_key_file: {s.api_key_file!r} is a URI; give a local file (a mounted secret)")
    return cfg


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{key}: {msg}" if key and not msg.startswith(key) else msg


def load_config(path: str | None = None, overrides: list[str] | None = None) -> SpeederConfig:
    """Build a validated `SpeederConfig` from an optional YAML file and dotlist overrides.

    Raises ConfigError (one line, naming the key) on an unknown key, a wrong type, a missing value
    or a value out of range.
    """
    try:
        cfg = OmegaConf.structured(SpeederConfig)
        if path is not None:
            try:
                loaded = OmegaConf.load(path)
            except FileNotFoundError:
                raise ConfigError(f"config file not found: {path}") from None
            if loaded is None:
                loaded = OmegaConf.create({})
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{path}: a config file must hold a mapping at the top level")
            cfg = OmegaConf.merge(cfg, loaded)
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"{missing[0]}: a value is required (missing: {', '.join(missing)})")
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    assert isinstance(obj, SpeederConfig)
    return validate(absolute_paths(obj))


# Fields holding a storage URI. Ray workers do not share the driver's working directory (Ray Train runs
# them elsewhere), so a relative local path is made absolute where the config is loaded, on the driver.
PATH_FIELDS = ("output_root", "data.uri", "trainer.storage_path", "evaluate.checkpoint", "evaluate.out",
               "score.input", "score.checkpoint", "score.out", "serve.checkpoint")


def absolute_paths(cfg: SpeederConfig) -> SpeederConfig:
    """`cfg` with every relative local path of PATH_FIELDS made absolute (s3://, file:// and absolute
    paths unchanged)."""
    for dotted in PATH_FIELDS:
        *parents, name = dotted.split(".")
        owner = cfg
        for part in parents:
            owner = getattr(owner, part)
        value = getattr(owner, name)
        if value and "://" not in value and not os.path.isabs(value):
            setattr(owner, name, os.path.abspath(value))
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON-serialisable dict of a config dataclass (interpolations already resolved)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> SpeederConfig:
    """Rebuild a validated config from `to_dict` output (e.g. one shipped to a Ray worker)."""
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SpeederConfig), data))
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    assert isinstance(obj, SpeederConfig)
    return validate(obj)  # paths were made absolute where the config was loaded


def to_yaml(cfg: SpeederConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

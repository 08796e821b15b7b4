"""A train worker restores only checkpoints of this run's features and backbone.

No Ray: the checks `_restore` runs (`check_restorable`) on checkpoint metadata as the worker writes it, and
the two ways `_restore` loads weights (`_load_resume`: this stage's own checkpoint after a failure;
`_load_init`: the previous stage's best), on local folders with a one-parameter model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from speeder.checkpoint import CheckpointError, save_checkpoint
from speeder_platform.config import load_config, to_dict
from speeder_platform.lineage import FeaturesError, FeaturesSet, checkpoint_record
from speeder_platform.redact import redact
from speeder_platform.train import worker

BASE = ["model.backbone=smollm2-135m", "model.num_layers=4"]
FEATURES = FeaturesSet("data/features/default", "fp-new", ["fp-old"], {"text_encoder": "hashing"})
# Each differs from BASE in one backbone setting: the checkpoint's weights would mean something else.
OTHER_BACKBONES = {
    "model.backbone": "model.backbone=tiny-llama",
    "model.num_layers": "model.num_layers=6",
    "model.lora.r": "model.lora.r=16",
    "model.lora.alpha": "model.lora.alpha=32",
    "model.lora.target_modules": "model.lora.target_modules=[q_proj,v_proj]",
}


def config(*overrides: str):
    return load_config(None, [*BASE, *overrides])


class OneWeight(nn.Module):
    """The smallest model a checkpoint loads into: one trainable tensor."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((3,), value))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {"w": self.w}


def worker_meta(cfg, features: FeaturesSet = FEATURES) -> dict:
    """The keys of a checkpoint's meta.json that restoring reads, as train_loop_per_worker writes them."""
    return {"config": redact(to_dict(cfg)), "backbone": cfg.model.backbone, "features": checkpoint_record(features),
            "train_state": {"epoch": 1, "step": 5}}


def saved(directory, cfg, features: FeaturesSet = FEATURES) -> str:
    """A checkpoint folder of OneWeight(1.0) trained with `cfg` on `features`."""
    save_checkpoint(directory, OneWeight(1.0), worker_meta(cfg, features))
    return str(directory)


def test_a_checkpoint_of_the_same_backbone_and_features_restores() -> None:
    meta = worker_meta(config())
    worker.check_restorable(meta, config(), FEATURES, "ckpt")
    # Trainer settings may change between runs (cluster shape, strategy, more stages): still this model.
    worker.check_restorable(meta, config("trainer.num_workers=4", "trainer.strategy=deepspeed",
                                         "trainer.stages=[1,3]", "model.dtype=bfloat16"), FEATURES, "ckpt")
    # Trained on a set an incremental run has since extended: still its features.
    older = worker_meta(config(), FeaturesSet("data/features/default", "fp-old"))
    worker.check_restorable(older, config(), FEATURES, "ckpt")


@pytest.mark.parametrize("key", sorted(OTHER_BACKBONES))
def test_a_checkpoint_of_another_backbone_is_refused_naming_both(key: str) -> None:
    trained, now = config(), config(OTHER_BACKBONES[key])
    with pytest.raises(CheckpointError) as err:
        worker.check_restorable(worker_meta(trained), now, FEATURES, "s3://runs/demo-stage1/checkpoint_000002")
    text = str(err.value)
    assert "\n" not in text and "s3://runs/demo-stage1/checkpoint_000002" in text
    field = key.removeprefix("model.")
    recorded, current = worker.backbone_settings(to_dict(trained)["model"]), worker.backbone_settings(
        to_dict(now)["model"])
    assert recorded[field] != current[field]
    assert f"{key}={recorded[field]!r}" in text and f"{key}={current[field]!r}" in text, text
    # The other way round too: a run never restores a checkpoint of another model.
    with pytest.raises(CheckpointError):
        worker.check_restorable(worker_meta(now), trained, FEATURES, "ckpt")


def test_a_checkpoint_of_other_features_is_refused_naming_both_fingerprints() -> None:
    other = FeaturesSet("data/features/default", "fp-other", [], {"text_encoder": "hashing"})
    with pytest.raises(FeaturesError) as err:
        worker.check_restorable(worker_meta(config(), other), config(), FEATURES, "ckpt")
    text = str(err.value)
    assert "\n" not in text and "fp-other" in text and "fp-new" in text


def test_a_checkpoint_that_records_no_model_config_is_refused() -> None:
    meta = {k: v for k, v in worker_meta(config()).items() if k != "config"}
    with pytest.raises(CheckpointError, match="records no model config"):
        worker.check_restorable(meta, config(), FEATURES, "ckpt")


@pytest.mark.parametrize("path", ["resume", "init"])
def test_restore_loads_a_matching_checkpoint(tmp_path, path: str) -> None:
    checkpoint, model = saved(tmp_path / "ckpt", config()), OneWeight(0.0)
    if path == "resume":
        meta = worker._load_resume(checkpoint, model, None, config(), FEATURES, checkpoint)
        assert meta["train_state"] == {"epoch": 1, "step": 5}
    else:
        worker._load_init(checkpoint, model, config(), FEATURES)
    assert torch.equal(model.w.detach(), torch.ones(3))


@pytest.mark.parametrize("path", ["resume", "init"])
@pytest.mark.parametrize("mismatch", ["backbone", "features"])
def test_restore_refuses_before_loading_any_weight(tmp_path, path: str, mismatch: str) -> None:
    if mismatch == "backbone":
        checkpoint, error = saved(tmp_path / "ckpt", config(OTHER_BACKBONES["model.backbone"])), CheckpointError
    else:
        checkpoint, error = saved(tmp_path / "ckpt", config(), FeaturesSet("f", "fp-other")), FeaturesError
    model = OneWeight(0.0)  # same shape as the checkpoint's: it would load
    with pytest.raises(error, match=r"fp-other|model\.backbone"):
        if path == "resume":
            worker._load_resume(checkpoint, model, None, config(), FEATURES, checkpoint)
        else:
            worker._load_init(checkpoint, model, config(), FEATURES)
    assert torch.equal(model.w.detach(), torch.zeros(3))


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-qwen2"])
def test_a_rerun_checks_the_finished_stage_before_any_worker_starts(tmp_path, monkeypatch, backbone: str) -> None:
    """`speeder train` again with more stages: stage 3 would start from stage 1's checkpoint. The driver
    refuses one of another backbone before it starts Ray Train (ensure_ray and the stage's dataset are
    stubbed: no Ray)."""
    from speeder_platform import lineage, storage
    from speeder_platform.tables import features_folder
    from speeder_platform.train import driver
    from speeder_platform.trained import STAGES_FILE, run_uri
    from testkit.datasets import prepare_synthetic, tiny_config, write_checkpoint, write_random_features

    data = prepare_synthetic(str(tmp_path / "data"))
    table = storage.read_table(write_random_features(data))
    lineage.commit(table, features_folder(data, "default"), {"settings": {}}, "fp-0")  # as featurize commits
    stage1 = write_checkpoint(tiny_config(str(tmp_path), f"data.uri={data}", f"model.backbone={backbone}"),
                              str(tmp_path / "stage1"), stage=1)
    cfg = tiny_config(str(tmp_path), f"data.uri={data}", "trainer.stages=[1,3]", "trainer.cpus_per_worker=1")
    storage.write_json(storage.join(run_uri(cfg), STAGES_FILE),
                       {"stages": [{"stage": 1, "name": "text", "checkpoint": stage1, "metrics": {}}]})

    class StageStarted(Exception):
        """Raised where the driver would start the next stage's Ray Train run."""

    def start_stage(*_args) -> None:
        raise StageStarted

    monkeypatch.setattr(driver, "ensure_ray", lambda _cfg: None)
    monkeypatch.setattr(driver, "_train_dataset", start_stage)
    if backbone == cfg.model.backbone:
        with pytest.raises(StageStarted):
            driver.run_training(cfg)
    else:
        with pytest.raises(CheckpointError, match=f"{stage1} was trained with model.backbone='{backbone}'"):
            driver.run_training(cfg)

"""Ray Train: stages, DDP and DeepSpeed on CPU, a rerun that skips finished stages. Checkpoints on S3 and
resuming after a killed worker or driver: the fault scenarios (tests/fault/test_train_faults.py)."""

from __future__ import annotations

import json
import pathlib
import tempfile
import time

import pytest

from speeder.checkpoint import read_meta
from speeder.loop import lr_factor
from speeder_platform import storage
from speeder_platform.train.driver import run_training
from speeder_platform.trained import final_checkpoint, load_trained, run_uri
from testkit.datasets import prepare_synthetic, tiny_config, write_random_features

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    data = str(tmp_path_factory.mktemp("train") / "data")
    prepare_synthetic(data)
    write_random_features(data)
    return data


def config(tmp_path: pathlib.Path, dataset: str, *overrides: str):
    return tiny_config(str(tmp_path), f"data.uri={dataset}", "trainer.stages=[1]", *overrides)


def checkpoint_meta(uri: str, tmp_path: pathlib.Path) -> dict:
    local = storage.download_dir(uri, str(tmp_path / f"ckpt-{time.monotonic_ns()}"))
    return read_meta(local)


def test_deepspeed_zero2_trains_a_stage_and_a_ddp_rerun_with_more_stages_skips_it(ray_local, dataset, tmp_path,
                                                                                 caplog) -> None:
    # Two workers with DeepSpeed ZeRO-2 (gloo): the GPU strategy's code path, on CPU. Two DDP workers
    # train in tests/platform/test_multinode.py (on one node and across two).
    # A cosine lr schedule: DeepSpeed's optimizer must take the lr set on its groups at every step.
    cfg = config(tmp_path, dataset, "trainer.num_workers=2", "trainer.strategy=deepspeed", "trainer.zero_stage=2",
                 "trainer.lr_schedule=cosine", "trainer.lr_warmup=0.2")
    local_checkpoints = set(pathlib.Path(tempfile.gettempdir()).glob("speeder-ckpt-*"))
    summary = run_training(cfg)
    # Each epoch's checkpoint is written to a local folder, copied to storage, and the local folder removed.
    assert set(pathlib.Path(tempfile.gettempdir()).glob("speeder-ckpt-*")) <= local_checkpoints
    assert [s["stage"] for s in summary.stages] == [1]
    assert 0.0 <= summary.stages[0]["metrics"]["valid_hr1"] <= 1.0
    assert final_checkpoint(cfg) == summary.checkpoint
    meta = checkpoint_meta(summary.checkpoint, tmp_path)
    assert meta["strategy"] == "deepspeed" and meta["stage"] == 1 and meta["modalities"] == ["text"]
    assert meta["train_state"]["step"] > 0
    total = meta["train_state"]["step"]  # one epoch, no early stop: the stage's planned steps
    curve = meta["train_state"]["loss_curve"]
    assert [p["lr_factor"] for p in curve] == [lr_factor("cosine", p["step"] - 1, total, 0.2) for p in curve]
    assert curve[-1]["lr_factor"] < 0.5
    trained = load_trained(summary.checkpoint)
    assert trained.model.settings.max_history == 8
    # One recipe: the quality bench, given the same config, builds exactly the trainer's optimizer groups.
    from speeder_platform.bench.quality.models import train_speeder
    from speeder_platform.tables import features_folder, load_item_features, load_samples

    features = load_item_features(dataset, cfg.featurize.name)
    bench = train_speeder(cfg, load_samples(dataset, "train", 8), None, features, {1: 1, 2: 1, 3: 1},
                          features_dir=features_folder(dataset, cfg.featurize.name))
    assert bench.stages[0]["optimizer_groups"] == meta["optimizer_groups"]
    gate = next(g for g in bench.stages[1]["optimizer_groups"] if g["name"] == "vision_gate")
    assert gate["lr"] == cfg.trainer.lr * cfg.trainer.gate_lr_scale  # the trainer's gate lr, 30x by default

    # The same spec run again with more stages skips the finished one and starts stage 3 from its weights
    # (on one DDP worker: a rerun may change the cluster shape and the strategy). A driver killed mid-stage
    # and started again resumes from the stage's checkpoint: the fault scenario train-driver-restarted kills
    # a real `speeder train`.
    caplog.set_level("INFO", logger="speeder.train")
    more = config(tmp_path, dataset, "trainer.num_workers=1", "trainer.strategy=ddp", "trainer.stages=[1,3]")
    again = run_training(more)
    assert "stage 1 (text) already finished" in caplog.text
    assert again.stages[0] == summary.stages[0] and [s["stage"] for s in again.stages] == [1, 3]
    stages = json.loads(pathlib.Path(run_uri(more), "stages.json").read_text())["stages"]
    assert stages == again.stages and final_checkpoint(more) == again.checkpoint
    assert checkpoint_meta(again.checkpoint, tmp_path)["stage"] == 3


"""Ray Train: stages, DDP and DeepSpeed on CPU, checkpoints on local disk and S3, resuming after failures."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import threading
import time

import pytest

from speeder.checkpoint import read_meta
from speeder_platform import storage
from speeder_platform.bench.faults.train import registered_checkpoints
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


def stage_dir_of(cfg, stage: int = 1) -> str:
    return storage.join(cfg.trainer.storage_path, f"{cfg.trainer.run_name}-stage{stage}")


def complete_checkpoints(stage_dir: str) -> list[str]:
    """Checkpoint folders holding a meta.json (written last). On S3, checkpoints Ray deleted
    (num_to_keep) can leave an empty folder marker behind."""
    return [storage.join(stage_dir, n) for n in storage.listdir(stage_dir)
            if n.startswith("checkpoint_") and storage.exists(storage.join(stage_dir, n, "meta.json"))]


def latest_checkpoint_meta(stage_dir: str, tmp_path: pathlib.Path) -> dict:
    """meta.json of the checkpoint with the most steps (the best one may predate a failure)."""
    return max((checkpoint_meta(c, tmp_path) for c in complete_checkpoints(stage_dir)), key=lambda m: m["step"])


def test_ddp_two_workers_trains_a_stage(ray_local, dataset, tmp_path) -> None:
    cfg = config(tmp_path, dataset, "trainer.num_workers=2", "trainer.strategy=ddp")
    summary = run_training(cfg)
    assert [s["stage"] for s in summary.stages] == [1]
    assert 0.0 <= summary.stages[0]["metrics"]["valid_hr1"] <= 1.0
    assert final_checkpoint(cfg) == summary.checkpoint
    meta = checkpoint_meta(summary.checkpoint, tmp_path)
    assert meta["strategy"] == "ddp" and meta["stage"] == 1 and meta["modalities"] == ["text"]
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


def test_deepspeed_zero2_runs_on_cpu(ray_local, dataset, tmp_path) -> None:
    cfg = config(tmp_path, dataset, "trainer.num_workers=2", "trainer.strategy=deepspeed", "trainer.zero_stage=2")
    summary = run_training(cfg)
    meta = checkpoint_meta(summary.checkpoint, tmp_path)
    assert meta["strategy"] == "deepspeed"
    assert meta["train_state"]["step"] > 0


def test_checkpoints_on_s3_and_a_killed_worker_resumes(ray_local, dataset, tmp_path, s3_bucket) -> None:
    import ray
    from ray.util.state import list_actors

    cfg = config(tmp_path, dataset, f"trainer.storage_path={s3_bucket}/train", "trainer.epochs=3",
                 "trainer.max_steps_per_epoch=12", "trainer.patience=10", "trainer.checkpoint_every=3",
                 "trainer.max_failures=2")
    killed: list[int] = []
    errors: list[str] = []
    gcs = ray.get_runtime_context().gcs_address  # this test's Ray, whatever else runs on the machine

    def kill_a_worker_after_a_registered_checkpoint() -> None:
        # Only a checkpoint Ray Train's controller has registered (it is in its snapshot file) is one to
        # resume from: a folder uploaded by a worker killed before the controller polled its report is,
        # rightly, not. Waiting for complete folders alone raced with that poll on a fast machine.
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            try:
                latest, _ = registered_checkpoints(stage_dir_of(cfg))
                if latest is not None:
                    workers = list_actors(address=gcs, filters=[("class_name", "=", "RayTrainWorker"),
                                                                ("state", "=", "ALIVE")])
                    if workers:
                        os.kill(workers[0]["pid"], signal.SIGKILL)
                        killed.append(workers[0]["pid"])
                        return
            except Exception as err:  # a folder deleted while listed, the state API busy: look again
                errors.append(repr(err))
            time.sleep(0.3)

    killer = threading.Thread(target=kill_a_worker_after_a_registered_checkpoint, daemon=True)
    killer.start()
    summary = run_training(cfg)
    killer.join(timeout=5)
    assert killed, f"no worker was killed before the stage ended (errors: {errors[-3:]})"
    assert summary.checkpoint.startswith(s3_bucket)
    latest = latest_checkpoint_meta(stage_dir_of(cfg), tmp_path)
    assert latest["train_state"]["resumes"] >= 1  # restored from its own checkpoint, not restarted from scratch
    assert latest["epoch"] == cfg.trainer.epochs


def test_a_rerun_with_more_stages_skips_the_finished_ones(ray_local, dataset, tmp_path, caplog) -> None:
    # A driver killed mid-stage and started again resumes from the stage's checkpoint: the fault scenario
    # train-driver-restarted (tests/fault/test_train_faults.py) kills a real `speeder train` process.
    first = run_training(config(tmp_path, dataset))
    caplog.set_level("INFO", logger="speeder.train")
    again = run_training(config(tmp_path, dataset, "trainer.stages=[1,3]"))
    assert "stage 1 (text) already finished" in caplog.text
    assert again.stages[0] == first.stages[0] and [s["stage"] for s in again.stages] == [1, 3]
    stages = json.loads(pathlib.Path(run_uri(config(tmp_path, dataset)), "stages.json").read_text())["stages"]
    assert stages == again.stages and final_checkpoint(config(tmp_path, dataset)) == again.checkpoint
    assert checkpoint_meta(again.checkpoint, tmp_path)["stage"] == 3

"""`speeder report`: the report of a finished job (time breakdown, curves, accuracy vs baselines, UI command)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pyarrow as pa
import pytest

from speeder import schema
from speeder_platform import cli, storage
from speeder_platform.baselines_eval import read_ranks, write_ranks
from speeder_platform.config import to_dict, to_yaml
from speeder_platform.featurize.pipeline import features_dir
from speeder_platform.featurize.sequence import sequence_features
from speeder_platform.report import stage_curves
from speeder_platform.score import SCORES_SCHEMA, partition_uri
from speeder_platform.tables import split_uri
from speeder_platform.trained import STAGES_FILE, run_uri
from testkit.datasets import prepare_synthetic, tiny_config, write_random_features

PNG = b"\x89PNG\r\n\x1a\n"
METRICS = {"cand_hr@1": 0.25, "cand_valid_ratio": 1.0, "cand_vhr@1": 0.25, "full_hr@10": 0.4, "full_ndcg@10": 0.2,
           "cand_samples": 60}



def main(argv: list[str]) -> int:
    """`speeder report ARGV` through the one command line."""
    return cli.main(["report", *argv])

def write_fake_job(root: pathlib.Path) -> tuple[str, object]:
    """A prepared dataset with features and SASRec, and the outputs a finished job leaves (no Ray)."""
    cfg = tiny_config(str(root), "trainer.run_name=fake")
    prepare_synthetic(cfg.data.uri)
    write_random_features(cfg.data.uri)
    n = storage.read_table(storage.join(cfg.data.uri, schema.ITEMS_FILE)).num_rows
    sequence_features(cfg.data.uri, features_dir(cfg), {**to_dict(cfg.featurize.sasrec), "hidden_size": 16}, n)
    stages = []
    for index, name, loss in ((1, "text", 4.0), (3, "joint", 3.5)):
        ckpt = storage.join(cfg.trainer.storage_path, f"fake-stage{index}", "checkpoint_0")
        storage.write_json(storage.join(ckpt, "meta.json"), {
            "stage": index, "step": 20, "metrics": {"train_loss": loss, "valid_hr1": 0.2},
            "train_state": {"loss_curve": [{"step": s, "loss": loss + 1 - s / 20} for s in (5, 10, 15, 20)]}})
        stages.append({"stage": index, "name": name, "checkpoint": ckpt, "modalities": ["text"], "seconds": 40.0,
                       "metrics": {"valid_hr1": 0.2, "valid_hr10": 0.4, "samples_per_s": 55.0, "epoch": 1}})
    storage.write_json(storage.join(run_uri(cfg), STAGES_FILE), {"stages": stages})
    storage.write_json(storage.join(cfg.evaluate.out, "metrics.json"),
                       {"model_version": "fake/stage3/step20", "metrics": METRICS, "split": "test"})
    test_users = storage.read_table(split_uri(cfg.data.uri, "test")).column(schema.USER_ID).to_numpy()
    ranks = np.zeros(len(test_users), np.int64)  # every target first: HR@1 = 1 for the paired figure
    write_ranks(cfg.evaluate.out, "speeder", test_users, {"candidates": ranks, "full": ranks})
    partition = partition_uri(cfg.score.out, "2026-01-02")
    users = [0, 1, 2, 3]
    storage.write_table(pa.table({schema.USER_ID: pa.array(users, pa.int64()),
                                  "item_ids": [[1, 2, 3]] * 4, "scores": [[3.0, 2.0, 1.0]] * 4,
                                  "model_version": ["fake/stage3/step20"] * 4,
                                  "scored_at": pa.array([0] * 4, pa.timestamp("us", tz="UTC"))},
                                 schema=SCORES_SCHEMA), storage.join(partition, "part-0.parquet"))
    storage.write_json(storage.join(cfg.output_root, "job_summary.json"), {
        "output_root": cfg.output_root, "ray": "local", "seconds": 150.0, "steps": {
            "prepare": {"seconds": 2.0, "result": {"users": 60, "items": 80}},
            "featurize": {"seconds": 30.0, "result": {"mode": "full", "encode_seconds": 10.0,
                                                      "sequence_seconds": 15.0, "sasrec": "trained"}},
            "train": {"seconds": 90.0, "result": {"stages": stages}},
            "evaluate": {"seconds": 8.0, "result": {"metrics": METRICS}},
            "score": {"seconds": 20.0, "result": {"partition": partition, "users_scored": 4, "users_per_s": 0.2,
                                                  "model_version": "fake/stage3/step20", "k": 3, "seconds": 20.0}}}})
    spec = root / "spec.yaml"
    cfg.steps = ["prepare", "featurize", "train", "evaluate", "score"]
    spec.write_text(to_yaml(cfg))
    return str(spec), cfg


def test_report_shows_time_curves_accuracy_and_the_ui_command(tmp_path) -> None:
    spec, cfg = write_fake_job(tmp_path)
    assert main([spec, "--no-diagnose"]) == 0  # the fake job has no loadable checkpoint to diagnose
    report = (tmp_path / "report" / "report.md").read_text()
    assert report.rstrip().endswith(f"speeder ui {spec}\n```")
    at = [report.index(f"| {step} | ") for step in ("prepare", "featurize", "train", "evaluate", "score")]
    assert at == sorted(at)  # the spec's order, not job_summary.json's sorted keys
    for line in ("| prepare | 2.0 | 1% |", "| featurize | 30.0 | 20% | full: encoders 10s, SASRec 15s (trained) |",
                 "| train | 90.0 | 60% | stage 1 (text) 40s, stage 3 (joint) 40s |", "| **total** | **150.0** |"):
        assert line in report
    assert "| Speeder (fake/stage3/step20) | 0.2500 |" in report
    assert "| Popularity |" in report and "| SASRec |" in report  # computed: the job had no baselines step
    baselines = json.loads((tmp_path / "eval" / "baselines.json").read_text())
    assert set(baselines["models"]) == {"Popularity", "SASRec"} and baselines["sasrec"]["status"] == "loaded"
    assert baselines["models"]["Popularity"]["cand_samples"] == baselines["samples"] == 60
    assert "4 users scored (top-3)" in report and "| 0 |" in report
    for png in ("time.png", "accuracy.png", "training_curves.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == PNG
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert set(results["models"]) == {"speeder", "sasrec", "popularity"}
    for row in results["models"].values():
        assert set(row) == {"hr@1", "hr@10_full", "ndcg@10_full", "valid_ratio", "test_users"}
        assert row["test_users"] == 60
    sasrec = read_ranks(cfg.evaluate.out, "sasrec")  # written by the baselines, one rank per test user
    pair = results["speeder_minus_sasrec"]
    expected = 1.0 - float((sasrec["candidates"] == 0).mean())
    assert pair["users"] == 60 and pair["hr@1"] == pytest.approx(expected)
    assert pair["ci95"][0] <= pair["hr@1"] <= pair["ci95"][1]
    assert "Paired over the same 60 users" in report


def test_stage_curves_read_checkpoint_meta(tmp_path) -> None:
    stage = tmp_path / "run-stage1"
    for step, loss, valid, curve in ((10, 4.0, -1.0, None),
                                     (20, 3.0, 0.3, [{"step": 15, "loss": 3.5}, {"step": 20, "loss": 2.9}])):
        meta = {"step": step, "metrics": {"train_loss": loss, "valid_hr1": valid},
                **({"train_state": {"loss_curve": curve}} if curve else {})}
        storage.write_json(str(stage / f"checkpoint_{step}" / "meta.json"), meta)
    (stage / "checkpoint_30").mkdir()  # incomplete: no meta.json
    curve, valid = stage_curves(str(stage))
    assert curve == [{"step": 10, "loss": 4.0}, {"step": 15, "loss": 3.5}, {"step": 20, "loss": 2.9}]
    assert valid == [{"step": 20, "hr@1": 0.3}]  # the mid-epoch checkpoint (-1) has no validation
    assert stage_curves(str(tmp_path / "missing")) == ([], [])


def test_report_without_a_job_fails_clearly(tmp_path, caplog) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(to_yaml(tiny_config(str(tmp_path))))
    assert main([str(spec)]) == 2
    assert "no finished job" in caplog.text


def test_report_redacts_a_secret_given_as_an_override(tmp_path) -> None:
    spec, _ = write_fake_job(tmp_path)
    assert main([spec, "runtime_env.env_vars.MY_TOKEN=s3cr3t-marker", "--no-diagnose", "--no-baselines"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "MY_TOKEN" in report and "s3cr3t-marker" not in report

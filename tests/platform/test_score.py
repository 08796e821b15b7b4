"""`speeder score`: top-K for every user, one atomic date partition, bad input rows counted and skipped."""

from __future__ import annotations

import datetime
import os

import numpy as np
import pyarrow as pa
import pytest

from speeder import schema
from speeder_platform import storage
from speeder_platform.score import SCORES_SCHEMA, Scorer, latest_histories, read_scores, run_score
from testkit.datasets import prepare_synthetic, tiny_config, write_checkpoint, write_random_features

K = 5
_TRAINED: dict[str, tuple] = {}


@pytest.fixture
def trained(tmp_path_factory):
    """A synthetic dataset with random features and an untrained checkpoint: (root, num_items)."""
    if "run" not in _TRAINED:
        root = str(tmp_path_factory.mktemp("score"))
        cfg = tiny_config(root)
        prepare_synthetic(cfg.data.uri, num_users=40, num_items=60)
        write_random_features(cfg.data.uri)
        write_checkpoint(cfg, os.path.join(root, "ckpt"))
        _TRAINED["run"] = root, storage.read_table(storage.join(cfg.data.uri, schema.ITEMS_FILE)).num_rows
    return _TRAINED["run"]


def score_config(root: str, *overrides: str):
    return tiny_config(root, f"score.checkpoint={root}/ckpt", f"score.k={K}", "score.batch_size=16",
                       "score.actor_num_cpus=0.5", *overrides)


def check_top_k(table: pa.Table, histories: dict[int, list[int]], num_items: int) -> None:
    for row in table.to_pylist():
        items, scores = row["item_ids"], row["scores"]
        assert len(items) == K == len(set(items)) and all(0 <= i < num_items for i in items)
        assert not set(items) & set(histories[row[schema.USER_ID]])  # history items excluded
        assert scores == sorted(scores, reverse=True) and np.isfinite(scores).all()


def test_latest_histories_are_chronological(tmp_path) -> None:
    inter = pa.table({schema.USER_ID: pa.array([1, 0, 1, 0, 1], pa.int64()),
                      schema.ITEM_ID: pa.array([10, 20, 11, 21, 12], pa.int64()),
                      schema.TIMESTAMP: pa.array([5, 9, 5, 1, 2], pa.int64())})
    storage.write_table(inter, storage.join(str(tmp_path), schema.INTERACTIONS_FILE))
    assert latest_histories(str(tmp_path)).to_pylist() == [
        {schema.USER_ID: 0, schema.HISTORY: [21, 20]},
        {schema.USER_ID: 1, schema.HISTORY: [12, 10, 11]},  # tie at t=5 kept in file order
    ]


def test_scorer_excludes_history_and_skips_bad_rows(trained) -> None:
    root, n = trained
    scorer = Scorer(f"{root}/ckpt", f"{root}/data", "default", k=K,
                    scored_at=datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC))
    batch = pa.table({schema.USER_ID: pa.array([1, 2, 3, None, 5, 6], pa.int64()),
                      schema.HISTORY: pa.array([list(range(n - 3)), [4], [], [1], [n], None], pa.list_(pa.int64()))})
    out = scorer(batch).to_pylist()
    assert [r["skip_reason"] for r in out] == [None, None, "empty_history", "missing_user_id", "unknown_item",
                                               "empty_history"]
    assert sorted(out[0]["item_ids"]) == [n - 3, n - 2, n - 1]  # fewer than K items left to recommend
    assert len(out[1]["item_ids"]) == K and 4 not in out[1]["item_ids"]
    assert out[2]["item_ids"] is None and out[0]["model_version"] == scorer.version


@pytest.mark.integration
def test_score_partitions_are_replaced_atomically(trained, ray_local) -> None:
    root, n = trained
    out = f"{root}/scores"
    cfg = score_config(root, "score.date=2026-01-01", f"score.out={out}", "score.num_actors=2")
    report = run_score(cfg)
    table = read_scores(out, "2026-01-01")
    histories = {r[schema.USER_ID]: r[schema.HISTORY] for r in latest_histories(cfg.data.uri).to_pylist()}
    assert report.users_scored == table.num_rows == len(histories) == 40
    assert table.column(schema.USER_ID).to_pylist() == sorted(histories)  # every user exactly once
    check_top_k(table, histories, n)
    types = {f.name: f.type for f in table.schema}
    assert set(types) == set(SCORES_SCHEMA.names) and types["scored_at"] == pa.timestamp("us", tz="UTC")
    assert types["user_id"] == pa.int64() and types["model_version"] == pa.string()
    assert types["item_ids"].value_type == pa.int64() and types["scores"].value_type == pa.float32()
    assert set(table.column("model_version").to_pylist()) == {report.model_version}
    assert sum(report.skipped.values()) == 0 and report.users_per_s > 0 and "scored 40 users" in report.summary()
    files = sorted(os.listdir(f"{out}/dt=2026-01-01"))

    again = run_score(cfg)  # the same date again: the partition is replaced, not appended to
    assert again.users_scored == 40 and read_scores(out, "2026-01-01").num_rows == 40
    assert len(os.listdir(f"{out}/dt=2026-01-01")) == len(files)
    assert sorted(os.listdir(out)) == ["dt=2026-01-01"]  # no staging folders left behind

    run_score(score_config(root, "score.date=2026-01-02", f"score.out={out}"))
    assert sorted(os.listdir(out)) == ["dt=2026-01-01", "dt=2026-01-02"]
    assert read_scores(out, "2026-01-02").num_rows == 40


@pytest.mark.integration
def test_bad_input_rows_are_counted_and_skipped(trained, ray_local) -> None:
    root, n = trained
    rows = [(0, [1, 2, 3]), (1, []), (2, [1, n + 5]), (3, [-1, 2]), (4, [5, 6]), (4, [7]), (5, None),
            (None, [1]), (6, [n - 1])]
    histories = pa.table({schema.USER_ID: pa.array([u for u, _ in rows], pa.int64()),
                          schema.HISTORY: pa.array([h for _, h in rows], pa.list_(pa.int64()))})
    storage.write_table(histories, f"{root}/input.parquet")
    out = f"{root}/scores-input"
    report = run_score(score_config(root, f"score.input={root}/input.parquet", f"score.out={out}",
                                    "score.date=2026-02-01"))
    assert report.skipped == {"missing_user_id": 1, "empty_history": 2, "unknown_item": 2, "duplicate_user_id": 2}
    table = read_scores(out, "2026-02-01")
    assert table.column(schema.USER_ID).to_pylist() == [0, 6] and report.users_scored == 2
    check_top_k(table, {0: [1, 2, 3], 6: [n - 1]}, n)
    # An input without a history column is refused before any scorer starts, naming what it has.
    storage.write_table(pa.table({schema.USER_ID: pa.array([1, 2], pa.int64())}), f"{root}/no-history.parquet")
    with pytest.raises(ValueError, match=f"no-history.parquet: missing column\\(s\\) {schema.HISTORY} "
                                         f"\\(has {schema.USER_ID}\\)"):
        run_score(score_config(root, f"score.input={root}/no-history.parquet", f"score.out={out}",
                               "score.date=2026-02-02"))


@pytest.mark.integration
def test_score_output_on_s3(trained, s3_bucket, ray_local) -> None:
    root, n = trained
    out = f"{s3_bucket}/scores"
    cfg = score_config(root, f"score.out={out}", "score.date=2026-03-01")
    report = run_score(cfg)
    table = read_scores(out, "2026-03-01")
    assert report.users_scored == table.num_rows == 40 and report.partition == f"{out}/dt=2026-03-01"
    assert len(set(table.column(schema.USER_ID).to_pylist())) == 40
    assert storage.listdir(out) == ["dt=2026-03-01"]  # the staging prefix is gone
    manifest = storage.read_json(f"{out}/dt=2026-03-01/_manifest.json")  # the commit point on S3
    assert manifest["files"] and all(name.startswith("run-") for name in manifest["files"])
    histories = {r[schema.USER_ID]: r[schema.HISTORY] for r in latest_histories(cfg.data.uri).to_pylist()}
    check_top_k(table, histories, n)

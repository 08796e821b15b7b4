"""`speeder bench quality`: the cold-start split, masked modalities, baseline ranking, and a whole tiny run."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from speeder import schema
from speeder.baselines.popularity import Popularity
from speeder.loop import Samples, lr_factor
from speeder_platform import cli, storage
from speeder_platform.baselines_eval import metrics_from_ranks, popularity_scorer, rank_with
from speeder_platform.bench.quality import data as quality_data
from speeder_platform.bench.quality.data import hold_out_items, mask_modality, warm_train_samples
from speeder_platform.bench.quality.truth import CONTENT_RULE, synthetic_truth
from speeder_platform.bench.quality.variants import VARIANTS
from speeder_platform.config import to_dict
from speeder_platform.featurize.pipeline import features_dir
from speeder_platform.featurize.sequence import sequence_features
from speeder_platform.tables import features_uri
from testkit.datasets import prepare_synthetic
from testkit.model import make_features

PNG = b"\x89PNG\r\n\x1a\n"



def main(argv: list[str]) -> int:
    """`speeder bench quality ARGV` through the one command line."""
    return cli.main(["bench", "quality", *argv])

def test_cold_start_split_keeps_held_out_items_out_of_every_training_sample() -> None:
    rng = np.random.default_rng(0)
    n, h = 50, 6
    histories = [rng.choice(n, rng.integers(1, h + 1), replace=False).tolist() for _ in range(400)]
    train = Samples.from_rows(histories, rng.integers(0, n, 400), [[0]] * 400, max_history=h)
    held = hold_out_items(n, 0.1, seed=3)
    assert len(held) == 5 and np.array_equal(held, hold_out_items(n, 0.1, seed=3))  # seeded
    warm_samples, warm = warm_train_samples(train, held, n, h)
    assert np.array_equal(np.sort(np.concatenate([warm, held])), np.arange(n))
    items = [warm[row[row >= 0]] for row in warm_samples.history] + [warm[warm_samples.target]]
    assert not np.isin(np.concatenate(items), held).any()
    assert (warm_samples.target < len(warm)).all() and (warm_samples.history < len(warm)).all()
    kept = ~np.isin(train.target, held)
    assert len(warm_samples) <= kept.sum() and len(warm_samples) > 0.8 * kept.sum()
    # The warm histories are the original ones with the held-out items cut out, order kept.
    first = np.flatnonzero(kept)[0]
    original = train.history[first][train.history[first] >= 0]
    assert warm[warm_samples.history[0][warm_samples.history[0] >= 0]].tolist() == \
        [i for i in original.tolist() if i not in set(held.tolist())]


@pytest.mark.parametrize("modality", ["vision", "text"])
def test_missing_modality_masks_exactly_the_requested_share(modality: str) -> None:
    features = make_features(n=40, image_rate=0.7, seed=1)
    active = ["text", "vision", "sequence"]
    had = int(features.masks()[modality].sum())
    masked, counts = mask_modality(features, modality, 0.3, seed=0, active=active)
    after = masked.masks()[modality]
    assert counts == {"had": had, "requested": round(0.3 * had), "masked": round(0.3 * had)}
    assert int(features.masks()[modality].sum()) - int(after.sum()) == round(0.3 * had)
    assert int(features.masks()[modality].sum()) == had  # the input is not changed
    for other in (m for m in active if m != modality):
        assert torch.equal(masked.masks()[other], features.masks()[other])
    lost = features.masks()[modality] & ~after
    assert bool((masked.text_mask | masked.image_mask | masked.sequence_mask)[lost].all())
    again, _ = mask_modality(features, modality, 0.3, seed=0, active=active)
    assert torch.equal(again.masks()[modality], after)  # seeded


def test_text_can_only_be_dropped_where_another_modality_remains() -> None:
    features = make_features(n=20, image_rate=0.0)
    _, counts = mask_modality(features, "text", 0.5, seed=0, active=["text", "vision"])
    assert counts["requested"] == 10 and counts["masked"] == 0  # no image to fall back on


def test_baseline_ranks_mask_history_but_never_the_target() -> None:
    pop = Popularity(6, np.array([5, 5, 5, 4, 4, 3]))  # counts: 5 -> 3, 4 -> 2, 3 -> 1, others 0
    samples = Samples.from_rows([[5], [5, 4, 3]], [4, 3], [[4, 0, 1], [3, 0, 1]], max_history=3)
    ranks = rank_with(popularity_scorer(pop), samples)
    assert ranks["candidates"].tolist() == [0, 0] and ranks["first"].tolist() == [0, 0]
    # User 0: item 5 (history) is masked, so 4 is first. User 1: 5 and 4 are masked, 3 is in the
    # history too but is the target (a re-consumed item), so it stays and comes first.
    assert ranks["full"].tolist() == [0, 0]
    assert rank_with(popularity_scorer(pop), samples.subset(np.array([1])))["full"].tolist() == [0]
    metrics = metrics_from_ranks(ranks)
    assert metrics["cand_hr@1"] == 1.0 and metrics["full_hr@10"] == 1.0 and metrics["cand_valid_ratio"] == 1.0


def write_features(cfg) -> dict:
    """Random text/image vectors plus a real (tiny) SASRec's seq_emb, as featurize would lay them out."""
    uri = cfg.data.uri
    n = storage.read_table(storage.join(uri, schema.ITEMS_FILE)).num_rows
    settings = {**to_dict(cfg.featurize.sasrec), "epochs": 2, "hidden_size": 16, "num_heads": 2}
    cfg.featurize.sasrec.epochs, cfg.featurize.sasrec.hidden_size = 2, 16
    seq = sequence_features(uri, features_dir(cfg), settings, n)
    rng = np.random.default_rng(0)

    def column(values: np.ndarray, present: np.ndarray) -> pa.Array:
        return pa.array([v.tolist() if p else None for v, p in zip(values, present, strict=True)],
                        type=pa.list_(pa.float32()))

    table = pa.table({schema.ITEM_ID: pa.array(np.arange(n), pa.int64()),
                      schema.TEXT_EMB: column(rng.standard_normal((n, 16)), np.ones(n, bool)),
                      schema.IMAGE_EMB: column(rng.standard_normal((n, 8)), rng.random(n) < 0.8),
                      schema.SEQ_EMB: column(seq.values, seq.present)})
    storage.write_table(table, features_uri(uri, cfg.featurize.name))
    return {"mode": "test", "seconds": 0.0, "dims": {}}


def test_bench_quality_writes_every_row_and_valid_outputs(tmp_path, monkeypatch) -> None:
    data = prepare_synthetic(str(tmp_path / "syn"), num_users=40, num_items=50)
    monkeypatch.setattr(quality_data, "ensure_features", write_features)  # no Ray, no encoders
    out = tmp_path / "out"
    assert main(["--dataset", "synthetic", "--synthetic-data", data, "--out", str(out),
                 "--set", "trainer.stage_samples=[24,24,24]", "--set", "trainer.batch_size=8",  # 3 steps per stage
                 "--set", "trainer.loss_pool=sampled",  # so the "catalog softmax" row is another model
                 "--llara-steps", "1", "--llara-eval-users", "4", "--valid-users", "8"]) == 0
    results = json.loads((out / "results.json").read_text())
    ds = results["datasets"]["synthetic"]
    expected = {"Popularity", "SASRec", "LLaRA-style", *VARIANTS}
    assert set(ds["models"]) == expected
    assert ds["spec"] == "jobs/synthetic.yaml" and ds["recipe"]["trainer"]["batch_size"] == 8
    trained = {name for name, row in ds["models"].items() if "same_as" not in row}
    assert {"Speeder", "paper's model (no levers)", "no dense loss", "no PPT", "text only"} <= trained
    assert "catalog softmax" in trained  # a trainer setting makes another model too
    speeder_hr1 = ds["models"]["Speeder"]["metrics"]["cand_hr@1"]
    for name in trained - {"Speeder", "LLaRA-style"}:  # every row paired with the full model, user by user
        row = ds["models"][name]
        assert row["vs_speeder"]["users"] == row["test_users"], name
        assert row["vs_speeder"]["hr@1"] == pytest.approx(row["metrics"]["cand_hr@1"] - speeder_hr1), name
    assert ds["models"]["LLaRA-style"]["vs_speeder"]["users"] == 4  # paired on the users it answered
    for name, row in ds["models"].items():
        if name not in trained:
            assert row["same_as"] in trained, name
            continue
        m = row["metrics"]
        assert 0.0 <= m["cand_hr@1"] <= 1.0 and 0.0 <= m["cand_valid_ratio"] <= 1.0, name
        if name != "LLaRA-style":
            assert m["cand_valid_ratio"] == 1.0 and 0.0 <= m["full_hr@10"] <= 1.0, name
            assert row["test_users"] == ds["data"]["test"]
    assert ds["models"]["LLaRA-style"]["test_users"] == 4
    assert [s["stage"] for s in ds["curves"]["Speeder"]] == [1, 2, 3]
    assert [s["stage"] for s in ds["curves"]["text only"]] == [1]
    assert [s["steps"] for s in ds["curves"]["Speeder"]] == [3, 3, 3] and ds["curves"]["no MPO"][0]["steps"] == 9
    # The same compute for every variant: text only spends all 9 steps in stage 1, no vision 9 in 2 stages.
    assert [s["steps"] for s in ds["curves"]["text only"]] == [9]
    assert [s["steps"] for s in ds["curves"]["no vision"]] == [4, 5]
    assert [s["steps"] for s in ds["curves"]["no sequence"]] == [4, 5]  # text + vision: stages 1 and 2
    # The trainer's lr schedule, read back from the optimizer after each step: per stage, cosine by default.
    for stage in ds["curves"]["Speeder"] + ds["curves"]["no vision"]:
        assert [p["lr_factor"] for p in stage["curve"]] == pytest.approx(
            [lr_factor("cosine", p["step"] - 1, stage["steps"], 0.05) for p in stage["curve"]])
    assert ds["curves"]["Speeder"][0]["curve"][-1]["lr_factor"] < 0.5
    assert {p["lr_factor"] for s in ds["curves"]["constant lr"] for p in s["curve"]} == {1.0}
    cold = ds["cold_start"]
    assert cold["held_out_items"] == 5 and cold["test_cold"] + cold["test_warm"] == ds["data"]["test"]
    assert set(cold["models"]) == {"Speeder", "Speeder, content tokens only (text + vision)", "SASRec", "Popularity"}
    assert set(ds["missing"]) == {"vision", "text"}
    for r in ds["missing"].values():
        assert r["masked"] == round(0.3 * r["had"])
    assert set(ds["checks"]) == {"vision_adds", "vision_adds_to_text", "sequence_adds"}
    assert ds["checks"]["vision_adds_to_text"]["with"] == "no sequence"
    md = (out / "results.md").read_text()
    for name in expected:
        assert f"| {name} |" in md
    assert "Recipe: `jobs/synthetic.yaml` with trainer.stage_samples=[24,24,24] trainer.batch_size=8" in md
    assert "Cold-start items" in md and "Missing modalities" in md
    by = ds["by_target"]  # synthetic: the ceiling, each model's HR@1 on successor targets and on the others
    assert 0.0 < by["successor_share"] < 1.0 and by["test_users"] == ds["data"]["test"]
    assert {"Popularity", "SASRec", "Speeder", "no PPT", CONTENT_RULE} <= set(by["models"])
    assert "LLaRA-style" not in by["models"]
    assert 0.0 < by["ceiling"]["all"] <= 1.0 and by["ceiling"]["lottery_sd"] > 0.0
    for name, split in by["models"].items():  # the two parts add up to the row's HR@1
        whole = by["successor_share"] * split["successor"] + (1 - by["successor_share"]) * split["other"]
        if name != CONTENT_RULE:
            assert whole == pytest.approx(ds["models"][name]["metrics"]["cand_hr@1"]), name
        assert 0.0 <= split["in_top_other"] <= 1.0 and 0.0 <= split["in_top"] <= 1.0, name
        assert 0.0 <= split["expected"] <= 1.0 and 0.0 <= split["expected_other"] <= 1.0, name
        assert ("expected_vs_speeder" in split) == (name != "Speeder"), name
        shares = [split["first_in_pool"], split["first_near_last"], split["first_elsewhere"]]
        assert sum(shares) == pytest.approx(1.0) and min(shares) >= 0.0, name
    sasrec_vs = by["models"]["SASRec"]["expected_vs_speeder"]
    assert sasrec_vs["mean"] == pytest.approx(by["models"]["SASRec"]["expected"] - by["models"]["Speeder"]["expected"])
    assert "| expected HR@1 |" in md and f"{sasrec_vs['mean']:+.4f} +- {sasrec_vs['ci95']:.4f}" in md
    assert "| first choice in the pool |" in md and f"| {CONTENT_RULE} |" in md
    assert "HR@1 by kind of target" in md and "| the generator's odds (expected) |" in md
    for png in ("accuracy_synthetic.png", "curves_synthetic.png", "cold_start_synthetic.png"):
        assert (out / png).read_bytes()[:8] == PNG


def test_bench_quality_synthetic_users_makes_or_refuses_the_set(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(quality_data, "ensure_features", write_features)  # no Ray, no encoders
    data = str(tmp_path / "syn")
    cheap = ["--set", "prepare.synthetic.num_items=80", "--set", "prepare.synthetic.image_size=8",
             "--set", "trainer.stage_samples=[8,8,8]", "--set", "trainer.batch_size=8", "--variants", "",
             "--skip", "llara,cold-start,missing"]
    assert main(["--dataset", "synthetic", "--synthetic-data", data, "--synthetic-users", "30",
                 "--out", str(tmp_path / "a"), *cheap]) == 0
    meta = storage.read_json(storage.join(data, schema.META_FILE))
    assert meta["synthetic"]["num_users"] == 30 and 25 <= meta["counts"]["users"] <= 30  # after the 5-core
    # the same folder with another user count: refused in one line, the set untouched
    assert main(["--dataset", "synthetic", "--synthetic-data", data, "--synthetic-users", "50",
                 "--out", str(tmp_path / "b"), *cheap]) == 2
    assert "num_users=30 (the recipe: 50)" in caplog.text and not (tmp_path / "b" / "results.json").exists()
    assert storage.read_json(storage.join(data, schema.META_FILE)) == meta
    # without the flag the spec's num_users (1,000) differs too: reused as it is, with a warning
    caplog.clear()
    assert main(["--dataset", "synthetic", "--synthetic-data", data, "--out", str(tmp_path / "c"), *cheap]) == 0
    assert "num_users=30 (the recipe: 1000)" in caplog.text
    again = json.loads((tmp_path / "c" / "results.json").read_text())["datasets"]["synthetic"]
    assert again["data"]["test"] == meta["counts"]["test"]


def test_bench_quality_seeds_runs_once_per_pipeline_seed_and_tables_them(tmp_path, monkeypatch, caplog) -> None:
    used: list[tuple[str, int, int]] = []

    def features(cfg) -> dict:  # which features folder and which seeds each run asked for
        used.append((cfg.featurize.name, cfg.featurize.sasrec.seed, cfg.trainer.seed))
        return write_features(cfg)

    monkeypatch.setattr(quality_data, "ensure_features", features)  # no Ray, no encoders
    data = prepare_synthetic(str(tmp_path / "syn"), num_users=40, num_items=50)
    out = tmp_path / "out"
    cheap = ["--set", "trainer.stage_samples=[8,8,8]", "--set", "trainer.batch_size=8",
             "--variants", "Speeder,no PPT", "--skip", "llara,cold-start,missing"]
    assert main(["--dataset", "synthetic", "--synthetic-data", data, "--out", str(out), "--seeds", "0,2",
                 *cheap]) == 0
    assert used == [("bench", 0, 0), ("bench-sasrec2", 2, 2)]  # seed 0 keeps the name: the spec's seed
    runs = {s: json.loads((out / f"seed-{s}" / "results.json").read_text())["datasets"]["synthetic"] for s in (0, 2)}
    assert [runs[s]["recipe"]["trainer"]["seed"] for s in (0, 2)] == [0, 2]
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [0, 2]
    models = summary["datasets"]["synthetic"]["models"]
    assert {"Speeder", "no PPT", "SASRec", "Popularity"} <= set(models)
    for name, m in models.items():
        assert m["hr@1"] == [runs[s]["models"][name]["metrics"]["cand_hr@1"] for s in (0, 2)], name
        assert m["hr@1_mean"] == pytest.approx(sum(m["hr@1"]) / 2)
        assert m["expected"] == [runs[s]["by_target"]["models"][name]["expected"] for s in (0, 2)], name
    assert models["SASRec"]["expected_vs_speeder"] == [runs[s]["by_target"]["models"]["SASRec"]["expected_vs_speeder"]
                                                       for s in (0, 2)]
    assert models["no PPT"]["hr@1_vs_speeder"] == [{"mean": runs[s]["models"]["no PPT"]["vs_speeder"]["hr@1"],
                                                    "ci95": runs[s]["models"]["no PPT"]["vs_speeder"]["ci95"]}
                                                   for s in (0, 2)]
    assert "expected_vs_speeder" not in models["Speeder"] and "hr@1_vs_speeder" not in models["Speeder"]
    md = (out / "seeds.md").read_text()
    sasrec = models["SASRec"]
    assert f"| SASRec | {sasrec['hr@1'][0]:.4f} / {sasrec['hr@1'][1]:.4f} | {sasrec['hr@1_mean']:.4f} |" in md
    assert f"{sasrec['expected'][0]:.4f} / {sasrec['expected'][1]:.4f} | {sasrec['expected_mean']:.4f} |" in md
    # a bad seed list is refused in one line before anything runs
    assert main(["--dataset", "synthetic", "--synthetic-data", data, "--out", str(tmp_path / "bad"),
                 "--seeds", "0,x", *cheap]) == 2
    assert "--seeds: 'x' is not a non-negative integer" in caplog.text and not (tmp_path / "bad").exists()
    assert main(["--dataset", "synthetic", "--synthetic-data", data, "--out", str(tmp_path / "bad"),
                 "--seeds", "1,1", *cheap]) == 2
    assert "--seeds: 1 given twice" in caplog.text
    assert main(["--dataset", "synthetic", "--synthetic-data", data, "--out", str(tmp_path / "bad"),
                 "--seeds", "0,1", "--set", "featurize.sasrec.seed=4", *cheap]) == 2
    assert "drop --set featurize.sasrec.seed=4" in caplog.text and not (tmp_path / "bad").exists()


def test_seeds_summary_without_the_truth_tables_hr1_and_its_paired_differences() -> None:
    from speeder_platform.bench.quality.seeds import parse_seeds, seeds_markdown, summarize

    def run(speeder: float, pop: float, ci: float) -> dict:  # one seed's results, as a dataset without the truth
        return {"datasets": {"ml100k": {"data": {"test": 943}, "models": {
            "Speeder": {"metrics": {"cand_hr@1": speeder}},
            "Popularity": {"metrics": {"cand_hr@1": pop}, "vs_speeder": {"hr@1": pop - speeder, "ci95": ci}},
            "no vision": {"same_as": "Speeder", "note": "identical"}}}}}

    summary = summarize({0: run(0.5, 0.2, 0.03), 3: run(0.4, 0.25, 0.04)})
    models = summary["datasets"]["ml100k"]["models"]
    assert summary["seeds"] == [0, 3] and set(models) == {"Speeder", "Popularity"}  # same_as rows left out
    assert models["Popularity"]["hr@1_mean"] == pytest.approx(0.225) and "expected" not in models["Popularity"]
    md = seeds_markdown(summary, "speeder bench quality --seeds 0,3")
    assert "| Popularity | 0.2000 / 0.2500 | 0.2250 | -0.3000 +- 0.0300; -0.1500 +- 0.0400 |" in md
    assert "expected HR@1" not in md.split("## ml100k")[1]  # no truth, no expected columns
    assert parse_seeds(" 2, 0 ,") == [2, 0] and parse_seeds(None) == []
    for bad, message in (("-1", "'-1' is not a non-negative integer"), ("\u00b2", "is not a non-negative integer"),
                         (" , ", "no seed in ' , '")):
        with pytest.raises(ValueError, match=message):
            parse_seeds(bad)
    with pytest.raises(ValueError, match="drop --set trainer.seed=3"):  # the seeds would silently replace it
        parse_seeds("0,1", ["model.ppt_lambda=0", "trainer.seed=3"])


def test_bench_quality_help_and_bad_variant(capsys, caplog) -> None:
    with pytest.raises(SystemExit) as exit_help:
        main(["--help"])
    assert exit_help.value.code == 0 and "--dataset" in capsys.readouterr().out
    assert main(["--variants", "Speeder,no such"]) == 2
    assert "unknown variant or part: no such" in caplog.text


def test_synthetic_truth_replays_the_generators_odds(tmp_path, caplog) -> None:
    from speeder_platform.config import SyntheticConfig
    from speeder_platform.data.synthetic import generate_users, next_item_odds, synthetic_catalog
    from speeder_platform.tables import load_samples

    data = prepare_synthetic(str(tmp_path / "syn"), num_users=40, num_items=50)
    meta = storage.read_json(storage.join(data, schema.META_FILE))
    cfg = SyntheticConfig(**meta["synthetic"])
    catalog = synthetic_catalog(cfg)
    sequences, groups = generate_users(cfg, catalog)
    assert meta["counts"]["interactions"] == sum(map(len, sequences))  # prepare kept every draw
    test = load_samples(data, "test", 8)
    got = synthetic_truth(data, test)
    items = storage.read_table(storage.join(data, schema.ITEMS_FILE)).to_pydict()
    gen = np.zeros(len(items[schema.ITEM_ID]), np.int64)
    gen[items[schema.ITEM_ID]] = [int(s.split("-")[1]) for s in items[schema.SOURCE_ID]]
    for s in range(len(test)):  # the test target is each user's last draw, with the odds it was drawn with
        user = int(test.user_id[s])
        assert gen[test.target[s]] == sequences[user][-1]
        odds = next_item_odds(cfg, catalog, int(groups[user]), sequences[user][:-1])
        np.testing.assert_allclose(got.odds[s], odds[gen[test.candidates[s]]])
        assert got.odds[s, got.target[s]] > 0 and test.candidates[s][got.target[s]] == test.target[s]
        succ = catalog.successor[sequences[user][-2]]
        assert got.successor[s] == (succ == sequences[user][-1])
        category, colour = divmod(int(groups[user]), cfg.num_colors)
        cands = gen[test.candidates[s]]
        assert got.in_pool[s].tolist() == ((catalog.category[cands] == category)
                                           | (catalog.colour[cands] == colour)).tolist()
        last = sequences[user][-2]
        assert got.near_last[s].tolist() == ((catalog.category[cands] == catalog.category[last])
                                             | (catalog.colour[cands] == catalog.colour[last])).tolist()
    assert 0 < got.successor.mean() < 1
    assert got.in_pool[np.arange(len(test)), got.target].mean() > 0.5  # draws come from the pool (noise aside)
    rule_ranks, rule_first = got.content_rule()
    assert ((rule_ranks == 0) == (rule_first == got.target)).all()
    assert (rule_ranks[got.successor] == 0).all()  # the rule knows the successor
    # expected hits: odds of the first choice over the candidates' odds; ranking by the odds is the ceiling
    best = got.expected_hits(got.generator_first())
    rng = np.random.default_rng(0)
    for first in (rng.integers(0, test.candidates.shape[1], len(test)), got.target, np.full(len(test), -1)):
        hits = got.expected_hits(first)
        assert (hits <= best + 1e-12).all() and (hits >= 0).all()
    np.testing.assert_allclose(got.expected_hits(got.target), got.odds[np.arange(len(test)), got.target]
                               / got.odds.sum(1))
    assert got.ceiling()["all"] == pytest.approx(best.mean()) and got.ceiling()["successor"] == 1.0
    by = got.by_target(np.zeros(len(test), np.int64), got.target)  # a model that always names the target
    assert by["successor"] == by["other"] == by["in_top"] == 1.0 and by["expected"] < 1.0
    # another catalog's samples do not follow this generator's sequences
    shuffled = Samples.from_rows([[int(test.target[0])]], [int(test.target[1])], [test.candidates[1].tolist()],
                                 max_history=8, user_ids=[int(test.user_id[0])])
    with pytest.raises(ValueError, match="not a stretch of the sequence"):
        synthetic_truth(data, shuffled)
    with pytest.raises(ValueError, match="needs each sample's user id"):
        synthetic_truth(data, Samples.from_rows([[1]], [2], [[2, 3]], max_history=8))
    ml = tmp_path / "other"
    storage.write_json(str(ml / schema.META_FILE), {"source": "movielens-100k"})
    assert synthetic_truth(str(ml), test) is None
    cut = prepare_synthetic(str(tmp_path / "cut"), num_users=40, num_items=50, kcore=9)  # drops short users
    with caplog.at_level("WARNING"):
        assert synthetic_truth(cut, load_samples(cut, "test", 8)) is None
    assert "HR@1 by kind of target is left out" in caplog.text


def test_expected_hits_by_hand() -> None:
    from speeder_platform.bench.quality.truth import SyntheticTruth

    odds = np.array([[0.7, 0.1, 0.1, 0.0], [0.2, 0.2, 0.05, 0.05], [0.1, 0.1, 0.1, 0.1]])
    in_pool = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], bool)
    near_last = np.array([[0, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0]], bool)
    rule = np.array([[3.0, 1.0, 1.0, 0.0], [2.0, 5.0, 5.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    truth = SyntheticTruth(odds=odds, target=np.array([0, 1, 3]), successor_at=np.array([0, -1, -1]),
                           in_pool=in_pool, near_last=near_last, rule_scores=rule)
    assert truth.successor.tolist() == [True, False, False]
    assert truth.top.tolist() == [1, 2, 4] and truth.target_on_top.tolist() == [True, True, True]
    np.testing.assert_allclose(truth.expected_hits(np.array([0, 2, -1])), [0.7 / 0.9, 0.1, 0.0])
    np.testing.assert_allclose(truth.expected_hits(np.array([1, 0, 3])), [0.1 / 0.9, 0.4, 0.25])
    # given that the target is not the successor: the successor's odds leave the candidates
    np.testing.assert_allclose(truth.expected_hits(np.array([1, 0, 3]), not_successor=True), [0.5, 0.4, 0.25])
    np.testing.assert_allclose(truth.expected_hits(np.array([0, 0, 3]), not_successor=True), [0.0, 0.4, 0.25])
    ceiling = truth.ceiling()
    assert ceiling["all"] == pytest.approx((0.7 / 0.9 + 0.4 + 0.25) / 3)
    assert ceiling["successor"] == 1.0 and ceiling["other"] == pytest.approx((0.4 + 0.25) / 2)
    by = truth.by_target(np.array([0, 2, 0]), np.array([0, 2, 3]))
    assert by["in_top"] == pytest.approx(2 / 3) and by["in_top_other"] == pytest.approx(1 / 2)
    assert by["expected"] == pytest.approx((0.7 / 0.9 + 0.1 + 0.25) / 3)
    assert by["expected_other"] == pytest.approx((0.1 + 0.25) / 2)
    # first choices on the samples without the successor among the candidates (rows 1 and 2): pool, near, tie
    assert truth.first_choices(np.array([0, 0, 0])) == {"first_in_pool": 0.5, "first_near_last": 0.5,
                                                         "first_elsewhere": 0.0}
    assert truth.first_choices(np.array([0, 1, -1])) == {"first_in_pool": 0.0, "first_near_last": 0.5,
                                                          "first_elsewhere": 0.5}
    ranks, first = truth.content_rule()  # ties drawn at random
    assert ranks[[0, 2]].tolist() == [0, 0] and first[[0, 2]].tolist() == [0, 3]
    assert first[1] in (1, 2) and ranks[1] == (0 if first[1] == 1 else 1)

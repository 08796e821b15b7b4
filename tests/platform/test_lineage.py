"""Features commit as one unit, and checkpoints load only with the features they were trained on.

No Ray: features are random vectors committed through lineage.commit (as featurize commits its
table), checkpoints untrained models from testkit with the record train.worker writes.
"""

from __future__ import annotations

import os
import shutil

import pytest

from speeder_platform import lineage, storage
from speeder_platform.serve.recommender import Recommender
from speeder_platform.tables import features_folder, features_uri
from speeder_platform.trained import load_trained
from testkit.datasets import prepare_synthetic, tiny_config, write_checkpoint, write_random_features

SETTINGS = {"text_encoder": "random", "seed": 0}


def commit_random(dataset: str, settings: dict = SETTINGS, seed: int = 0, extends: str | None = None,
                  history: list[str] | None = None) -> str:
    """Random features committed as featurize commits them; their fingerprint."""
    uri = write_random_features(dataset, seed=seed)  # a plain table, then re-committed as one unit
    table = storage.read_table(uri)
    inputs = {"items.parquet": f"digest-{seed}"}
    fp = lineage.fingerprint(inputs, settings, extends=extends)
    lineage.commit(table, features_folder(dataset, "default"), {"settings": settings, "lineage": history or []}, fp)
    return fp


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A dataset, its committed features and a checkpoint that records them (as train.worker does)."""
    root = tmp_path_factory.mktemp("lineage")
    data = prepare_synthetic(str(root / "data"))
    fp = commit_random(data)
    ckpt = write_checkpoint(tiny_config(str(root), f"data.uri={data}"), str(root / "ckpt"))
    return {"data": data, "checkpoint": ckpt, "fingerprint": fp, "root": str(root)}


def test_a_committed_set_names_its_fingerprint_and_table(trained) -> None:
    found = lineage.committed_features(trained["data"], "default")
    assert found.fingerprint == trained["fingerprint"] and found.settings == SETTINGS
    meta = storage.read_json(os.path.join(found.uri, "meta.json"))
    assert meta[lineage.TABLE_KEY]["bytes"] == os.path.getsize(features_uri(trained["data"], "default"))


def test_the_fingerprint_follows_the_inputs() -> None:
    base = lineage.fingerprint({"items.parquet": "a"}, SETTINGS)
    assert base == lineage.fingerprint({"items.parquet": "a"}, dict(SETTINGS))
    assert base != lineage.fingerprint({"items.parquet": "b"}, SETTINGS)
    assert base != lineage.fingerprint({"items.parquet": "a"}, {**SETTINGS, "seed": 1})
    assert base != lineage.fingerprint({"items.parquet": "a"}, SETTINGS, extends="0123")


@pytest.mark.parametrize("damage", ["half commit", "cut short", "bit rot"])
def test_a_table_that_is_not_the_committed_one_is_refused(tmp_path, damage: str) -> None:
    data = prepare_synthetic(str(tmp_path / "data"))
    commit_random(data)
    uri = features_uri(data, "default")
    raw = open(uri, "rb").read()
    if damage == "half commit":  # a new table written, the process gone before its meta.json
        storage.write_table(storage.read_table(uri).slice(0, 10), uri)
    elif damage == "cut short":
        open(uri, "wb").write(raw[: len(raw) // 2])
    else:
        flipped = bytearray(raw)
        flipped[len(raw) // 2] ^= 0xFF
        open(uri, "wb").write(bytes(flipped))
    with pytest.raises(lineage.FeaturesError, match=r"are not the table meta.json committed .*featurize --force"):
        lineage.committed_features(data, "default")


def uncommit(data: str, state: str) -> None:
    """Leave the committed set of `data` as a features folder that nothing committed."""
    meta_uri = os.path.join(features_folder(data, "default"), "meta.json")
    if state == "no meta.json":  # a first featurize killed between the table and its meta.json
        os.remove(meta_uri)
    else:  # a set written before fingerprints: meta.json with settings, no fingerprint, no table digest
        meta = storage.read_json(meta_uri)
        storage.write_json(meta_uri, {k: v for k, v in meta.items() if k not in (lineage.META_KEY, lineage.TABLE_KEY)})


@pytest.mark.parametrize("state", ["no meta.json", "meta.json without a fingerprint"])
def test_features_that_nothing_committed_are_refused(tmp_path, state: str) -> None:
    data = prepare_synthetic(str(tmp_path / "data"))
    commit_random(data)
    uncommit(data, state)
    with pytest.raises(lineage.FeaturesError) as err:
        lineage.committed_features(data, "default")
    text = str(err.value)
    assert "\n" not in text and "never committed" in text and "speeder featurize --force" in text, text
    assert ("no meta.json" if state == "no meta.json" else "names no fingerprint") in text


@pytest.mark.parametrize("state", ["no meta.json", "meta.json without a fingerprint"])
def test_featurize_makes_an_uncommitted_set_again(tmp_path, monkeypatch, state: str) -> None:
    from speeder_platform.featurize import pipeline

    data = prepare_synthetic(str(tmp_path / "data"))
    cfg = tiny_config(str(tmp_path), f"data.uri={data}")
    table = storage.read_table(write_random_features(data))
    settings, digest = pipeline.encoder_settings(cfg), pipeline.dataset_fingerprint(data)
    meta = {"settings": settings, "fingerprint": digest, "counts": {"items": table.num_rows}, "dims": {}}
    lineage.commit(table, features_folder(data, "default"), meta, lineage.fingerprint(digest, settings))

    class Featurizing(Exception):
        """Raised where featurize starts Ray: it decided to make the set again."""

    def start_ray(_cfg) -> None:
        raise Featurizing

    monkeypatch.setattr("speeder_platform.ray_utils.ensure_ray", start_ray)
    assert pipeline.run_featurize(cfg).mode == "up_to_date"  # committed, same settings and files: skipped
    uncommit(data, state)
    with pytest.raises(Featurizing):  # neither skipped as up to date nor refused: featurized again
        pipeline.run_featurize(cfg)


def test_check_names_both_fingerprints_and_why() -> None:
    features = lineage.FeaturesSet("data/features/default", "new0", ["old1", "old2"], {"text_encoder": "minilm"})
    lineage.check_checkpoint({"features": {"fingerprint": "new0"}}, features, "ckpt")
    lineage.check_checkpoint({"features": {"fingerprint": "old1"}}, features, "ckpt")  # extended since: fits
    with pytest.raises(lineage.FeaturesError) as err:
        lineage.check_checkpoint({"features": {"fingerprint": "abc9", "settings": {"text_encoder": "hashing"}}},
                                 features, "ckpt")
    text = str(err.value)
    assert "\n" not in text and "abc9" in text and "new0" in text and "other encoder settings" in text
    with pytest.raises(lineage.FeaturesError, match="other dataset files"):
        lineage.check_checkpoint({"features": {"fingerprint": "abc9", "settings": {"text_encoder": "minilm"}}},
                                 features, "ckpt")
    # A checkpoint from before fingerprints records none: nothing to compare (the dimension check remains).
    lineage.check_checkpoint({"features": {"fingerprint": None}}, features, "ckpt")
    lineage.check_checkpoint({}, features, "ckpt")


def test_scoring_and_serving_refuse_features_the_checkpoint_was_not_trained_on(trained, tmp_path) -> None:
    assert load_trained(trained["checkpoint"]).meta["features"]["fingerprint"] == trained["fingerprint"]
    # The catalog featurized again: same dims, same ids, other vectors (another seed) -> another fingerprint.
    other = str(tmp_path / "data")
    shutil.copytree(trained["data"], other)
    new = commit_random(other, seed=1)
    assert new != trained["fingerprint"]
    for load in (lambda: load_trained(trained["checkpoint"], other),
                 lambda: Recommender.from_checkpoint(trained["checkpoint"], other)):
        with pytest.raises(lineage.FeaturesError, match=f"trained on features {trained['fingerprint']}, but .* "
                                                        f"holds features {new}"):
            load()
    # An incremental run extends the set the checkpoint was trained on: it still fits.
    commit_random(other, seed=1, extends=trained["fingerprint"], history=[trained["fingerprint"]])
    assert load_trained(trained["checkpoint"], other).checkpoint == trained["checkpoint"]


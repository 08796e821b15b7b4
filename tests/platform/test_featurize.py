"""`speeder featurize`: image path rules, SASRec without leakage, and the Ray Data job end to end."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

from speeder import schema
from speeder_platform import storage
from speeder_platform.featurize.ops import locate_image, read_image_bytes
from speeder_platform.featurize.pipeline import run_featurize
from speeder_platform.featurize.sequence import load_sasrec, sasrec_dir, sequence_features, train_sequences
from speeder_platform.tables import features_uri, load_item_features
from testkit.datasets import prepare_synthetic, tiny_config

FAST = ["featurize.image_size=32", "featurize.batch_size=16", "featurize.sasrec.epochs=2",
        "featurize.sasrec.hidden_size=16", "featurize.sasrec.max_length=8", "featurize.sasrec.batch_size=128"]
SASREC = {"hidden_size": 16, "num_layers": 1, "num_heads": 1, "dropout": 0.2, "max_length": 8, "epochs": 2,
          "batch_size": 64, "lr": 1e-3, "seed": 0}


def items_table(dataset: str) -> pa.Table:
    return storage.read_table(storage.join(dataset, schema.ITEMS_FILE))


def set_image_uris(dataset: str, uris: dict[int, str | None]) -> None:
    items = items_table(dataset)
    column = items.column(schema.IMAGE_URI).to_pylist()
    for item, uri in uris.items():
        column[item] = uri
    index = items.column_names.index(schema.IMAGE_URI)
    storage.write_table(items.set_column(index, items.field(index), pa.array(column, pa.string())),
                        storage.join(dataset, schema.ITEMS_FILE))


# -- image path rules (no Ray) ------------------------------------------------------------------------
def test_locate_image_keeps_reads_inside_the_dataset(tmp_path) -> None:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"x")
    (root / "images" / "link.png").symlink_to("/etc/passwd")
    (root / "images" / "outside").symlink_to(tmp_path)
    (tmp_path / "secret.png").write_bytes(b"s")
    r = str(root)
    inside = os.path.realpath(root / "images" / "a.png")
    assert locate_image("images/a.png", r) == ("read", inside)
    assert locate_image("images/../images/a.png", r) == ("read", inside)
    assert locate_image(f"file://{root}/images/a.png", r) == ("read", inside)
    assert locate_image(f"{root}/images/a.png", r) == ("read", inside)
    for bad in ("../../etc/passwd", "/etc/passwd", "file:///etc/passwd", "images/link.png",
                "images/outside/secret.png", "../secret.png", "images/../../secret.png", "gs://b/x.png",
                "file://relative.png", "images/a\x00.png", ".", "s3://"):
        assert locate_image(bad, r) == ("refused_path", None), bad
    assert locate_image("https://example.com/a.png", r) == ("remote_not_fetched", None)
    assert locate_image("HTTP://example.com/a.png", r) == ("remote_not_fetched", None)
    assert locate_image(None, r) == ("no_image", None)
    assert locate_image("  ", r) == ("no_image", None)
    assert read_image_bytes(str(root / "images" / "gone.png")) == ("missing", None)
    assert read_image_bytes(str(root / "images")) == ("missing", None)


def test_locate_image_on_an_s3_root() -> None:
    root = "s3://bucket/data"
    assert locate_image("images/1.png", root) == ("read", "s3://bucket/data/images/1.png")
    assert locate_image("s3://other/x.png", root) == ("read", "s3://other/x.png")
    for bad in ("../x.png", "images/../../data2/x.png", "/etc/passwd", "file:///etc/passwd"):
        assert locate_image(bad, root) == ("refused_path", None), bad


# -- sequence features (no Ray) -----------------------------------------------------------------------
def test_train_sequences_are_the_train_split(tmp_path) -> None:
    data = prepare_synthetic(str(tmp_path / "data"), num_users=30, num_items=60)
    inter = storage.read_table(storage.join(data, schema.INTERACTIONS_FILE))
    train = storage.read_table(storage.join(data, schema.SPLITS_DIR, "train.parquet")).to_pylist()
    by_user: dict[int, list[int]] = {}
    for row in train:  # rows are in position order within a user
        by_user.setdefault(row[schema.USER_ID], []).append(row[schema.TARGET])
    sequences = train_sequences(inter)
    assert len(sequences) == len(by_user)
    for user, seq in zip(sorted(by_user), sequences, strict=True):
        assert seq[1:].tolist() == by_user[user]  # every train target, and nothing after the last one


def _handmade_dataset(root: str, last_two: np.ndarray) -> str:
    """12 users x 8 items over items 0..19; every user's last two items come from 20..29 (held out)."""
    rng = np.random.default_rng(0)
    users, items, times = [], [], []
    for u in range(12):
        seq = list(rng.choice(20, size=6, replace=False)) + list(last_two[u])
        users += [u] * len(seq)
        items += seq
        times += list(range(len(seq)))
    table = pa.table({schema.USER_ID: pa.array(users, pa.int64()), schema.ITEM_ID: pa.array(items, pa.int64()),
                      schema.TIMESTAMP: pa.array(times, pa.int64())})
    storage.write_table(table, storage.join(root, schema.INTERACTIONS_FILE))
    return root


def test_sasrec_features_never_see_valid_or_test_targets(tmp_path) -> None:
    held_out = np.arange(20, 30)
    rng = np.random.default_rng(1)
    first = _handmade_dataset(str(tmp_path / "a"), rng.choice(held_out, size=(12, 2)))
    second = _handmade_dataset(str(tmp_path / "b"), rng.choice(held_out, size=(12, 2)))
    a = sequence_features(first, str(tmp_path / "a" / "features"), SASREC, num_items=30)
    b = sequence_features(second, str(tmp_path / "b" / "features"), SASREC, num_items=30)
    # Items seen only as valid/test targets get no seq_emb ...
    assert not a.present[held_out].any() and a.present[:20].all()
    assert a.info["train_interactions"] == 12 * 6
    # ... and other valid/test targets give exactly the same embeddings: they never entered training.
    np.testing.assert_array_equal(a.values, b.values)
    assert a.info["sasrec"] == "trained"
    # A second run loads the saved weights instead of training; the SASRec baseline can load them too.
    again = sequence_features(first, str(tmp_path / "a" / "features"), SASREC, num_items=30)
    assert again.info["sasrec"] == "loaded"
    np.testing.assert_array_equal(again.values, a.values)
    model, meta = load_sasrec(sasrec_dir(str(tmp_path / "a" / "features")))
    assert meta["settings"] == SASREC and model.item_embeddings().shape == (30, 16)
    changed = sequence_features(first, str(tmp_path / "a" / "features"), {**SASREC, "epochs": 1}, num_items=30)
    assert changed.info["sasrec"] == "trained"


# -- the Ray Data job ---------------------------------------------------------------------------------
_FEATURIZED: dict[str, tuple] = {}


@pytest.fixture
def featurized(tmp_path_factory, ray_local):
    """A synthetic dataset (some items without image) featurized once per module: (config, report)."""
    if "run" not in _FEATURIZED:
        cfg = tiny_config(str(tmp_path_factory.mktemp("featurize")), *FAST)
        prepare_synthetic(cfg.data.uri, num_users=40, num_items=60, **{"synthetic.missing_image_rate": 0.25})
        _FEATURIZED["run"] = cfg, run_featurize(cfg)
    return _FEATURIZED["run"]


@pytest.mark.integration
def test_featurize_synthetic_dataset(featurized) -> None:
    cfg, report = featurized
    items = items_table(cfg.data.uri)
    n = items.num_rows
    with_image = np.array([u is not None for u in items.column(schema.IMAGE_URI).to_pylist()])
    features = load_item_features(cfg.data.uri, cfg.featurize.name)
    assert features.num_items == n
    assert features.text_mask.all() and features.dims() == {"text": 256, "vision": 1280, "sequence": 16}
    np.testing.assert_array_equal(features.image_mask.numpy(), with_image)
    assert 0 < with_image.sum() < n
    assert features.sequence_mask.all()  # 5-core: every item has train interactions
    assert report.mode == "full" and report.encoded == report.items == n and report.items_with_text == n
    assert report.image_status["ok"] == with_image.sum() and report.image_status["no_image"] == n - with_image.sum()
    assert report.sasrec == "trained" and report.items_per_s > 0
    assert "ok" in report.summary() and set(report.to_dict()) >= {"items_per_s", "image_status", "dims"}
    meta = storage.read_json(storage.join(cfg.data.uri, schema.FEATURES_DIR, "default", schema.META_FILE))
    assert meta["counts"]["image_status"]["ok"] == with_image.sum() and meta["dims"]["vision"] == 1280
    assert storage.exists(storage.join(sasrec_dir(os.path.dirname(features_uri(cfg.data.uri, "default"))),
                                       "model.safetensors"))
    again = run_featurize(cfg)  # same settings, same files: nothing to do
    assert again.mode == "up_to_date" and again.encoded == 0 and "up to date" in again.summary()


@pytest.mark.integration
def test_incremental_encodes_only_new_items(featurized, tmp_path) -> None:
    cfg0, _ = featurized
    shutil.copytree(cfg0.data.uri, tmp_path / "data")
    cfg = tiny_config(str(tmp_path), *FAST, "featurize.incremental=true")
    before = storage.read_table(features_uri(cfg.data.uri, "default"))
    items = items_table(cfg.data.uri)
    n = items.num_rows
    extra = pa.table({schema.ITEM_ID: pa.array([n, n + 1, n + 2], pa.int64()),
                      schema.SOURCE_ID: ["new-0", "new-1", "new-2"], schema.TITLE: ["a", "b", "c"],
                      schema.TEXT: ["a red lamp", "a blue chair", ""],
                      schema.IMAGE_URI: [items.column(schema.IMAGE_URI).drop_null()[0].as_py(), None, "nope.png"]})
    storage.write_table(pa.concat_tables([items, extra.cast(items.schema)]), storage.join(cfg.data.uri,
                                                                                         schema.ITEMS_FILE))
    report = run_featurize(cfg)
    after = storage.read_table(features_uri(cfg.data.uri, "default"))
    assert report.mode == "incremental" and report.encoded == 3 and report.items == n + 3
    assert report.items_with_text == 2  # the blank text was encoded from its title
    assert {k: v for k, v in report.image_status.items() if v} == {"ok": 1, "no_image": 1, "missing": 1}
    assert after.slice(0, n).equals(before)  # old rows bit for bit
    new = after.slice(n).to_pydict()
    assert all(v is not None for v in new[schema.TEXT_EMB])
    assert [v is not None for v in new[schema.IMAGE_EMB]] == [True, False, False]
    assert new[schema.SEQ_EMB] == [None, None, None]  # no retraining: new items have no seq_emb
    assert load_item_features(cfg.data.uri, "default").num_items == n + 3
    nothing = run_featurize(cfg)
    assert nothing.encoded == 0 and "no new items" in nothing.summary()


@pytest.mark.integration
def test_bad_images_are_counted_and_never_fatal(tmp_path, ray_local) -> None:
    cfg = tiny_config(str(tmp_path), *FAST)
    data = prepare_synthetic(cfg.data.uri, num_users=40, num_items=60)
    images = os.path.join(data, "images")
    good = open(os.path.join(images, sorted(os.listdir(images))[0]), "rb").read()
    open(os.path.join(images, "corrupt.png"), "wb").write(os.urandom(300))
    open(os.path.join(images, "truncated.png"), "wb").write(good[: len(good) // 2])
    open(os.path.join(images, "text.png"), "w").write("not an image\n")
    os.symlink("/etc/passwd", os.path.join(images, "passwd.png"))
    bad = {0: "images/corrupt.png", 1: "images/truncated.png", 2: "images/text.png", 3: "images/missing.png",
           4: "../../etc/passwd", 5: "/etc/passwd", 6: "http://example.com/6.png", 7: None,
           8: "images/passwd.png", 9: "https://example.com/9.jpg", 10: "images/"}
    set_image_uris(data, bad)
    report = run_featurize(cfg)
    n = items_table(data).num_rows
    expected = {"ok": n - len(bad), "corrupt": 3, "missing": 2, "refused_path": 3, "remote_not_fetched": 2,
                "no_image": 1, "unreadable": 0}
    assert report.image_status == expected and report.items == n
    table = storage.read_table(features_uri(data, "default")).to_pydict()
    present = [v is not None for v in table[schema.IMAGE_EMB]]
    assert present == [i not in bad for i in range(n)]
    assert all(v is not None for v in table[schema.TEXT_EMB])
    assert "refused_path 3" in report.summary()


@pytest.mark.integration
def test_featurize_dataset_on_s3(s3_bucket, ray_local) -> None:
    cfg = tiny_config(f"{s3_bucket}/run", *FAST, "featurize.name=s3set")
    data = prepare_synthetic(cfg.data.uri, num_users=40, num_items=60)
    set_image_uris(data, {0: "../outside.png", 1: f"{data}/images/2.png"})  # refused; an absolute s3:// URI
    report = run_featurize(cfg)
    features = load_item_features(data, "s3set")
    n = items_table(data).num_rows
    assert features.num_items == n and features.text_mask.all() and features.sequence_mask.all()
    assert report.image_status["ok"] == n - 1 and report.image_status["refused_path"] == 1
    assert features.image_mask.sum() == n - 1 and not features.image_mask[0]
    assert storage.exists(storage.join(data, schema.FEATURES_DIR, "s3set", "sasrec", "sasrec.json"))

"""prepare_dataset end to end on small synthetic data: config, determinism, meta.json, stats."""

import json
import os

import pyarrow as pa
import pytest

from speeder.schema import IMAGE_URI, ITEMS_FILE, META_FILE, SPLITS
from speeder_platform import storage
from speeder_platform.config import ConfigError
from speeder_platform.data.prepare import prepare_config_from_args, prepare_dataset
from speeder_platform.data.stats import dataset_stats, format_stats

SMALL = ["synthetic.num_users=50", "synthetic.num_items=30", "synthetic.num_categories=3",
         "synthetic.num_colors=2", "synthetic.max_length=12", "synthetic.image_size=16"]


def files_under(root: str) -> dict[str, bytes]:
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_config_from_args_layers_options_then_overrides() -> None:
    cfg = prepare_config_from_args("synthetic", ["synthetic.num_users=100", "prepare.kcore=3"],
                                   max_history=10, kcore=4, raw="123")
    assert cfg.source == "synthetic" and cfg.synthetic.num_users == 100
    assert cfg.max_history == 10 and cfg.num_candidates == 20
    assert cfg.kcore == 3  # dotlist overrides come last
    assert cfg.raw == "123"  # a path that looks like a number stays a string
    assert prepare_config_from_args("amazon2018", [], raw="null").raw == "null"
    with pytest.raises(ConfigError, match=r"^prepare\.synthetic\.num_userz"):
        prepare_config_from_args("synthetic", ["synthetic.num_userz=3"])
    with pytest.raises(ConfigError, match=r"^prepare\.source"):
        prepare_config_from_args("movielens-1m", [])
    with pytest.raises(ConfigError, match=r"^prepare\.num_candidates"):
        prepare_config_from_args("synthetic", [], num_candidates=1)


def test_prepare_twice_gives_identical_bytes(tmp_path, assert_valid_dataset) -> None:
    cfg = prepare_config_from_args("synthetic", SMALL, num_candidates=8, max_history=5)
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    report = prepare_dataset(cfg, first)
    prepare_dataset(cfg, second)
    a, b = files_under(first), files_under(second)
    assert {f"splits/{s}.parquet" for s in SPLITS} <= set(a)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    assert_valid_dataset(first, num_candidates=8, max_history=5)
    # Another seed draws other candidates, the same histories.
    other = str(tmp_path / "c")
    prepare_dataset(prepare_config_from_args("synthetic", SMALL, num_candidates=8, max_history=5, seed=1),
                    other)
    c = files_under(other)
    assert c["items.parquet"] == a["items.parquet"] and c["splits/test.parquet"] != a["splits/test.parquet"]

    meta = json.loads(a[META_FILE])
    assert meta["source"] == "synthetic"
    assert meta["protocol"]["num_candidates"] == 8 and meta["protocol"]["max_history"] == 5
    assert meta["counts"]["users"] == report.users and meta["counts"]["train"] == report.split_sizes["train"]
    assert meta["synthetic"]["num_users"] == 50
    assert "seconds" not in meta["report"] and "out_uri" not in meta["report"]  # no durations, no paths
    assert report.seconds > 0 and str(report.users) in report.summary()


def test_reprepare_replaces_images_of_an_earlier_run(tmp_path) -> None:
    out = str(tmp_path / "ds")
    more = SMALL + ["synthetic.num_items=36"]
    big = prepare_dataset(prepare_config_from_args("synthetic", more, num_candidates=8), out)
    small = prepare_dataset(prepare_config_from_args("synthetic", SMALL, num_candidates=8), out)
    assert big.images_found == 36 and small.images_found == 30
    assert sorted(os.listdir(os.path.join(out, "images"))) == sorted(f"{i}.png" for i in range(30))


def test_kcore_too_strict_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"prepare\.kcore: the 40-core of synthetic is empty"):
        prepare_dataset(prepare_config_from_args("synthetic", SMALL, kcore=40), str(tmp_path / "x"))


def test_stats_contain_the_figures(tmp_path) -> None:
    out = str(tmp_path / "ds")
    overrides = [*SMALL, "synthetic.missing_image_rate=0.2"]
    cfg = prepare_config_from_args("synthetic", overrides, num_candidates=8)
    report = prepare_dataset(cfg, out)
    os.remove(os.path.join(out, "images", sorted(os.listdir(os.path.join(out, "images")))[0]))
    stats = dataset_stats(out)
    assert stats["users"] == report.users and stats["items"] == report.items
    assert stats["interactions"] == report.interactions
    assert stats["images"]["with_uri"] == report.images_found
    assert stats["images"]["relative_present"] == report.images_found - 1
    assert {s: v["samples"] for s, v in stats["splits"].items()} == report.split_sizes
    assert stats["splits"]["test"]["history"]["max"] <= 20
    text = format_stats(stats)
    lines = text.splitlines()
    assert lines[0].split() == ["dataset", out]
    assert f"{report.interactions:,}" in text and f"{report.items:,}" in text
    assert f"{report.images_found - 1:,} of {report.images_found:,} relative files present" in text
    train = next(line for line in lines if line.startswith("train"))
    assert train.split()[1] == f"{report.split_sizes['train']:,}"
    header = next(line for line in lines if line.startswith("split"))
    assert len(header) == len(train)  # aligned columns
    # An image_uri that escapes the dataset is never looked up, even when the file is there.
    (tmp_path / "outside.png").write_bytes(b"x")
    items = storage.read_table(os.path.join(out, ITEMS_FILE))
    uris = items.column(IMAGE_URI).to_pylist()
    uris[uris.index(None)] = "../outside.png"
    items = items.set_column(items.schema.get_field_index(IMAGE_URI), IMAGE_URI, pa.array(uris, pa.string()))
    storage.write_table(items, os.path.join(out, ITEMS_FILE))
    escaped = dataset_stats(out)["images"]
    assert escaped["relative"] == report.images_found + 1
    assert escaped["relative_present"] == report.images_found - 1

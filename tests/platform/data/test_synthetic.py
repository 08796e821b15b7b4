"""The synthetic multimodal catalog: real PNGs, colour only in the image, a visible successor rule."""

import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from speeder.schema import IMAGE_URI, INTERACTIONS_FILE, ITEM_ID, ITEMS_FILE, SOURCE_ID, TEXT, TITLE
from speeder_platform import storage
from speeder_platform.config import SyntheticConfig
from speeder_platform.data.prepare import prepare_config_from_args, prepare_dataset
from speeder_platform.data.synthetic import (
    colour_names,
    colour_rgb,
    generate_users,
    item_source_id,
    next_item_odds,
    synthetic_catalog,
    user_sequences,
)

SMALL = ["synthetic.num_users=60", "synthetic.num_items=40", "synthetic.num_categories=4",
         "synthetic.num_colors=2", "synthetic.min_length=8", "synthetic.max_length=16",
         "synthetic.image_size=24", "synthetic.missing_image_rate=0.1"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cfg = prepare_config_from_args("synthetic", SMALL, num_candidates=10)
    out = str(tmp_path_factory.mktemp("syn"))
    return cfg, out, prepare_dataset(cfg, out)


def test_layout_and_protocol(small, assert_valid_dataset) -> None:
    cfg, out, report = small
    assert_valid_dataset(out, num_candidates=10)
    # 5-core keeps most of it.
    assert report.users >= 55 and report.items >= 36
    assert report.interactions >= 0.9 * report.raw_interactions
    assert report.images_found + report.images_missing == report.items
    assert 0 < report.images_missing < report.items / 3  # about 10% without image


def test_images_are_pngs_in_the_item_colour(small) -> None:
    cfg, out, report = small
    items = storage.read_table(os.path.join(out, ITEMS_FILE)).to_pylist()
    catalog = synthetic_catalog(cfg.synthetic)
    payloads = set()
    for row in items:
        if row[IMAGE_URI] is None:
            continue
        assert row[IMAGE_URI] == f"images/{row[ITEM_ID]}.png"
        data = storage.read_bytes(os.path.join(out, row[IMAGE_URI]))
        payloads.add(data)
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.size == (24, 24)
        pixels = np.asarray(image.convert("RGB"), np.int64).reshape(-1, 3)
        index = int(row[SOURCE_ID].split("-")[1])
        rgb = np.array(colour_rgb(int(catalog.colour[index]), 2))
        # A good share of the pixels is close to the item's colour.
        assert (np.abs(pixels - rgb).max(axis=1) < 30).mean() > 0.1, row
    assert len(payloads) == report.images_found  # no two images byte-identical
    assert len(os.listdir(os.path.join(out, "images"))) == report.images_found


def test_colour_never_in_text_and_category_always_in_title() -> None:
    cfg = SyntheticConfig(num_items=200, num_categories=12, num_colors=8)
    catalog = synthetic_catalog(cfg)
    words = colour_names(8)
    assert len(words) == 8
    pattern = re.compile(r"\b(" + "|".join(words) + r")\b", re.IGNORECASE)
    for i in range(cfg.num_items):
        assert not pattern.search(catalog.titles[i]) and not pattern.search(catalog.texts[i])
    # Items of one category share its word; the colour splits each category into groups.
    for k in range(cfg.num_categories):
        names = {catalog.titles[i].split(" #")[0] for i in np.flatnonzero(catalog.category == k)}
        assert len(names) == 1
    assert len(np.unique(catalog.group)) == 96


def test_successor_rule_is_visible_in_sequences() -> None:
    cfg = SyntheticConfig(num_users=200, markov_strength=0.7)
    catalog = synthetic_catalog(cfg)
    # The successor stays in the item's group and cycles through it.
    assert np.array_equal(catalog.group[catalog.successor], catalog.group)
    assert np.all(catalog.successor != np.arange(cfg.num_items))
    sequences = user_sequences(cfg, catalog)
    prev = np.concatenate([s[:-1] for s in sequences])
    nxt = np.concatenate([s[1:] for s in sequences])
    follows = (catalog.successor[prev] == nxt).mean()
    assert follows > 0.5  # chance level is ~1/num_items
    assert (catalog.category[prev] == catalog.category[nxt]).mean() > 0.65
    assert (catalog.colour[prev] == catalog.colour[nxt]).mean() > 0.65
    assert all(len(set(s)) == len(s) for s in sequences)  # no repeats: the candidate protocol stays fair
    weak = user_sequences(SyntheticConfig(num_users=200, markov_strength=0.0), catalog)
    prev = np.concatenate([s[:-1] for s in weak])
    nxt = np.concatenate([s[1:] for s in weak])
    assert (catalog.successor[prev] == nxt).mean() < follows - 0.25


def test_next_item_odds_are_the_odds_the_generator_draws_with() -> None:
    """Every draw had positive odds, the odds are a distribution over the unseen items, and over all draws the
    expected counts (successor, preferred group, related pool) match the counts drawn."""
    cfg = SyntheticConfig(num_users=300, markov_strength=0.7)
    catalog = synthetic_catalog(cfg)
    sequences, groups = generate_users(cfg, catalog)
    assert sequences == user_sequences(cfg, catalog) and groups.shape == (300,)
    expected, drawn = np.zeros(3), np.zeros(3)
    for seq, g in zip(sequences, groups, strict=True):
        category, colour = divmod(int(g), cfg.num_colors)
        related = (catalog.category == category) | (catalog.colour == colour)
        for at, item in enumerate(seq):
            odds = next_item_odds(cfg, catalog, int(g), seq[:at])  # (N,)
            assert odds[item] > 0 and odds[seq[:at]].sum() == 0 and odds.sum() == pytest.approx(1.0)
            kinds = np.zeros((3, cfg.num_items), bool)  # successor, preferred group, related pool
            if at:
                kinds[0, catalog.successor[seq[at - 1]]] = True
            kinds[1], kinds[2] = catalog.group == g, related
            expected += kinds @ odds
            drawn += kinds[:, item]
    sd = np.sqrt(expected)  # Poisson-like spread of a count
    assert (np.abs(drawn - expected) < 4 * sd).all(), (drawn, expected)
    first = [seq[0] for seq in sequences]  # a sequence starts in its preferred group (noise aside)
    assert np.mean(catalog.group[first] == groups) > 0.9


def test_successor_rule_survives_prepare(small) -> None:
    cfg, out, _ = small
    catalog = synthetic_catalog(cfg.synthetic)
    items = storage.read_table(os.path.join(out, ITEMS_FILE))
    index = np.array([int(s.split("-")[1]) for s in items.column(SOURCE_ID).to_pylist()])
    inter = storage.read_table(os.path.join(out, INTERACTIONS_FILE))
    user = inter.column("user_id").to_numpy()
    item = index[inter.column(ITEM_ID).to_numpy()]
    same_user = user[1:] == user[:-1]
    assert (catalog.successor[item[:-1]] == item[1:])[same_user].mean() > 0.5
    texts = items.column(TEXT).to_pylist()
    titles = items.column(TITLE).to_pylist()
    assert all(text.startswith(title) for title, text in zip(titles, texts, strict=True))
    assert items.column(SOURCE_ID).to_pylist() == sorted(item_source_id(i) for i in index)


def test_generator_is_deterministic_and_seeded() -> None:
    cfg = SyntheticConfig(num_users=30)
    a, b = synthetic_catalog(cfg), synthetic_catalog(cfg)
    assert np.array_equal(a.successor, b.successor) and a.texts == b.texts
    assert user_sequences(cfg, a) == user_sequences(cfg, b)
    other = SyntheticConfig(num_users=30, seed=1)
    assert user_sequences(other, synthetic_catalog(other)) != user_sequences(cfg, a)

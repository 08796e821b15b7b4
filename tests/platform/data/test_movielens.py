"""MovieLens-100K: the real counts after 5-core (docs/benchmarks.md#reference-figures), and the GroupLens
raw-file path."""

import os
import time

import pytest

from speeder.schema import INTERACTIONS_FILE, ITEMS_FILE, SPLITS, SPLITS_DIR
from speeder_platform import storage
from speeder_platform.data.movielens import GENRES, recbole_ml100k_dir
from speeder_platform.data.prepare import prepare_config_from_args, prepare_dataset
from speeder_platform.data.stats import dataset_stats, format_stats


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ml100k"))
    start = time.perf_counter()
    report = prepare_dataset(prepare_config_from_args("movielens-100k", []), out)
    return out, report, time.perf_counter() - start


def test_ml100k_counts_after_5core(ml100k, assert_valid_dataset) -> None:
    out, report, seconds = ml100k
    # docs/benchmarks.md#reference-figures: 943 users, 1,349 items, 99,287 interactions; leave-one-out
    # leaves n - 3 train samples a user.
    assert (report.raw_users, report.raw_items, report.raw_interactions) == (943, 1682, 100_000)
    assert (report.users, report.items, report.interactions) == (943, 1349, 99_287)
    assert report.split_sizes == {"train": 99_287 - 3 * 943, "valid": 943, "test": 943}
    assert report.skipped == {} and report.images_missing == 1349
    assert seconds < 20, f"ML-100K took {seconds:.1f} s to prepare"
    tables = assert_valid_dataset(out)
    first = tables["items"].slice(0, 1).to_pylist()[0]
    assert first == {"item_id": 0, "source_id": "1", "title": "Toy Story (1995)",
                     "text": "Toy Story (1995). Genres: Animation, Children's, Comedy", "image_uri": None}


def test_ml100k_stats_output(ml100k) -> None:
    out, _, _ = ml100k
    stats = dataset_stats(out)
    assert stats["users"] == 943 and stats["items"] == 1349 and stats["interactions"] == 99_287
    assert stats["density"] == pytest.approx(99_287 / (943 * 1349))
    assert stats["interactions_per_user"]["max"] == 648 and stats["interactions_per_user"]["p10"] >= 5
    assert stats["splits"]["test"]["history"]["max"] == 20
    text = format_stats(stats)
    for figure in ("943", "1,349", "99,287", "96,458", "7.805%", "movielens-100k"):
        assert figure in text, figure


def write_grouplens_copy(folder) -> None:
    """u.data / u.item (latin-1, 19 genre flags) written from recbole's copy of the same data."""
    src = recbole_ml100k_dir()
    inter = open(os.path.join(src, "ml-100k.inter"), encoding="utf-8").read().splitlines()[1:]
    (folder / "u.data").write_text("\n".join(inter) + "\n")
    lines = []
    for line in open(os.path.join(src, "ml-100k.item"), encoding="utf-8").read().splitlines()[1:]:
        movie, name, year, genres = line.split("\t")
        title = f"{name} ({year})" if year.isdigit() else name
        flags = "|".join("1" if g in genres.split() else "0" for g in GENRES)
        lines.append(f"{movie}|{title}|01-Jan-{year}||http://imdb.example/{movie}|{flags}")
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))


def test_grouplens_raw_folder_gives_the_same_dataset(ml100k, tmp_path) -> None:
    raw = tmp_path / "ml-100k"
    raw.mkdir()
    write_grouplens_copy(raw)
    out = str(tmp_path / "out")
    report = prepare_dataset(prepare_config_from_args("movielens-100k", [], raw=str(raw)), out)
    assert (report.users, report.items, report.interactions) == (943, 1349, 99_287)
    reference, _, _ = ml100k
    for name in [ITEMS_FILE, INTERACTIONS_FILE] + [f"{SPLITS_DIR}/{s}.parquet" for s in SPLITS]:
        mine = storage.read_bytes(os.path.join(out, name))
        theirs = storage.read_bytes(os.path.join(reference, name))
        assert mine == theirs, name


def test_grouplens_malformed_lines_are_counted(tmp_path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [f"{u}\t{(u + j) % 8 + 1}\t4\t{1000 + 10 * u + j}" for u in range(1, 7) for j in range(6)]
    rows[3] = "1\t4\tfour\t1003"  # wrong type
    rows.insert(5, "garbage line")  # field count
    (raw / "u.data").write_text("\n".join(rows) + "\n")
    flags = "|".join(["0"] * len(GENRES))
    items = [f"{i}|Caf\xe9 {i} (1995)|01-Jan-1995||http://x|{flags}" for i in range(1, 9)]
    items.append("9|broken")
    (raw / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    out = str(tmp_path / "out")
    report = prepare_dataset(prepare_config_from_args("movielens-100k", [], raw=str(raw), kcore=3,
                                                      num_candidates=2), out)
    assert report.skipped == {"interactions:field_count": 1, "interactions:wrong_type": 1,
                              "items:field_count": 1}
    assert report.raw_interactions == 35
    titles = storage.read_table(os.path.join(out, ITEMS_FILE)).column("title").to_pylist()
    assert titles[0] == "Café 1 (1995)"  # decoded as latin-1
    with pytest.raises(FileNotFoundError, match="u.data"):
        prepare_dataset(prepare_config_from_args("movielens-100k", [], raw=str(tmp_path / "nothing")), out)

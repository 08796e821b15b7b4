"""Amazon Reviews 2018 and 2023 importers on small realistic fixtures, malformed lines included."""

import gzip
import json
import os

import numpy as np
import pytest

from speeder.schema import IMAGE_URI, INTERACTIONS_FILE, SOURCE_ID, TEXT, TIMESTAMP, TITLE
from speeder_platform import storage
from speeder_platform.data.amazon import MAX_TEXT_CHARS
from speeder_platform.data.prepare import prepare_config_from_args, prepare_dataset

NUM_USERS = NUM_ITEMS = 12
PER_USER = 7  # user u reviews items u, u+1, ..., u+6 (mod 12): every item has 7 reviews
PNG = b"\x89PNG\r\n\x1a\n fake image bytes"


def asin(n: int) -> str:
    return f"B{n:09d}"


def user(n: int) -> str:
    return f"A{n:03d}QX7RZ2K"


def write_lines(path, lines: list[str]) -> None:
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if str(path).endswith(".gz") else data)


def core_reviews(fields: tuple[str, str, str, str], time_scale: int) -> list[dict]:
    u_key, i_key, t_key, r_key = fields
    return [{u_key: user(u), i_key: asin((u + j) % NUM_ITEMS),
             t_key: (1_300_000_000 + 1000 * u + 10 * j) * time_scale,
             r_key: float(1 + (u + j) % 5), "summary": "Works well"}
            for u in range(NUM_USERS) for j in range(PER_USER)]


def amazon2018(folder, images: bool = True) -> None:
    """12 users x 7 reviews in the 5-core, plus records the importer or the k-core must drop."""
    keys = ("reviewerID", "asin", "unixReviewTime", "overall")
    reviews = core_reviews(keys, 1)
    reviews += [{"reviewerID": "ALONE", "asin": asin(i), "unixReviewTime": 1_400_000_000 + i, "overall": 5.0}
                for i in range(2)]  # only 2 reviews: removed by the 5-core
    reviews += [{"reviewerID": user(u), "asin": "BNOMETA000", "unixReviewTime": 1_200_000_000 + u}
                for u in range(6)]  # no meta record
    reviews += [{"reviewerID": user(u), "asin": "BNOTITLE00", "unixReviewTime": 1_200_000_000 + u}
                for u in range(6)]  # a meta record without a title
    lines = [json.dumps(r) for r in reviews]
    lines.insert(5, lines[4])  # an exact duplicate
    lines[10:10] = [
        '{"reviewerID": "A1", "asin": ',  # bad JSON
        '["a", "list"]',  # wrong type
        json.dumps({"reviewerID": "A1", "asin": asin(1)}),  # missing unixReviewTime
        json.dumps({"reviewerID": "A1", "asin": asin(1), "unixReviewTime": "yesterday"}),  # wrong type
        json.dumps({"reviewerID": "A1", "asin": asin(1), "unixReviewTime": 1, "overall": "5"}),  # wrong type
        "",  # blank lines are not malformed
    ]
    write_lines(folder / "Beauty_reviews.json", lines)

    meta = []
    for i in range(NUM_ITEMS):
        rec = {"asin": asin(i), "title": f"Brush {i}", "description": [f"A soft brush, model {i}."],
               "imageURLHighRes": [f"https://images.example/{i}_hi.jpg"], "imageURL": [f"https://x/{i}.jpg"]}
        if i == 0:
            rec.update(title="Shampoo &amp; Conditioner <b>Set</b>", feature=["Gentle", " vegan\n"],
                       description="<p>For   all hair</p> types.")
        if i == 1:
            rec["description"] = ["word " * 1000]
        if i == NUM_ITEMS - 1:
            del rec["imageURLHighRes"], rec["imageURL"]
        meta.append(json.dumps(rec))
    meta.append(json.dumps({"asin": asin(3), "title": "A second record for the same item"}))  # duplicate
    meta.append(json.dumps({"asin": "BNOTITLE00", "description": ["no title"]}))  # missing title
    meta.append(json.dumps({"asin": "BUNREVIEWED", "title": "Nobody reviewed me"}))  # not needed
    meta.append("{bad json")
    write_lines(folder / "meta_Beauty.json.gz", meta)
    if images:
        img = folder / "img"
        img.mkdir()
        (img / f"{asin(0)}.jpg").write_bytes(PNG + b"0")
        (img / f"{asin(1)}.PNG").write_bytes(PNG + b"1")
        (img / f"{asin(2)}.png").write_bytes(PNG + b"2png")
        (img / f"{asin(2)}.jpeg").write_bytes(PNG + b"2jpeg")  # .jpeg is preferred over .png
        (img / "notes.txt").write_text("not an image")


def test_amazon2018_fixture(tmp_path, assert_valid_dataset) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    amazon2018(raw)
    out = str(tmp_path / "out")
    cfg = prepare_config_from_args("amazon2018", [], raw=str(raw), images=str(raw / "img"), num_candidates=5)
    report = prepare_dataset(cfg, out)
    assert report.skipped == {"meta:bad_json": 1, "meta:duplicate": 1, "meta:missing_title": 1,
                              "reviews:bad_json": 1, "reviews:missing_field": 1, "reviews:wrong_type": 3}
    assert report.raw_interactions == 12 * 7 + 2 + 6 + 6 + 1
    assert report.dropped_without_metadata == 12 and report.dropped_duplicates == 1
    assert (report.users, report.items, report.interactions) == (12, 12, 84)
    assert report.split_sizes == {"train": 12 * 4, "valid": 12, "test": 12}
    assert (report.images_found, report.images_remote, report.images_missing) == (3, 8, 1)
    tables = assert_valid_dataset(out, num_candidates=5)

    items = tables["items"].to_pylist()
    assert [r[SOURCE_ID] for r in items] == [asin(i) for i in range(12)]
    assert items[0][TITLE] == "Shampoo & Conditioner Set"
    assert items[0][TEXT] == "Shampoo & Conditioner Set. Gentle vegan For all hair types."
    assert len(items[1][TEXT]) <= MAX_TEXT_CHARS and items[1][TEXT].startswith("Brush 1. word word")
    assert [r[IMAGE_URI] for r in items[:3]] == ["images/0.jpg", "images/1.png", "images/2.jpeg"]
    assert storage.read_bytes(os.path.join(out, "images", "2.jpeg")) == PNG + b"2jpeg"
    assert items[3][IMAGE_URI] == "https://images.example/3_hi.jpg"
    assert items[11][IMAGE_URI] is None
    assert tables["interactions"].column("rating").to_pylist()[0] in (1.0, 2.0, 3.0, 4.0, 5.0)


def amazon2023(folder, reviews_name: str = "All_Beauty.jsonl.gz", filler: int = 0) -> list[str]:
    keys = ("user_id", "parent_asin", "timestamp", "rating")
    reviews = core_reviews(keys, 1000)
    for r in reviews:
        r["asin"] = r["parent_asin"] + "-variant"  # reviews name a variant; items are parent ASINs
    rng = np.random.default_rng(0)
    reviews += [{"user_id": f"F{rng.integers(1 << 60):x}", "parent_asin": f"BF{rng.integers(1 << 40):x}",
                 "timestamp": int(rng.integers(1 << 40)), "rating": 3.0} for _ in range(filler)]
    lines = [json.dumps(r) for r in reviews]
    lines.insert(3, json.dumps({"user_id": user(0), "parent_asin": asin(0), "timestamp": 1.5e12 + 0.5}))
    write_lines(folder / reviews_name, lines)
    meta = []
    for i in range(NUM_ITEMS):
        rec = {"parent_asin": asin(i), "title": f"Serum {i}", "features": ["Light", "Unscented"],
               "description": [f"Daily serum number {i}."],
               "images": [{"thumb": f"https://m.example/{i}_t.jpg", "large": f"https://m.example/{i}_l.jpg",
                           "hi_res": None, "variant": "MAIN"}]}
        if i == 1:  # some exports hold a dict of lists
            rec["images"] = {"hi_res": [None], "large": ["https://m.example/1_dict.jpg"], "variant": ["MAIN"]}
        meta.append(json.dumps(rec))
    write_lines(folder / "meta_All_Beauty.jsonl", meta)
    return lines


def test_amazon2023_fixture(tmp_path, assert_valid_dataset) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    amazon2023(raw)
    out = str(tmp_path / "out")
    report = prepare_dataset(prepare_config_from_args("amazon2023", [], raw=str(raw), num_candidates=5), out)
    assert report.skipped == {"reviews:wrong_type": 1}  # a timestamp that is not a whole number
    assert (report.users, report.items, report.interactions) == (12, 12, 84)
    assert (report.images_found, report.images_remote, report.images_missing) == (0, 12, 0)
    tables = assert_valid_dataset(out, num_candidates=5)
    items = tables["items"].to_pylist()
    assert items[0][TEXT] == "Serum 0. Light Unscented Daily serum number 0."
    assert items[0][IMAGE_URI] == "https://m.example/0_l.jpg"
    assert items[1][IMAGE_URI] == "https://m.example/1_dict.jpg"
    timestamps = storage.read_table(os.path.join(out, INTERACTIONS_FILE)).column(TIMESTAMP).to_numpy()
    assert timestamps.min() >= 1_300_000_000 and timestamps.max() < 1_400_000_000  # milliseconds -> seconds


def test_truncated_gzip_keeps_the_lines_before_the_cut(tmp_path, assert_valid_dataset) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = amazon2023(raw, filler=400)
    path = raw / "All_Beauty.jsonl.gz"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.8)])  # a download cut short
    report = prepare_dataset(prepare_config_from_args("amazon2023", [], raw=str(raw), num_candidates=5),
                             str(tmp_path / "out"))
    assert report.skipped.get("reviews:truncated_gzip") == 1
    valid = len(lines) - 1
    assert 12 * 7 < report.raw_interactions < valid  # the core came before the cut, some filler after it
    assert (report.users, report.items, report.interactions) == (12, 12, 84)
    assert_valid_dataset(str(tmp_path / "out"), num_candidates=5)
    # A .gz that is not gzip at all is counted the same way, not a crash.
    path.write_bytes(b"plain text, not gzip\n")
    with pytest.raises(ValueError, match=r"no valid amazon2023 reviews \(truncated_gzip: 1\)"):
        prepare_dataset(prepare_config_from_args("amazon2023", [], raw=str(raw)), str(tmp_path / "out2"))


def test_folder_rules_and_format_mismatch(tmp_path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    amazon2023(raw)
    (raw / "Other_reviews.json").write_text("{}\n")
    with pytest.raises(ValueError, match=r"raw: expected exactly one reviews file .*All_Beauty.*Other"):
        prepare_dataset(prepare_config_from_args("amazon2023", [], raw=str(raw)), str(tmp_path / "out"))
    os.remove(raw / "Other_reviews.json")
    # 2023 files read as 2018: every line lacks reviewerID; the message says which fields were expected.
    with pytest.raises(ValueError, match=r"no valid amazon2018 reviews \(missing_field: 85\).*reviewerID"):
        prepare_dataset(prepare_config_from_args("amazon2018", [], raw=str(raw)), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="needs --raw"):
        prepare_dataset(prepare_config_from_args("amazon2018", []), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        prepare_dataset(prepare_config_from_args("amazon2018", [], raw=str(tmp_path / "no")), str(tmp_path))

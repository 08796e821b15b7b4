"""Fault scenarios for bulk data: a hostile Amazon export through `prepare`, bad images through `featurize`,
and features that no longer belong to the model: a corrupt table, a catalog featurized again after training.

Each builds its input in the workspace, runs the real job, and checks that every fault was counted in
the job's report, that the job finished, that its outputs are valid, and that no good record was lost;
the features scenarios check that scoring and serving refuse, in one line, what they must not read.
"""

from __future__ import annotations

import gzip
import json
import os
import time
import unicodedata
from typing import Any

import numpy as np
import pyarrow as pa

from speeder import schema
from speeder_platform import storage
from speeder_platform.bench.faults.env import Workspace, outcome
from speeder_platform.data.amazon import MAX_TEXT_CHARS, MAX_TITLE_CHARS, has_unsafe_text

CORE_USERS = CORE_ITEMS = 12
PER_USER = 7  # user u reviews items u .. u+6 (mod 12): a 5-core of 84 interactions
FILLER = 400  # one-review users after the core: the part a .gz cut short loses (k-core drops them anyway)
ODD_TITLE = "Serum \u202e\u0000 zero\u200bwidth \ufeff😀 cre\u0301me &#x202d;"  # bidi, NUL, ZWSP, BOM, emoji
HUGE_TITLE = "Huge title word " * 70_000  # ~1 MB
HUGE_TEXT = "description " * 450_000  # ~5 MB
MARKUP_BOMB = "<a" * 100_000  # 200 KB of '<' and no '>': quadratic for a naive tag pattern


def _asin(i: int) -> str:
    return f"B{i:09d}"


def _review(user: str, item: str, t: int) -> str:
    return json.dumps({"user_id": user, "parent_asin": item, "timestamp": t * 1000, "rating": 4.0})


def _reviews(rng: np.random.Generator) -> tuple[list[bytes], dict[str, int]]:
    """Review lines (core, faults, then filler) and the counts the import must report."""
    core = [_review(f"A{u:03d}", _asin((u + j) % CORE_ITEMS), 1_300_000_000 + 1000 * u + j)
            for u in range(CORE_USERS) for j in range(PER_USER)]
    faults = [core[5], core[17], core[40]]  # exact duplicates
    faults += [_review(f"A{u:03d}", "BUNKNOWN01", 1_200_000_000 + u) for u in range(4)]  # item without meta
    faults += [_review(f"A{u:03d}", "BNOTITLE00", 1_200_000_000 + u) for u in range(3)]  # meta without title
    faults += ['{"user_id": "A001", "parent_asin": ',  # bad JSON
               json.dumps({"user_id": "A001", "parent_asin": _asin(1)}),  # missing timestamp
               json.dumps({"user_id": "A001", "parent_asin": _asin(1), "timestamp": "yesterday"}),  # wrong type
               '{"user_id": "A\\ud800X", "parent_asin": "B000000001", "timestamp": 1}']  # lone surrogate id
    filler = [_review(f"F{rng.integers(1 << 62):x}", _asin(int(rng.integers(CORE_ITEMS))), int(rng.integers(1 << 30)))
              for _ in range(FILLER)]
    lines = [line.encode() for line in core + faults] + [b'{"user_id": "\xff\xfe"}']  # invalid UTF-8
    expected = {"reviews:bad_json": 2, "reviews:missing_field": 1, "reviews:wrong_type": 1,
                "reviews:bad_unicode": 1, "reviews:truncated_gzip": 1}
    return lines + [line.encode() for line in filler], expected


def _meta() -> tuple[list[str], dict[str, int], dict[str, int]]:
    """Meta lines, the skip counts and the repair counts the import must report."""
    recs: list[dict[str, Any]] = [{"parent_asin": _asin(i), "title": f"Item {i}", "description": [f"Thing {i}."]}
                                  for i in range(CORE_ITEMS)]
    recs[0].update(title=ODD_TITLE, description=["lone \ud83d surrogate", "ok"])
    recs[1].update(title=HUGE_TITLE, description=[HUGE_TEXT])
    recs[2]["description"] = [MARKUP_BOMB]
    recs += [{"parent_asin": _asin(3), "title": "A second record"}, {"parent_asin": "BNOTITLE00"}]
    lines = [json.dumps(r) for r in recs] + ["{not json"]
    skipped = {"meta:duplicate": 1, "meta:missing_title": 1, "meta:bad_json": 1}
    repaired = {"meta:unicode_repaired": 1, "meta:title_truncated": 1, "meta:text_truncated": 2}
    return lines, skipped, repaired


def write_hostile_amazon(folder: str) -> dict[str, Any]:
    """An Amazon 2023 folder full of faults; returns what the import must report."""
    os.makedirs(folder, exist_ok=True)
    reviews, skipped = _reviews(np.random.default_rng(0))
    data = gzip.compress(b"\n".join(reviews) + b"\n", mtime=0)
    core_end = len(gzip.compress(b"\n".join(reviews[:-FILLER]), mtime=0))
    cut = max(core_end + 64, int(len(data) * 0.9))  # a download cut short, inside the filler
    with open(os.path.join(folder, "Beauty.jsonl.gz"), "wb") as f:
        f.write(data[:cut])
    meta, meta_skipped, repaired = _meta()
    with open(os.path.join(folder, "meta_Beauty.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(meta) + "\n")
    return {"skipped": {**skipped, **meta_skipped}, "repaired": repaired, "dropped_duplicates": 3,
            "dropped_without_metadata": 7, "kept": (CORE_USERS, CORE_ITEMS, CORE_USERS * PER_USER)}


def check_prepared(out: str) -> list[str]:
    """Problems with a prepared dataset: schema, id ranges, text limits, unsafe text (empty: valid)."""
    from speeder_platform.data import protocol

    problems = []
    items = storage.read_table(storage.join(out, schema.ITEMS_FILE))
    inter = storage.read_table(storage.join(out, schema.INTERACTIONS_FILE))
    n = items.num_rows
    if not items.schema.equals(protocol.ITEMS_SCHEMA) or not inter.schema.equals(protocol.INTERACTIONS_SCHEMA):
        problems.append("schema")
    if items.column(schema.ITEM_ID).to_pylist() != list(range(n)):
        problems.append("item ids not 0..N-1")
    for split in schema.SPLITS:
        table = storage.read_table(storage.join(out, schema.SPLITS_DIR, f"{split}.parquet"))
        ids = [table.column(c).combine_chunks() for c in (schema.HISTORY, schema.CANDIDATES)]
        ids = np.concatenate([a.values.to_numpy() for a in ids] + [table.column(schema.TARGET).to_numpy()])
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            problems.append(f"{split}: item id out of range")
    for title, text in zip(items.column(schema.TITLE).to_pylist(), items.column(schema.TEXT).to_pylist(),
                           strict=True):
        if len(title) > MAX_TITLE_CHARS or len(text) > MAX_TEXT_CHARS:
            problems.append(f"over-long text kept: {title[:40]!r}")
        if has_unsafe_text(title) or has_unsafe_text(text) or unicodedata.normalize("NFC", title) != title:
            problems.append(f"unsafe or unnormalised text kept: {title[:40]!r}")
    return problems


def data_import(ws: Workspace) -> dict[str, Any]:
    """Prepare an Amazon 2023 export with malformed, duplicate, unknown, odd-Unicode and huge records."""
    from speeder_platform.data.prepare import prepare_config_from_args, prepare_dataset

    started = time.perf_counter()
    raw, out = ws.path("amazon-raw"), ws.path("amazon-data")
    expected = write_hostile_amazon(raw)
    report = prepare_dataset(prepare_config_from_args("amazon2023", [], raw=raw, num_candidates=5), out)
    kept = (report.users, report.items, report.interactions)
    counted = {"skipped": report.skipped == expected["skipped"], "repaired": report.repaired == expected["repaired"],
               "duplicates": report.dropped_duplicates == expected["dropped_duplicates"],
               "unknown": report.dropped_without_metadata == expected["dropped_without_metadata"]}
    problems = check_prepared(out)
    observed = (f"prepare finished in {report.seconds:.1f}s; skipped {sum(report.skipped.values())} lines "
                f"({', '.join(f'{k} {v}' for k, v in report.skipped.items())}); repaired and kept "
                f"{', '.join(f'{k} {v}' for k, v in report.repaired.items())}; dropped "
                f"{report.dropped_duplicates} duplicates and {report.dropped_without_metadata} interactions on "
                f"unknown/untitled items; kept {kept[2]} of {expected['kept'][2]} valid interactions; "
                f"outputs {'valid' if not problems else 'INVALID: ' + '; '.join(problems[:3])}")
    return outcome("data-import", "Amazon 2023 export: bad JSON, invalid UTF-8, missing fields, wrong types, a "
                   "lone-surrogate id, 3 duplicate interactions, 4 reviews of an unknown item, a meta record "
                   "without title, a duplicate meta record, odd Unicode (NUL, bidi override, BOM, ZWSP, lone "
                   "surrogate), a 1 MB title, a 5 MB description, 200 KB of '<', a .gz cut short",
                   observed, data_lost=kept != expected["kept"], passed=all(counted.values()) and not problems,
                   started=started, counted=counted, problems=problems, skipped=report.skipped,
                   repaired=report.repaired, kept=kept)


# -- featurize ----------------------------------------------------------------------------------------
BAD_IMAGES = {0: "images/corrupt.png", 1: "images/truncated.png", 2: "images/text.png", 3: "images/missing.png",
              4: "../../etc/passwd", 5: "/etc/passwd", 6: "file:///etc/passwd", 7: "images/passwd.png",
              8: "https://example.com/8.png", 9: None, 10: "images/"}
BAD_STATUS = {"corrupt": 3, "missing": 2, "refused_path": 4, "remote_not_fetched": 1, "no_image": 1}


def write_bad_images(data: str) -> None:
    """Corrupt, truncated and non-image files, a link out of the dataset, and escaping image_uri values."""
    images = os.path.join(data, schema.IMAGES_DIR)
    good = open(os.path.join(images, sorted(os.listdir(images))[0]), "rb").read()
    with open(os.path.join(images, "corrupt.png"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(300))
    with open(os.path.join(images, "truncated.png"), "wb") as f:
        f.write(good[: len(good) // 2])
    with open(os.path.join(images, "text.png"), "w") as f:
        f.write("not an image\n")
    os.symlink("/etc/passwd", os.path.join(images, "passwd.png"))
    set_image_uris(data, BAD_IMAGES)


def set_image_uris(data: str, uris: dict[int, str | None]) -> None:
    """Rewrite items.parquet with these image_uri values (item id -> value)."""
    items_uri = storage.join(data, schema.ITEMS_FILE)
    items = storage.read_table(items_uri)
    column = items.column(schema.IMAGE_URI).to_pylist()
    for item, uri in uris.items():
        column[item] = uri
    index = items.column_names.index(schema.IMAGE_URI)
    storage.write_table(items.set_column(index, items.field(index), pa.array(column, pa.string())), items_uri)


def featurize_bad_images(ws: Workspace) -> dict[str, Any]:
    """Featurize a catalog whose images are corrupt, truncated, not images, missing or outside the dataset.

    Its output becomes the workspace's dataset when there is none yet (a catalog with bad images is
    what the later scenarios should run on anyway).
    """
    from speeder_platform.data.prepare import prepare_dataset
    from speeder_platform.featurize.pipeline import run_featurize
    from speeder_platform.tables import features_uri

    started = time.perf_counter()
    cfg = ws.config(f"data.uri={ws.path('data')}")
    prepare_dataset(cfg.prepare, cfg.data.uri)
    write_bad_images(cfg.data.uri)
    report = run_featurize(cfg)
    n = storage.read_table(storage.join(cfg.data.uri, schema.ITEMS_FILE)).num_rows
    table = storage.read_table(features_uri(cfg.data.uri, cfg.featurize.name)).to_pydict()
    image_ok = [v is not None for v in table[schema.IMAGE_EMB]]
    expected = {**BAD_STATUS, "ok": n - len(BAD_IMAGES)}
    statuses = {k: v for k, v in report.image_status.items() if v}
    lost = (len(image_ok) != n or not all(v is not None for v in table[schema.TEXT_EMB])
            or image_ok != [i not in BAD_IMAGES for i in range(n)])
    ws.adopt("dataset", cfg.data.uri)
    observed = (f"featurize finished: {n} of {n} items have features; image status "
                f"{', '.join(f'{k} {v}' for k, v in statuses.items())}; every readable image encoded, every bad "
                f"one a null image_emb; /etc/passwd never read")
    return outcome("featurize-bad-images", "11 bad images in an 80-item catalog: random bytes, a truncated PNG, a "
                   "text file, a missing file, a folder, a symlink to /etc/passwd, image_uri ../../etc/passwd, "
                   "/etc/passwd, file:///etc/passwd, an http URL, none", observed, data_lost=lost,
                   passed=statuses == expected, started=started, image_status=statuses, expected=expected)


# -- features and the checkpoints trained on them ---------------------------------------------------
def _refusals(ws: Workspace, cfg: Any, data: str) -> dict[str, str | None]:
    """Each consumer of features -> its one-line refusal, or None when it went ahead."""
    from speeder_platform.lineage import FeaturesError
    from speeder_platform.score import run_score
    from speeder_platform.trained import load_trained

    found: dict[str, str | None] = {}
    for consumer, call in {"scoring": lambda: run_score(cfg),
                           "serving and evaluation (load_trained)": lambda: load_trained(ws.checkpoint, data)}.items():
        try:
            call()
            found[consumer] = None
        except FeaturesError as err:
            found[consumer] = str(err)
    return found


def _scored_copy(ws: Workspace, name: str) -> tuple[Any, str, pa.Table]:
    """A copy of the workspace's dataset and features, a config scoring it with the workspace's checkpoint,
    and the partition that scoring commits while the features are still the ones trained on."""
    import shutil

    from speeder_platform.bench.faults.score import DATE
    from speeder_platform.score import read_scores, run_score

    data = ws.path(f"data-{name}")
    shutil.copytree(ws.dataset, data, symlinks=True)
    cfg = ws.config(f"data.uri={data}", f"score.checkpoint={ws.checkpoint}", f"score.out={ws.path(f'scores-{name}')}",
                    f"score.date={DATE}", "score.num_actors=1")
    run_score(cfg)
    return cfg, data, read_scores(cfg.score.out, DATE)


def _judged(refusals: dict[str, str | None], *fingerprints: str) -> tuple[bool, str]:
    """(every consumer refused in one line naming the fingerprints, how they refused)."""
    ok = all(r is not None and "\n" not in r and all(f in r for f in fingerprints) for r in refusals.values())
    text = "; ".join(f"{c} {'REFUSED: ' + r if r else 'WENT AHEAD'}" for c, r in refusals.items())
    return ok, text


def features_corrupt(ws: Workspace) -> dict[str, Any]:
    """Rot one byte in the middle of a committed features table (a disk error, a bad copy): scoring and
    serving must refuse it, featurize must make it again rather than call it up to date, yesterday's
    scores must stay."""
    from speeder_platform.bench.faults.score import DATE
    from speeder_platform.featurize.pipeline import run_featurize
    from speeder_platform.score import read_scores, run_score
    from speeder_platform.tables import features_uri

    started = time.perf_counter()
    cfg, data, before = _scored_copy(ws, "corrupt")
    uri = features_uri(data, cfg.featurize.name)
    raw = bytearray(open(uri, "rb").read())
    raw[len(raw) // 2] ^= 0xFF  # inside the data pages: the footer stays valid, pyarrow alone would not notice
    with open(uri, "wb") as f:
        f.write(raw)
    refused, how = _judged(_refusals(ws, cfg, data), "featurize --force")
    kept = read_scores(cfg.score.out, DATE).equals(before)
    again = run_featurize(cfg)
    after = run_score(cfg)
    observed = (f"{how}; yesterday's partition {'kept' if kept else 'CHANGED'}; featurize again: {again.mode} "
                f"({again.encoded} items encoded); scoring afterwards: {after.users_scored} users")
    return outcome("features-corrupt", "one byte flipped in the middle of a committed features table (its parquet "
                   "footer still valid)", observed, data_lost=not kept,
                   passed=refused and again.mode == "full" and after.users_scored > 0, started=started)


def features_checkpoint_mismatch(ws: Workspace) -> dict[str, Any]:
    """Featurize a refreshed catalog (same items, texts moved around: same ids, same dims) after the model
    was trained: the model must refuse the new features, naming both fingerprints."""
    from speeder_platform.bench.faults.score import DATE
    from speeder_platform.featurize.pipeline import run_featurize
    from speeder_platform.lineage import committed_features
    from speeder_platform.score import read_scores

    started = time.perf_counter()
    cfg, data, before = _scored_copy(ws, "refreshed")
    trained_on = (storage.read_json(storage.join(ws.checkpoint, "meta.json")).get("features") or {}).get("fingerprint")
    items_uri = storage.join(data, schema.ITEMS_FILE)
    items = storage.read_table(items_uri)
    for column in (schema.TITLE, schema.TEXT):  # item i now reads as item N-1-i: the ids name other items
        index = items.column_names.index(column)
        reversed_values = pa.array(items.column(column).to_pylist()[::-1], items.field(index).type)
        items = items.set_column(index, items.field(index), reversed_values)
    storage.write_table(items, items_uri)
    report = run_featurize(cfg)
    now = committed_features(data, cfg.featurize.name).fingerprint
    refused, how = _judged(_refusals(ws, cfg, data), str(trained_on), str(now))
    kept = read_scores(cfg.score.out, DATE).equals(before)
    observed = (f"featurize ran ({report.mode}, dims {report.dims}): features {now} instead of {trained_on}; {how}; "
                f"yesterday's partition {'kept' if kept else 'CHANGED'}")
    return outcome("features-checkpoint-mismatch", "the catalog refreshed and featurized again after training (titles "
                   "and texts moved between items: same ids, same dims), then scored and served with the old model",
                   observed, data_lost=not kept, passed=refused and trained_on is not None and now != trained_on,
                   started=started, trained_on=trained_on, features=now)

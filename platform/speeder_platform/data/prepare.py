"""`speeder data prepare`: import a source, apply the protocol, write the canonical layout (docs/data.md#layout).

    speeder data prepare movielens-100k --out runs/ml100k/data
    speeder data prepare synthetic --out s3://bucket/syn synthetic.num_users=500

Every file goes through `speeder_platform.storage`, so `out` may be a local folder or s3://.
Files are written images first and meta.json last: a dataset with a meta.json is complete.
Preparing the same input twice gives byte-identical parquet files and meta.json (which holds no
times or durations; those are in the returned report and the log).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from speeder.schema import (
    FEATURES_DIR,
    IMAGES_DIR,
    INTERACTIONS_FILE,
    ITEMS_FILE,
    META_FILE,
    SPLITS,
    SPLITS_DIR,
)
from speeder_platform import storage
from speeder_platform.config import PrepareConfig, load_config
from speeder_platform.data import protocol
from speeder_platform.data.amazon import FORMATS, load_amazon
from speeder_platform.data.movielens import load_movielens
from speeder_platform.data.raw import RawDataset, RawItem
from speeder_platform.data.synthetic import load_synthetic

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
SOURCE_OPTIONS = {"movielens-100k": ("raw",), "amazon2018": ("raw", "images"), "amazon2023": ("raw", "images"),
                  "synthetic": ()}
IMAGE_WRITERS = 8  # concurrent image uploads (object stores reward parallel PUTs)
PROTOCOL_NOTES = {
    "ids": "dense, in source-id order (numeric when every id is an integer, else by string)",
    "order": "chronological per user, ties in source record order",
    "duplicates": "records repeating (user, item, timestamp) dropped; repeats at other times kept",
    "split": "leave-one-out: last -> test, second-to-last -> valid, earlier positions >= 1 -> train",
    "candidates": "target + negatives the user never interacted with; default_rng([seed, split, user])",
    "timestamp_unit": "seconds",
}


@dataclass
class PrepareReport:
    """What `prepare_dataset` did: counts at each step, skipped lines, images, time taken."""

    source: str
    out_uri: str
    kcore: int
    raw_users: int = 0  # distinct, in the valid records
    raw_items: int = 0
    raw_interactions: int = 0  # valid records (malformed lines are in `skipped`)
    dropped_without_metadata: int = 0  # interactions on items with no usable catalog record
    dropped_duplicates: int = 0  # repeats of the same (user, item, timestamp)
    kcore_passes: int = 0
    users: int = 0
    items: int = 0
    interactions: int = 0
    split_sizes: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # "<file>:<reason>" -> lines
    repaired: dict[str, int] = field(default_factory=dict)  # "<file>:<reason>" -> lines kept after cleaning
    images_found: int = 0  # image files written under images/
    images_remote: int = 0  # absolute URLs kept as image_uri (not fetched)
    images_missing: int = 0  # items without any image
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The counts, without the output location and the duration (meta.json must be reproducible)."""
        out = dataclasses.asdict(self)
        del out["seconds"], out["out_uri"]
        return out

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        lines = [
            f"{self.source} -> {self.out_uri} in {self.seconds:.1f} s",
            f"raw: {self.raw_users:,} users, {self.raw_items:,} items, {self.raw_interactions:,} interactions"
            f" ({skipped:,} malformed lines skipped, {self.dropped_without_metadata:,} interactions on items"
            f" without metadata and {self.dropped_duplicates:,} duplicates dropped)",
            f"{self.kcore}-core ({self.kcore_passes} filtering pass{'' if self.kcore_passes == 1 else 'es'}):"
            f" {self.users:,} users, {self.items:,} items,"
            f" {self.interactions:,} interactions",
            "splits: " + ", ".join(f"{s} {n:,}" for s, n in self.split_sizes.items()),
            f"images: {self.images_found:,} files, {self.images_remote:,} remote URLs, "
            f"{self.images_missing:,} items without image",
        ]
        if self.skipped:
            lines.append("skipped lines: " + ", ".join(f"{k} {n:,}" for k, n in self.skipped.items()))
        if self.repaired:
            lines.append("repaired lines (kept): " + ", ".join(f"{k} {n:,}" for k, n in self.repaired.items()))
        return "\n".join(lines)


def prepare_config_from_args(source: str, overrides: list[str], *, raw: str | None = None,
                             images: str | None = None, kcore: int | None = None,
                             max_history: int | None = None, num_candidates: int | None = None,
                             seed: int | None = None) -> PrepareConfig:
    """A validated PrepareConfig: defaults, then the non-None options, then `overrides` (keys under
    `prepare.`, e.g. "synthetic.num_users=100"). Raises ConfigError naming the key."""
    options = {"source": source, "raw": raw, "images": images, "kcore": kcore, "max_history": max_history,
               "num_candidates": num_candidates, "seed": seed}
    # JSON values are YAML: paths stay strings even when they look like numbers or `null`.
    dotlist = [f"prepare.{key}={json.dumps(value)}" for key, value in options.items() if value is not None]
    dotlist += [item if item.startswith("prepare.") else f"prepare.{item}" for item in overrides]
    return load_config(None, dotlist).prepare


def load_raw(cfg: PrepareConfig) -> RawDataset:
    """Run the importer of `cfg.source`."""
    for name in ("raw", "images"):
        if getattr(cfg, name) is not None and name not in SOURCE_OPTIONS[cfg.source]:
            log.warning("prepare.%s is not used by %s; ignored", name, cfg.source)
    if cfg.source == "movielens-100k":
        return load_movielens(cfg.raw)
    if cfg.source in FORMATS:
        return load_amazon(cfg.source, cfg.raw, cfg.images)
    return load_synthetic(cfg.synthetic)


def _write_image(out_uri: str, item_id: int, item: RawItem) -> str | None:
    """Copy or render one image into <out>/images/; returns its relative image_uri, or None on failure."""
    assert item.image_loader is not None and item.image_ext
    name = f"{item_id}{item.image_ext}"
    try:
        storage.write_bytes(storage.join(out_uri, IMAGES_DIR, name), item.image_loader())
    except OSError as err:
        log.warning("item %d: image not written (%s); image_uri left empty", item_id, err)
        return None
    return f"{IMAGES_DIR}/{name}"  # relative to the dataset root, '/' on every filesystem


def write_images(out_uri: str, items: list[RawItem]) -> list[str | None]:
    """image_uri per item (item_id = list index): a relative path to a written file, a URL, or None."""
    if storage.exists(storage.join(out_uri, IMAGES_DIR)):
        storage.remove(storage.join(out_uri, IMAGES_DIR))  # files of an earlier run name other item ids
    uris: list[str | None] = [item.image_url for item in items]
    local = [i for i, item in enumerate(items) if item.image_loader is not None]
    with ThreadPoolExecutor(max_workers=IMAGE_WRITERS) as pool:
        written = pool.map(lambda i: _write_image(out_uri, i, items[i]), local)
        for i, uri in zip(local, written, strict=True):
            uris[i] = uri
    return uris


def filter_records(raw: RawDataset, kcore: int, report: PrepareReport
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Protocol steps 1-5 (see `protocol`): drop records of undescribed items and exact duplicates,
    k-core, renumber, sort. Returns (raw record index, user_id, item_id) per kept record in
    chronological order per user, and the source id of each item_id. Fills the report's counts."""
    users, user_ids = protocol.natural_codes(raw.user_ids)
    items, item_ids = protocol.natural_codes(raw.item_ids)
    report.raw_users, report.raw_items = len(user_ids), len(item_ids)
    described = np.fromiter((i in raw.catalog for i in item_ids), bool, len(item_ids))[items]
    duplicate = protocol.duplicate_mask(users, items, raw.timestamps)
    report.dropped_without_metadata = int((~described).sum())
    report.dropped_duplicates = int((described & duplicate).sum())
    kept = np.flatnonzero(described & ~duplicate)  # record indices, ascending = file order
    in_core, report.kcore_passes = protocol.kcore_mask(users[kept], items[kept], kcore)
    kept = kept[in_core]
    if not len(kept):
        raise ValueError(f"prepare.kcore: the {kcore}-core of {raw.source} is empty "
                         f"({report.raw_interactions} records before filtering); lower prepare.kcore")
    user, user_source = protocol.renumber(users[kept])
    item, item_source = protocol.renumber(items[kept])
    order = protocol.chronological_order(user, raw.timestamps[kept])
    report.users, report.items, report.interactions = len(user_source), len(item_source), len(kept)
    return kept[order], user[order], item[order], [item_ids[i] for i in item_source]


def prepare_dataset(cfg: PrepareConfig, out_uri: str) -> PrepareReport:
    """Import `cfg.source`, apply the protocol (see `protocol`) and write the dataset to `out_uri`."""
    start = time.perf_counter()
    raw = load_raw(cfg)
    report = PrepareReport(source=cfg.source, out_uri=out_uri, kcore=cfg.kcore,
                           skipped=dict(sorted(raw.skipped.items())), repaired=dict(sorted(raw.repaired.items())),
                           raw_interactions=len(raw.user_ids))
    record, user, item, source_ids = filter_records(raw, cfg.kcore, report)
    num_users, num_items = report.users, report.items

    samples = protocol.leave_one_out(user, item, cfg.max_history)
    indptr, seen = protocol.interacted_items(user, item, num_users, num_items)
    splits = {
        split: protocol.split_table(s, protocol.sample_candidates(
            s, indptr, seen, num_items, cfg.num_candidates, cfg.seed, SPLITS.index(split)))
        for split, s in samples.items()
    }
    report.split_sizes = {split: table.num_rows for split, table in splits.items()}

    catalog = [raw.catalog[s] for s in source_ids]
    image_uris = write_images(out_uri, catalog)
    report.images_found = sum(1 for u in image_uris if u is not None and u.startswith(f"{IMAGES_DIR}/"))
    report.images_missing = sum(1 for u in image_uris if u is None)
    report.images_remote = num_items - report.images_found - report.images_missing

    items_table = pa.Table.from_arrays([
        pa.array(np.arange(num_items), pa.int64()),
        pa.array(source_ids, pa.string()),
        pa.array([c.title for c in catalog], pa.string()),
        pa.array([c.text for c in catalog], pa.string()),
        pa.array(image_uris, pa.string()),
    ], schema=protocol.ITEMS_SCHEMA)
    ratings = raw.ratings[record]
    interactions = pa.Table.from_arrays([
        pa.array(user, pa.int64()),
        pa.array(item, pa.int64()),
        pa.array(raw.timestamps[record] // raw.timestamp_divisor, pa.int64()),
        pa.array(ratings, pa.float64(), mask=np.isnan(ratings)),
    ], schema=protocol.INTERACTIONS_SCHEMA)
    storage.write_table(items_table, storage.join(out_uri, ITEMS_FILE))
    storage.write_table(interactions, storage.join(out_uri, INTERACTIONS_FILE))
    for split, table in splits.items():
        storage.write_table(table, storage.join(out_uri, SPLITS_DIR, f"{split}.parquet"))
    if storage.exists(storage.join(out_uri, FEATURES_DIR)):
        log.warning("%s/%s predates this dataset: run featurize again", out_uri, FEATURES_DIR)

    meta: dict[str, Any] = {
        "layout_version": LAYOUT_VERSION,
        "source": cfg.source,
        "origin": raw.origin,
        "protocol": {"kcore": cfg.kcore, "max_history": cfg.max_history, "num_candidates": cfg.num_candidates,
                     "seed": cfg.seed, **PROTOCOL_NOTES},
        "counts": {"users": num_users, "items": num_items, "interactions": len(record),
                   **report.split_sizes, "images": report.images_found},
        "report": report.to_dict(),
        **raw.extra_meta,
    }
    if cfg.source == "synthetic":
        meta["synthetic"] = dataclasses.asdict(cfg.synthetic)
    storage.write_json(storage.join(out_uri, META_FILE), meta)
    report.seconds = time.perf_counter() - start
    log.debug("prepared %s: %d users, %d items, %d interactions, splits %s in %.1f s", cfg.source, num_users,
             num_items, len(record), report.split_sizes, report.seconds)
    return report

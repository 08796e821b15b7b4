"""`speeder data stats URI`: read a prepared dataset back and summarise it.

    speeder data stats runs/ml100k/data

Users, items, interactions, density, interactions per user, history lengths and sizes per split,
image coverage (items with an image_uri, and how many relative ones exist under the dataset).
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

import numpy as np
import pyarrow.compute as pc

from speeder.schema import (
    HISTORY,
    IMAGE_URI,
    INTERACTIONS_FILE,
    ITEM_ID,
    ITEMS_FILE,
    META_FILE,
    SPLITS,
    SPLITS_DIR,
    USER_ID,
)
from speeder_platform import storage

log = logging.getLogger(__name__)

PERCENTILES = (10, 50, 90)


def _distribution(values: np.ndarray) -> dict[str, int]:
    """p10/p50/p90 (nearest observed value at or below) and max; zeros for an empty array."""
    if not len(values):
        return {**{f"p{q}": 0 for q in PERCENTILES}, "max": 0}
    out = {f"p{q}": int(np.percentile(values, q, method="lower")) for q in PERCENTILES}
    out["max"] = int(values.max())
    return out


def _is_relative(uri: str) -> bool:
    return "://" not in uri and not uri.startswith("/")


def _image_coverage(uri: str, image_uris: list[str | None]) -> dict[str, int]:
    present = set()
    relative = [u for u in image_uris if u is not None and _is_relative(u)]
    safe = [u for u in relative if ".." not in u.split("/")]  # never look outside the dataset
    for folder in sorted({posixpath.dirname(u) for u in safe}):
        names = storage.listdir(storage.join(uri, *folder.split("/")) if folder else uri)
        present.update(posixpath.join(folder, n) if folder else n for n in names)
    with_uri = sum(1 for u in image_uris if u is not None)
    return {
        "with_uri": with_uri,
        "relative": len(relative),
        "relative_present": sum(1 for u in safe if posixpath.normpath(u) in present),
        "remote": with_uri - len(relative),
    }


def dataset_stats(uri: str) -> dict[str, Any]:
    """Figures of the dataset at `uri` (local or s3://) as a plain dict (see format_stats)."""
    items = storage.read_table(storage.join(uri, ITEMS_FILE), columns=[ITEM_ID, IMAGE_URI])
    interactions = storage.read_table(storage.join(uri, INTERACTIONS_FILE), columns=[USER_ID, ITEM_ID])
    users = interactions.column(USER_ID).to_numpy()
    per_user = np.bincount(users)[np.unique(users)] if len(users) else np.zeros(0, np.int64)
    num_users, num_items, num_interactions = len(per_user), items.num_rows, interactions.num_rows
    stats: dict[str, Any] = {
        "uri": uri,
        "source": None,
        "users": num_users,
        "items": num_items,
        "interactions": num_interactions,
        "density": num_interactions / (num_users * num_items) if num_users and num_items else 0.0,
        "interactions_per_user": _distribution(per_user),
        "splits": {},
        "images": _image_coverage(uri, items.column(IMAGE_URI).to_pylist()),
    }
    meta_uri = storage.join(uri, META_FILE)
    if storage.exists(meta_uri):
        meta = storage.read_json(meta_uri)
        stats["source"] = meta.get("source")
        stats["num_candidates"] = meta.get("protocol", {}).get("num_candidates")
    for split in SPLITS:
        split_uri = storage.join(uri, SPLITS_DIR, f"{split}.parquet")
        if not storage.exists(split_uri):
            continue
        table = storage.read_table(split_uri, columns=[USER_ID, HISTORY])
        lengths = pc.list_value_length(table.column(HISTORY)).to_numpy(zero_copy_only=False)
        stats["splits"][split] = {"samples": table.num_rows, "history": _distribution(lengths)}
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    """A plain, aligned text table of `dataset_stats` output."""
    per_user = stats["interactions_per_user"]
    images = stats["images"]
    items = stats["items"]
    share = f"{100 * images['with_uri'] / items:.1f}%" if items else "-"
    rows = [
        ("dataset", stats["uri"]),
        ("source", stats.get("source") or "-"),
        ("users", f"{stats['users']:,}"),
        ("items", f"{items:,}"),
        ("interactions", f"{stats['interactions']:,}"),
        ("density", f"{100 * stats['density']:.3f}%"),
        ("per user", "  ".join(f"{k} {v:,}" for k, v in per_user.items())),
        ("images", f"{images['with_uri']:,} / {items:,} items have an image_uri ({share}); "
                   f"{images['relative_present']:,} of {images['relative']:,} relative files present, "
                   f"{images['remote']:,} remote"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if stats["splits"]:
        header = ("split", "samples", "hist p10", "p50", "p90", "max")
        table = [header] + [
            (split, f"{s['samples']:,}", *(f"{v:,}" for v in s["history"].values()))
            for split, s in stats["splits"].items()
        ]
        widths = [max(len(row[c]) for row in table) for c in range(len(header))]
        lines.append("")
        for row in table:
            cells = [cell.ljust(w) if c == 0 else cell.rjust(w)
                     for c, (cell, w) in enumerate(zip(row, widths, strict=True))]
            lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)

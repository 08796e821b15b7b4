"""Reading the canonical dataset into the model's arrays: splits -> Samples, features -> ItemFeatures.

The features table (docs/data.md#layout) is `features/<set>/items.parquet` with one row per item id 0..N-1:
item_id int64, text_emb / image_emb / seq_emb list<float32> (null where the item lacks the modality).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from speeder import schema
from speeder.loop import Samples
from speeder.mrc import ItemFeatures
from speeder_platform import storage

log = logging.getLogger(__name__)

EMB_COLUMNS = {"text": schema.TEXT_EMB, "vision": schema.IMAGE_EMB, "sequence": schema.SEQ_EMB}


def split_uri(dataset: str, split: str) -> str:
    return storage.join(dataset, schema.SPLITS_DIR, f"{split}.parquet")


def features_folder(dataset: str, name: str) -> str:
    """features/<name> of a dataset: the features table, its meta.json and featurize's SASRec."""
    return storage.join(dataset, schema.FEATURES_DIR, name)


def features_uri(dataset: str, name: str) -> str:
    return storage.join(features_folder(dataset, name), schema.ITEMS_FILE)


def require_columns(table: pa.Table | list[str], columns: list[str], what: str) -> None:
    """ValueError naming the missing columns and those present; `table` or its column names."""
    names = table.column_names if isinstance(table, pa.Table) else list(table)
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{what}: missing column(s) {', '.join(missing)} (has {', '.join(names)})")


def samples_from_table(table: pa.Table, max_history: int, what: str = "split") -> Samples:
    """A split table (user_id, history, target, candidates) -> Samples with left-padded histories."""
    require_columns(table, [schema.USER_ID, schema.HISTORY, schema.TARGET, schema.CANDIDATES], what)
    return Samples.from_rows(
        table.column(schema.HISTORY).to_pylist(),
        table.column(schema.TARGET).to_numpy(),
        table.column(schema.CANDIDATES).to_pylist(),
        max_history=max_history,
        user_ids=table.column(schema.USER_ID).to_numpy(),
    )


def load_samples(dataset: str, split: str, max_history: int) -> Samples:
    uri = split_uri(dataset, split)
    return samples_from_table(storage.read_table(uri), max_history, uri)


def dense_column(column: pa.ChunkedArray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A list<float> column with nulls -> (values (n, d) float32 with zero rows for nulls, mask (n,))."""
    mask = pc.invert(pc.is_null(column)).to_numpy(zero_copy_only=False).astype(bool)
    if not mask.any():
        return np.zeros((n, 0), dtype=np.float32), mask
    present = column.filter(pa.chunked_array([pa.array(mask)]))
    flat = pc.list_flatten(present).to_numpy(zero_copy_only=False).astype(np.float32)
    d = len(flat) // int(mask.sum())
    values = np.zeros((n, d), dtype=np.float32)
    values[mask] = flat.reshape(-1, d)
    return values, mask


def features_from_table(table: pa.Table, what: str = "features") -> ItemFeatures:
    """The features table -> ItemFeatures (rows ordered by item_id, which must be exactly 0..N-1)."""
    require_columns(table, [schema.ITEM_ID, *EMB_COLUMNS.values()], what)
    table = table.sort_by(schema.ITEM_ID)
    ids = table.column(schema.ITEM_ID).to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise ValueError(f"{what}: item_id must be exactly 0..N-1 (found {len(ids)} rows, max id {ids.max()})")
    n = len(ids)
    out = {}
    for modality, column in EMB_COLUMNS.items():
        values, mask = dense_column(table.column(column), n)
        out[modality] = (torch.from_numpy(values), torch.from_numpy(mask))
    return ItemFeatures(text=out["text"][0], text_mask=out["text"][1], image=out["vision"][0],
                        image_mask=out["vision"][1], sequence=out["sequence"][0], sequence_mask=out["sequence"][1])


def load_item_features(dataset: str, name: str) -> ItemFeatures:
    uri = features_uri(dataset, name)
    try:
        table = storage.read_table(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"no item features at {uri}: run `speeder featurize` first") from None
    return features_from_table(table, uri)


def available_modalities(features: ItemFeatures) -> set[str]:
    return {m for m in EMB_COLUMNS if features.has(m)}


# A parquet input up to this size is read by the driver and handed to Ray Data from memory: a distributed
# read starts a listing task, footer-reader actors and read tasks, about five worker processes (~7 s on a
# 2-core machine, ~16 s of CPU) for a table of a few MB (ML-100K's train split: ~2 MB, its items: 0.2 MB).
SMALL_TABLE_BYTES = 64 * 2**20


def is_small(uri: str) -> bool:
    """Whether a parquet file or folder is small enough for the driver to read (SMALL_TABLE_BYTES)."""
    return storage.size(uri) <= SMALL_TABLE_BYTES


def in_blocks(table: pa.Table, rows_per_block: int) -> list[pa.Table]:
    """A table cut into zero-copy slices of `rows_per_block` rows (at least one, possibly empty): the
    blocks of `ray.data.from_arrow`, so that an actor pool gets one block per batch to spread."""
    step = max(1, rows_per_block)
    return [table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)]

"""Small prepared datasets and feature tables for platform tests."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from speeder import schema
from speeder_platform import storage
from speeder_platform.config import load_config
from speeder_platform.data.prepare import prepare_dataset
from speeder_platform.tables import features_uri


def prepare_synthetic(out: str, num_users: int = 60, num_items: int = 80, **kw) -> str:
    overrides = [f"prepare.synthetic.num_users={num_users}", f"prepare.synthetic.num_items={num_items}",
                 "prepare.synthetic.image_size=16", "prepare.max_history=8",
                 *[f"prepare.{k}={v}" for k, v in kw.items()]]
    prepare_dataset(load_config(None, overrides).prepare, out)
    return out


def write_random_features(dataset: str, name: str = "default", dims: tuple[int, int, int] = (16, 8, 6),
                          image_rate: float = 0.8, seed: int = 0) -> str:
    """A features table with random vectors (for tests of the training plumbing, not of encoders)."""
    items = storage.read_table(storage.join(dataset, schema.ITEMS_FILE))
    n = items.num_rows
    rng = np.random.default_rng(seed)

    def column(d: int, present: np.ndarray) -> pa.Array:
        values = rng.standard_normal((n, d)).astype(np.float32)
        return pa.array([v.tolist() if p else None for v, p in zip(values, present, strict=True)],
                        type=pa.list_(pa.float32()))

    table = pa.table({
        schema.ITEM_ID: pa.array(np.arange(n), type=pa.int64()),
        schema.TEXT_EMB: column(dims[0], np.ones(n, bool)),
        schema.IMAGE_EMB: column(dims[1], rng.random(n) < image_rate),
        schema.SEQ_EMB: column(dims[2], np.ones(n, bool)),
    })
    uri = features_uri(dataset, name)
    storage.write_table(table, uri)
    return uri

"""Fixtures for the data tests: a checker of every layout and protocol invariant of a prepared dataset."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from speeder.schema import (
    CANDIDATES,
    HISTORY,
    IMAGE_URI,
    IMAGES_DIR,
    INTERACTIONS_FILE,
    ITEM_ID,
    ITEMS_FILE,
    SPLITS,
    SPLITS_DIR,
    TARGET,
    TIMESTAMP,
    USER_ID,
)
from speeder_platform import storage
from speeder_platform.data import protocol


def loo_positions(split: str, n: int) -> range:
    """Positions of the targets of one split in a sequence of n items (written out, not via protocol)."""
    # A target needs a history: position 0 is never a target.
    ranges = {"train": (1, n - 2), "valid": (max(n - 2, 1), n - 1), "test": (max(n - 1, 1), n)}
    return range(*ranges[split])


def check_dataset(uri: str, *, kcore: int = 5, max_history: int = 20, num_candidates: int = 20
                  ) -> dict[str, Any]:
    """Assert the invariants of the dataset at `uri` (docs/data.md#layout, docs/data.md#protocol);
    returns its tables."""
    items = storage.read_table(storage.join(uri, ITEMS_FILE))
    inter = storage.read_table(storage.join(uri, INTERACTIONS_FILE))
    assert items.schema.equals(protocol.ITEMS_SCHEMA)
    assert inter.schema.equals(protocol.INTERACTIONS_SCHEMA)
    num_items = items.num_rows
    assert items.column(ITEM_ID).to_pylist() == list(range(num_items))
    ids, image_uris = items.column(ITEM_ID).to_pylist(), items.column(IMAGE_URI).to_pylist()
    for item_id, image_uri in zip(ids, image_uris, strict=True):
        if image_uri is None or image_uri.startswith(("http://", "https://")):
            continue
        assert image_uri.startswith(f"{IMAGES_DIR}/{item_id}."), image_uri  # relative, inside the dataset
        assert storage.exists(storage.join(uri, *image_uri.split("/"))), image_uri

    user = inter.column(USER_ID).to_numpy()
    item = inter.column(ITEM_ID).to_numpy()
    timestamp = inter.column(TIMESTAMP).to_numpy()
    num_users = int(user.max()) + 1
    # Contiguous ids, and the k-core invariant: every user and every item has >= k interactions.
    assert np.bincount(user, minlength=num_users).min() >= kcore
    assert np.bincount(item, minlength=num_items).min() >= kcore
    assert len(np.bincount(item)) == num_items
    # Grouped by user, chronological within a user.
    assert np.all(np.diff(user) >= 0)
    same_user = user[1:] == user[:-1]
    assert np.all(np.diff(timestamp)[same_user] >= 0)

    starts = np.searchsorted(user, np.arange(num_users))
    sequences = np.split(item, starts[1:])
    seen_keys = np.unique(user * num_items + item)
    tables = {"items": items, "interactions": inter}
    for split in SPLITS:
        table = storage.read_table(storage.join(uri, SPLITS_DIR, f"{split}.parquet"))
        assert table.schema.equals(protocol.SPLIT_SCHEMA)
        tables[split] = table
        users = table.column(USER_ID).to_numpy()
        targets = table.column(TARGET).to_numpy()
        history = table.column(HISTORY).combine_chunks()
        offsets, values = history.offsets.to_numpy(), history.values.to_numpy()
        candidates = table.column(CANDIDATES).combine_chunks()
        assert np.all(np.diff(candidates.offsets.to_numpy()) == num_candidates)
        candidates = candidates.values.to_numpy().reshape(len(users), num_candidates)
        # The target is among the candidates exactly once; every other candidate is an item the user
        # never interacted with (in any split), and candidates are distinct.
        is_target = candidates == targets[:, None]
        assert np.all(is_target.sum(axis=1) == 1)
        interacted = np.isin(users[:, None] * num_items + candidates, seen_keys)
        assert np.array_equal(interacted, is_target)
        assert np.all(np.diff(np.sort(candidates, axis=1), axis=1) > 0)
        # Leave-one-out positions and histories (most recent max_history items, oldest first).
        rows = [(u, p) for u, seq in enumerate(sequences) for p in loo_positions(split, len(seq))]
        assert users.tolist() == [u for u, _ in rows]
        assert targets.tolist() == [int(sequences[u][p]) for u, p in rows]
        expected = [sequences[u][max(0, p - max_history):p] for u, p in rows]
        assert np.diff(offsets).tolist() == [len(h) for h in expected]
        assert np.array_equal(values, np.concatenate(expected)) if expected else len(values) == 0
        assert max(np.diff(offsets), default=0) <= max_history
    return tables


@pytest.fixture
def assert_valid_dataset() -> Callable[..., dict[str, Any]]:
    return check_dataset

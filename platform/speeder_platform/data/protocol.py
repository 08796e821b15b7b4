"""The dataset protocol (docs/data.md#protocol) as pure functions on numpy arrays (no I/O).

`prepare` runs them in this order; every step is deterministic:

1. ids: source ids become dense codes numbered in source-id order, numerically when every id is a
   decimal integer (MovieLens movie 1 -> item 0), otherwise by string (Amazon ASINs, "item-00012").
   The numbering depends only on which ids survive, never on file order.
2. exact duplicate records (same user, item and timestamp) are dropped; repeated interactions at
   different times are behaviour and stay.
3. iterative k-core on users and items (counting interactions) until no record is removed.
4. the survivors are renumbered 0..U-1 and 0..N-1, keeping source-id order.
5. each user's interactions in chronological order, ties broken by record order in the source file.
6. leave-one-out: last -> test, second-to-last -> valid, every earlier position i >= 1 -> a train
   sample; the history is the `max_history` items before the target, oldest first. A user needs 2
   interactions for a test sample and 3 for a valid one (k-core >= 3 guarantees both).
7. candidates: the target plus `num_candidates - 1` distinct items the user never interacted with
   (in any split), uniformly without replacement, in a random but fixed order. One generator
   `numpy.random.default_rng([seed, split_index, user_id])` per (split, user) draws the uniforms of
   that user's samples, one row per sample in position order, so a sample's candidates depend only on
   (seed, split, user, position) and the user's own interactions, never on other users.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from speeder.schema import (
    CANDIDATES,
    HISTORY,
    IMAGE_URI,
    ITEM_ID,
    RATING,
    SOURCE_ID,
    SPLITS,
    TARGET,
    TEXT,
    TIMESTAMP,
    TITLE,
    USER_ID,
)

ITEMS_SCHEMA = pa.schema([
    pa.field(ITEM_ID, pa.int64(), nullable=False),
    pa.field(SOURCE_ID, pa.string(), nullable=False),
    pa.field(TITLE, pa.string(), nullable=False),
    pa.field(TEXT, pa.string(), nullable=False),
    pa.field(IMAGE_URI, pa.string()),  # relative to the dataset root, or an absolute URI
])
INTERACTIONS_SCHEMA = pa.schema([
    pa.field(USER_ID, pa.int64(), nullable=False),
    pa.field(ITEM_ID, pa.int64(), nullable=False),
    pa.field(TIMESTAMP, pa.int64(), nullable=False),  # unix seconds
    pa.field(RATING, pa.float64()),
])
SPLIT_SCHEMA = pa.schema([
    pa.field(USER_ID, pa.int64(), nullable=False),
    pa.field(HISTORY, pa.list_(pa.int64()), nullable=False),  # oldest first
    pa.field(TARGET, pa.int64(), nullable=False),
    pa.field(CANDIDATES, pa.list_(pa.int64()), nullable=False),
])


def natural_codes(ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Dense codes for source ids, numbered in source-id order (see step 1).

    Returns (codes (R,) int64, the distinct ids in code order).
    """
    encoded = pa.array(ids, type=pa.string()).dictionary_encode()
    dictionary = encoded.dictionary
    indices = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    by_string = pc.sort_indices(dictionary).to_numpy().astype(np.int64)
    order = by_string
    if len(dictionary) and pc.all(pc.match_substring_regex(dictionary, r"^[0-9]{1,18}$")).as_py():
        string_rank = np.empty_like(by_string)
        string_rank[by_string] = np.arange(len(by_string))
        # "7" and "007" are the same number: their string order breaks the tie.
        order = np.lexsort((string_rank, pc.cast(dictionary, pa.int64()).to_numpy()))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank[indices], dictionary.take(pa.array(order)).to_pylist()


def duplicate_mask(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """(R,) bool: True for a record repeating an earlier one with the same (user, item, timestamp)."""
    order = np.lexsort((np.arange(len(user)), timestamp, item, user))
    u, i, t = user[order], item[order], timestamp[order]
    dup = np.zeros(len(user), bool)
    dup[order[1:]] = (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (t[1:] == t[:-1])
    return dup


def kcore_mask(user: np.ndarray, item: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Iterative k-core: keep records whose user and item both have >= k kept records.

    Removing a user lowers its items' counts (and the other way round), so passes repeat until one
    removes nothing; the result (the largest such subset) does not depend on removal order.
    Returns (keep (R,) bool, number of passes that removed something).
    """
    keep = np.ones(len(user), bool)
    num_users = int(user.max()) + 1 if len(user) else 0
    num_items = int(item.max()) + 1 if len(item) else 0
    rounds = 0
    while True:
        user_count = np.bincount(user[keep], minlength=num_users)
        item_count = np.bincount(item[keep], minlength=num_items)
        drop = keep & ((user_count[user] < k) | (item_count[item] < k))
        if not drop.any():
            return keep, rounds
        keep &= ~drop
        rounds += 1


def renumber(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous codes 0..n-1 keeping order; returns (new codes, the old code of each new code)."""
    old, new = np.unique(codes, return_inverse=True)
    return new.astype(np.int64), old


def chronological_order(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Permutation sorting records by user, then time, ties kept in record order."""
    return np.lexsort((np.arange(len(user)), timestamp, user))


@dataclass
class SplitSamples:
    """Samples of one split, grouped by user and in position order within a user."""

    user: np.ndarray  # (S,) int64
    position: np.ndarray  # (S,) index of the target in the user's sequence
    target: np.ndarray  # (S,) int64
    history_offsets: np.ndarray  # (S+1,) int64: history of sample s = values[offsets[s]:offsets[s+1]]
    history_values: np.ndarray  # (sum of history lengths,) int64, oldest first per sample

    def __len__(self) -> int:
        return len(self.target)


def leave_one_out(user: np.ndarray, item: np.ndarray, max_history: int) -> dict[str, SplitSamples]:
    """Leave-one-out samples (step 6) from records sorted by `chronological_order`."""
    if len(user) and np.any(np.diff(user) < 0):
        raise ValueError("leave_one_out needs records sorted by user (see chronological_order)")
    counts = np.bincount(user) if len(user) else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    index = np.arange(len(user), dtype=np.int64)
    position = index - starts[user]
    length = counts[user]
    masks = {
        "train": (position >= 1) & (position <= length - 3),
        "valid": (position == length - 2) & (length >= 3),
        "test": (position == length - 1) & (length >= 2),
    }
    out = {}
    for split in SPLITS:
        at = np.flatnonzero(masks[split])
        begin = np.maximum(starts[user[at]], at - max_history)
        lengths = at - begin
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        gather = np.repeat(begin - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        out[split] = SplitSamples(user=user[at].astype(np.int64), position=position[at], target=item[at],
                                  history_offsets=offsets, history_values=item[gather].astype(np.int64))
    return out


def interacted_items(user: np.ndarray, item: np.ndarray, num_users: int, num_items: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """CSR of each user's distinct items: (indptr (U+1,), items sorted within each user)."""
    pairs = np.unique(user.astype(np.int64) * num_items + item)
    counts = np.bincount(pairs // num_items, minlength=num_users)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), pairs % num_items


def sample_candidates(samples: SplitSamples, indptr: np.ndarray, seen: np.ndarray, num_items: int,
                      num_candidates: int, seed: int, split_index: int) -> np.ndarray:
    """Candidates (S, num_candidates) int64 for each sample (step 7); the target is in each row once.

    `indptr`/`seen` come from `interacted_items`. Negatives are drawn with Floyd's algorithm on the
    index space of the user's unseen items, vectorised over all samples; the uniforms come from one
    generator per (seed, split_index, user).
    """
    m = num_candidates - 1
    user = samples.user
    size = len(user)
    if size == 0:
        return np.zeros((0, num_candidates), np.int64)
    if np.any(np.diff(user) < 0):
        raise ValueError("sample_candidates needs samples grouped by user")
    unseen = num_items - np.diff(indptr)[user]  # (S,)
    if np.any(unseen < m):
        short = int(np.argmax(unseen < m))
        raise ValueError(
            f"num_candidates={num_candidates} needs {m} items user {int(user[short])} never interacted "
            f"with, but only {int(unseen[short])} of {num_items} are left: lower prepare.num_candidates"
        )
    uniforms = np.empty((size, m + num_candidates))
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(user)) + 1, [size]])
    seed_word = int(seed) % 2**63  # SeedSequence takes non-negative words
    for begin, end in zip(bounds[:-1], bounds[1:], strict=True):
        rng = np.random.default_rng([seed_word, split_index, int(user[begin])])
        uniforms[begin:end] = rng.random((end - begin, m + num_candidates))

    # Floyd: for j = n-m .. n-1 draw t in [0, j]; take t unless already taken, else j. Uniform m-subset.
    chosen = np.empty((size, m), np.int64)
    for step in range(m):
        j = unseen - m + step
        draw = np.minimum((uniforms[:, step] * (j + 1)).astype(np.int64), j)
        if step:
            draw = np.where((chosen[:, :step] == draw[:, None]).any(axis=1), j, draw)
        chosen[:, step] = draw

    # The r-th unseen item of a user is r + #{seen s_k : s_k - k <= r} (s_k - k unseen items lie below s_k).
    within = np.arange(len(seen)) - np.repeat(indptr[:-1], np.diff(indptr))
    owner = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    stride = num_items + 1
    keys = owner * stride + (seen - within)  # sorted: users ascending, s_k - k non-decreasing
    below = np.searchsorted(keys, user[:, None] * stride + chosen, side="right") - indptr[user][:, None]
    negatives = chosen + below

    candidates = np.concatenate([samples.target[:, None], negatives], axis=1)
    order = np.argsort(uniforms[:, m:], axis=1, kind="stable")  # a uniform random permutation per row
    return np.take_along_axis(candidates, order, axis=1)


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.int64()))


def split_table(samples: SplitSamples, candidates: np.ndarray) -> pa.Table:
    """One split as a table with SPLIT_SCHEMA."""
    size, width = candidates.shape
    columns = [
        pa.array(samples.user, pa.int64()),
        _list_array(samples.history_offsets, samples.history_values),
        pa.array(samples.target, pa.int64()),
        _list_array(np.arange(0, size * width + 1, width), candidates.ravel()),
    ]
    return pa.Table.from_arrays(columns, schema=SPLIT_SCHEMA)

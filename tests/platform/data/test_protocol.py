"""The protocol's pure functions on hand-made and random arrays (no I/O)."""

import numpy as np
import pytest

from speeder_platform.data import protocol


def naive_kcore(pairs: list[tuple[int, int]], k: int) -> set[int]:
    """Reference: remove one under-threshold record at a time until none is left; returns kept indices."""
    kept = set(range(len(pairs)))
    while True:
        users: dict[int, int] = {}
        items: dict[int, int] = {}
        for r in kept:
            users[pairs[r][0]] = users.get(pairs[r][0], 0) + 1
            items[pairs[r][1]] = items.get(pairs[r][1], 0) + 1
        bad = [r for r in sorted(kept) if users[pairs[r][0]] < k or items[pairs[r][1]] < k]
        if not bad:
            return kept
        kept.remove(bad[0])


def test_kcore_needs_several_passes() -> None:
    # k=2. Pass 1 drops user 3 (one record); then item 2 has one record left (user 2), so pass 2 drops
    # it; then user 2 has one record left, so pass 3 drops it. A single pass would keep (2, 1), (2, 2).
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 1), (2, 2), (3, 2)]
    user, item = (np.array(c) for c in zip(*pairs, strict=True))
    keep, passes = protocol.kcore_mask(user, item, 2)
    assert passes == 3
    assert np.flatnonzero(keep).tolist() == [0, 1, 2, 3]
    one_pass = ~((np.bincount(user)[user] < 2) | (np.bincount(item)[item] < 2))
    assert one_pass.sum() == 6  # what a non-iterative filter would have left


def test_kcore_invariant_on_random_data_matches_reference() -> None:
    rng = np.random.default_rng(3)
    user = rng.integers(0, 40, 400)
    item = (rng.zipf(1.6, 400) - 1) % 60  # skewed popularity: many items below k
    keep, passes = protocol.kcore_mask(user, item, 4)
    assert passes >= 2
    assert keep.sum() > 0
    assert np.bincount(user[keep])[np.unique(user[keep])].min() >= 4
    assert np.bincount(item[keep])[np.unique(item[keep])].min() >= 4
    pairs = list(zip(user.tolist(), item.tolist(), strict=True))
    assert set(np.flatnonzero(keep).tolist()) == naive_kcore(pairs, 4)


def test_natural_codes_order() -> None:
    codes, ids = protocol.natural_codes(["10", "9", "100", "9", "007", "7"])
    assert ids == ["007", "7", "9", "10", "100"]  # numeric order; "007" and "7" tie, string order decides
    assert codes.tolist() == [3, 2, 4, 2, 0, 1]
    codes, ids = protocol.natural_codes(["b", "a10", "a9", "b"])
    assert ids == ["a10", "a9", "b"]  # not all numeric: string order
    assert codes.tolist() == [2, 0, 1, 2]


def test_duplicates_and_chronological_ties() -> None:
    user = np.array([1, 0, 1, 0, 1])
    item = np.array([5, 6, 5, 7, 5])
    ts = np.array([10, 5, 10, 3, 11])
    # Record 2 repeats record 0 exactly; record 4 is the same item at another time and stays.
    assert protocol.duplicate_mask(user, item, ts).tolist() == [False, False, True, False, False]
    # Ties (records 0 and 2 at t=10) keep record order.
    assert protocol.chronological_order(user, ts).tolist() == [3, 1, 0, 2, 4]


def test_leave_one_out_positions() -> None:
    sequences = [[10, 11, 12, 13, 14], [20, 21, 22], [30, 31], [40]]
    user = np.repeat(np.arange(4), [len(s) for s in sequences])
    item = np.concatenate(sequences)
    splits = protocol.leave_one_out(user, item, max_history=2)

    def rows(split: str) -> list[tuple[int, list[int], int, int]]:
        s = splits[split]
        bounds = zip(s.history_offsets[:-1], s.history_offsets[1:], strict=True)
        hist = [s.history_values[a:b].tolist() for a, b in bounds]
        return list(zip(s.user.tolist(), hist, s.target.tolist(), s.position.tolist(), strict=True))

    assert rows("train") == [(0, [10], 11, 1), (0, [10, 11], 12, 2)]
    assert rows("valid") == [(0, [11, 12], 13, 3), (1, [20], 21, 1)]
    assert rows("test") == [(0, [12, 13], 14, 4), (1, [20, 21], 22, 2), (2, [30], 31, 1)]
    with pytest.raises(ValueError, match="sorted by user"):
        protocol.leave_one_out(np.array([1, 0]), np.array([1, 2]), 2)


def random_dataset(seed: int = 0, num_users: int = 30, num_items: int = 50):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 25, num_users)
    user = np.repeat(np.arange(num_users), lengths)
    item = np.concatenate([rng.choice(num_items, n, replace=False) for n in lengths])
    return user, item, num_items


def test_candidates_invariants_and_determinism() -> None:
    user, item, num_items = random_dataset()
    indptr, seen = protocol.interacted_items(user, item, int(user.max()) + 1, num_items)
    samples = protocol.leave_one_out(user, item, max_history=5)["train"]
    cands = protocol.sample_candidates(samples, indptr, seen, num_items, 20, seed=7, split_index=0)
    assert cands.shape == (len(samples), 20)
    for u, target, row in zip(samples.user, samples.target, cands, strict=True):
        user_items = set(item[user == u].tolist())
        assert row.tolist().count(target) == 1
        assert not (set(row.tolist()) - {target}) & user_items
        assert len(set(row.tolist())) == 20
    again = protocol.sample_candidates(samples, indptr, seen, num_items, 20, seed=7, split_index=0)
    assert np.array_equal(cands, again)
    other_split = protocol.sample_candidates(samples, indptr, seen, num_items, 20, seed=7, split_index=1)
    assert not np.array_equal(cands, other_split)
    # The target's position varies.
    positions = np.argmax(cands == samples.target[:, None], axis=1)
    assert len(set(positions.tolist())) >= 15


def test_candidates_of_a_user_do_not_depend_on_other_users() -> None:
    user, item, num_items = random_dataset(seed=1)
    indptr, seen = protocol.interacted_items(user, item, int(user.max()) + 1, num_items)
    samples = protocol.leave_one_out(user, item, max_history=5)["train"]
    full = protocol.sample_candidates(samples, indptr, seen, num_items, 10, seed=0, split_index=0)
    rows = np.flatnonzero(samples.user == 4)
    only = protocol.SplitSamples(user=samples.user[rows], position=samples.position[rows],
                                 target=samples.target[rows],
                                 history_offsets=np.zeros(len(rows) + 1, np.int64),
                                 history_values=np.zeros(0, np.int64))
    alone = protocol.sample_candidates(only, indptr, seen, num_items, 10, seed=0, split_index=0)
    assert np.array_equal(full[rows], alone)


def test_negatives_are_uniform_over_unseen_items() -> None:
    num_items, seen_items = 40, np.array([0, 3, 4, 5, 17, 18, 30, 38, 39])
    rows = 3000
    samples = protocol.SplitSamples(user=np.zeros(rows, np.int64), position=np.arange(rows),
                                    target=np.full(rows, 3), history_offsets=np.zeros(rows + 1, np.int64),
                                    history_values=np.zeros(0, np.int64))
    indptr = np.array([0, len(seen_items)])
    cands = protocol.sample_candidates(samples, indptr, seen_items, num_items, 6, seed=0, split_index=0)
    counts = np.bincount(cands[cands != 3], minlength=num_items)
    assert counts[seen_items].sum() == 0
    unseen = np.setdiff1d(np.arange(num_items), seen_items)
    expected = rows * 5 / len(unseen)
    assert np.all(np.abs(counts[unseen] - expected) < 0.25 * expected), counts[unseen]


def test_too_few_negatives_is_a_clear_error() -> None:
    user = np.zeros(5, np.int64)
    item = np.arange(5)
    indptr, seen = protocol.interacted_items(user, item, 1, 8)
    samples = protocol.leave_one_out(user, item, 3)["test"]
    with pytest.raises(ValueError, match=r"num_candidates=5 needs 4 items user 0 .* only 3 of 8"):
        protocol.sample_candidates(samples, indptr, seen, 8, 5, seed=0, split_index=2)


def test_split_table_schema() -> None:
    user, item, num_items = random_dataset(seed=2)
    indptr, seen = protocol.interacted_items(user, item, int(user.max()) + 1, num_items)
    samples = protocol.leave_one_out(user, item, 4)["valid"]
    candidates = protocol.sample_candidates(samples, indptr, seen, num_items, 5, seed=0, split_index=1)
    table = protocol.split_table(samples, candidates)
    assert table.schema.equals(protocol.SPLIT_SCHEMA)
    assert table.num_rows == int(user.max()) + 1

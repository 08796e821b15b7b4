import numpy as np
import pytest
import torch

from speeder.sasrec import (
    PAD,
    SASRec,
    build_training_samples,
    evaluate_full_ranking,
    pad_sequences,
    train_sasrec,
)

N_ITEMS = 30


@pytest.fixture
def model() -> SASRec:
    torch.manual_seed(0)
    return SASRec(N_ITEMS, hidden_size=16, num_layers=2, num_heads=2, inner_size=32, max_length=12).eval()


def successor_sequences(n_users: int, length: int, n_items: int, seed: int) -> list[np.ndarray]:
    """Deterministic rule: the next item is (item + 1) mod n_items, from a random start."""
    starts = np.random.default_rng(seed).integers(0, n_items, size=n_users)
    return [(s + np.arange(length)) % n_items for s in starts]


def test_shapes_of_every_method(model: SASRec) -> None:
    seq = pad_sequences([np.array([1, 2, 3]), np.array([4, 5, 6, 7, 8])], max_length=12)
    assert seq.shape == (2, 5) and seq[0, :2].tolist() == [PAD, PAD]
    assert model(seq).shape == (2, 16)
    assert model.full_sort_predict(seq).shape == (2, N_ITEMS)
    cands = torch.tensor([[0, 1, 2], [3, 4, 29]])
    scores = model.predict(seq, cands)
    assert scores.shape == (2, 3)
    assert torch.allclose(scores, model.full_sort_predict(seq).gather(1, cands), atol=1e-6)
    assert model.calculate_loss(seq, torch.tensor([4, 9])).ndim == 0
    assert model.item_embeddings().shape == (N_ITEMS, 16)
    rebuilt = SASRec(**model.hparams)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.eval()(seq), model(seq))


def test_left_padding_and_older_items_do_not_change_the_result(model: SASRec) -> None:
    seq = np.array([3, 1, 4, 1, 5, 9])
    narrow = pad_sequences([seq], max_length=12)  # (1, 6)
    wide = torch.cat([torch.full((1, 6), PAD), narrow], dim=1)  # (1, 12): six more padding columns
    assert torch.allclose(model(narrow), model(wide), atol=1e-5)
    # Causal attention: the state after item t ignores later items; and only the window counts.
    longer = pad_sequences([np.concatenate([seq, [7, 7]])], max_length=12)
    assert not torch.allclose(model(narrow), model(longer))
    window = pad_sequences([np.arange(20) % N_ITEMS], max_length=12)  # keeps the last 12
    assert window.shape == (1, 12) and window[0, 0].item() == 8
    assert torch.allclose(model(pad_sequences([np.arange(20) % N_ITEMS], 50)), model(window), atol=1e-5)


def test_training_samples_are_every_prefix() -> None:
    inputs, targets = build_training_samples([np.array([5, 6, 7, 8]), np.array([1])], max_length=2)
    assert targets.tolist() == [6, 7, 8]
    assert inputs.tolist() == [[PAD, 5], [5, 6], [6, 7]]


def test_learns_a_successor_rule_and_is_reproducible() -> None:
    train = successor_sequences(200, 12, N_ITEMS, seed=1)
    kwargs = dict(epochs=6, batch_size=128, lr=5e-3, seed=3, max_length=10, hidden_size=32,
                  num_layers=1, num_heads=2, inner_size=64, dropout=0.1, num_threads=1)
    model, stats = train_sasrec(train, N_ITEMS, **kwargs)
    assert len(stats) == 6 and stats[-1]["loss"] < stats[0]["loss"]
    assert all(row["samples_per_s"] > 0 for row in stats)
    held_out = successor_sequences(100, 12, N_ITEMS, seed=2)  # unseen users, random positions
    cut = np.random.default_rng(4).integers(2, 11, size=len(held_out))
    histories = [s[:c] for s, c in zip(held_out, cut, strict=True)]
    targets = np.array([s[c] for s, c in zip(held_out, cut, strict=True)])
    result = evaluate_full_ranking(model, histories, targets, k=1)
    assert result["hr@1"] > 0.9
    again, stats_again = train_sasrec(train, N_ITEMS, **kwargs)
    assert [r["loss"] for r in stats] == [r["loss"] for r in stats_again]
    assert torch.equal(model.item_embeddings(), again.item_embeddings())


def test_sorted_trimmed_micro_batches_give_the_batch_gradient() -> None:
    rng = np.random.default_rng(6)
    train = [rng.integers(0, N_ITEMS, size=rng.integers(2, 15)) for _ in range(40)]  # mixed lengths
    kwargs = dict(epochs=2, batch_size=64, max_length=10, hidden_size=16, inner_size=32, dropout=0.0,
                  num_threads=1)
    whole, _ = train_sasrec(train, N_ITEMS, micro_batch_size=64, **kwargs)
    micro, _ = train_sasrec(train, N_ITEMS, micro_batch_size=24, **kwargs)  # 24 + 24 + 16: uneven
    assert torch.allclose(whole.item_embeddings(), micro.item_embeddings(), atol=1e-5)


def test_validation_metrics_and_progress_callback() -> None:
    train = successor_sequences(40, 8, N_ITEMS, seed=5)
    seen: list[dict] = []
    _, stats = train_sasrec(train, N_ITEMS, epochs=2, batch_size=64, max_length=8, hidden_size=16,
                            inner_size=32, num_threads=1, valid=(train, np.zeros(40, dtype=np.int64)),
                            progress=seen.append)
    assert seen == stats and {"hr@10", "ndcg@10", "loss", "seconds"} <= set(stats[0])


def test_history_masking_but_never_the_target(model: SASRec) -> None:
    history = np.arange(20)  # the model input, and the items masked

    def rank(target: int, mask: bool) -> int:  # single sample: MRR@N = 1 / (rank + 1)
        mrr = evaluate_full_ranking(model, [history], np.array([target]), k=N_ITEMS, mask_history=mask)
        return round(1 / mrr[f"mrr@{N_ITEMS}"]) - 1

    scores = model.full_sort_predict(pad_sequences([history], 12))[0].detach().numpy()
    for target in (3, 25):  # in the history, and not
        others = np.setdiff1d(np.arange(N_ITEMS), [target])
        assert rank(target, mask=False) == int((scores[others] > scores[target]).sum())
        new_items = np.setdiff1d(others, history)
        assert rank(target, mask=True) == int((scores[new_items] > scores[target]).sum())
    best_new = 20 + int(scores[20:].argmax())
    assert rank(best_new, mask=True) == 0 < rank(best_new, mask=False)


def test_unknown_item_ids_fail_fast() -> None:
    with pytest.raises(ValueError, match="item id 30"):
        train_sasrec([np.array([1, 30])], N_ITEMS, epochs=1)
    with pytest.raises(ValueError, match="no training sample"):
        train_sasrec([np.array([1])], N_ITEMS, epochs=1)

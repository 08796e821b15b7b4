"""The scoring head's levers (speeder/head.py, docs/model.md#accuracy-levers): readouts, item prior, SASRec's
user state, item norms, the residual readout."""

import pytest
import torch

from speeder.model import build_model
from speeder.mrc import ItemFeatures
from testkit.model import ALL, tiny_settings


def test_readout_skip_starts_as_the_last_items_token(features) -> None:
    model = build_model("tiny-llama", tiny_settings(features, readout="both", readout_skip=True, dense_weight=1.0))
    model.eval()
    history = torch.tensor([[-1, 3, 4, 5], [0, 1, 2, 6]])
    with torch.no_grad():
        table = model.item_tokens(features, ALL)
        u, _, _ = model.user_vectors(history, table, ALL)
        expected = torch.nn.functional.normalize(table[history[:, -1]], dim=-1)  # PPL starts at zero
    torch.testing.assert_close(u, expected, rtol=1e-5, atol=1e-6)


def test_item_prior_starts_at_zero_and_shifts_items(features) -> None:
    model = build_model("tiny-llama", tiny_settings(features, item_prior=True))
    model.eval()
    history = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        table = model.item_tokens(features, ALL)
        before = model.score_catalog(history, table)
        model.head.prior.weight.normal_()
        after = model.score_catalog(history, table)
    shift = after - before  # the prior is 0 at init, so this is the prior term alone
    assert not torch.allclose(shift, shift[:, :1].expand_as(shift))  # a different term per item


def test_sequence_user_path_follows_the_sequence_modality(features) -> None:
    from speeder.sasrec import SASRec

    torch.manual_seed(0)
    sasrec = SASRec(features.num_items, hidden_size=features.sequence.shape[1], num_heads=2, max_length=6).eval()
    settings = tiny_settings(features, sequence_skip=True, sequence_user=True, readout_skip=True, readout="both")
    model = build_model("tiny-llama", settings, sequence_encoder=sasrec)
    assert not any(n.startswith("sequence_encoder.") for n in model.trainable_state())
    history = torch.tensor([[-1, 3, 4, 5]])
    assert model.sequence_states(history, ["text"]) is None  # stage 1: no sequence, no SASRec user state
    states = model.sequence_states(history, ALL)
    assert states.shape == (1, 4, model.head.proj.weight.shape[0])
    with torch.no_grad():
        table = model.item_tokens(features, ALL)
        with_seq, _, _ = model.user_vectors(history, table, ALL)
        without, _, _ = model.user_vectors(history, table, ["text", "vision"])
    assert not torch.allclose(with_seq, without)
    with pytest.raises(ValueError, match="sequence_skip"):
        tiny_settings(features, sequence_user=True, sequence_skip=False)


@pytest.mark.parametrize("item_norms", [True, False])
def test_item_norms_decide_whether_a_tokens_norm_reaches_the_score(features, item_norms) -> None:
    model = build_model("tiny-llama", tiny_settings(features, item_norms=item_norms, item_prior=False))
    model.eval()
    history = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        table = model.item_tokens(features, ALL)
        before = model.score_catalog(history, table)
        table[5] *= 2.0
        after = model.score_catalog(history, table)
    expected = before[:, 5] * 2.0 if item_norms else before[:, 5]  # dot product vs cosine
    torch.testing.assert_close(after[:, 5], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after[:, :5], before[:, :5])


def test_an_untrained_model_with_the_sasrec_paths_ranks_like_sasrec(features) -> None:
    from speeder.sasrec import SASRec

    torch.manual_seed(0)
    sasrec = SASRec(features.num_items, hidden_size=features.sequence.shape[1], num_heads=2, max_length=6).eval()
    with torch.no_grad():
        sasrec.item_embedding.weight.normal_(0.0, 1.0)  # spread scores: a trained table, not init noise
    catalog = ItemFeatures(**{**vars(features), "sequence": sasrec.item_embeddings().detach().clone()})
    history = torch.tensor([[-1, 3, 4, 5], [0, 1, 2, 6], [-1, -1, 9, 8]])
    with torch.no_grad():
        expected = sasrec.full_sort_predict(history).argsort(dim=-1, descending=True)
    orders = {}
    for mix in (1e-4, 1.0):
        settings = tiny_settings(features, sequence_skip=True, sequence_user=True, readout_skip=True, readout="both",
                                 content_mix=mix)
        torch.manual_seed(0)
        model = build_model("tiny-llama", settings, sequence_encoder=sasrec).eval()
        with torch.no_grad():
            orders[mix] = model.score_catalog(history, model.item_tokens(catalog, ALL), ALL).argsort(
                dim=-1, descending=True)
    assert torch.equal(orders[1e-4][:, :10], expected[:, :10])
    assert not torch.equal(orders[1.0][:, :10], expected[:, :10])  # content at full scale blurs SASRec's ranking


def test_residual_readout_keeps_sasrecs_part_whole_beside_the_learnt_part(features) -> None:
    from speeder.sasrec import SASRec

    torch.manual_seed(0)
    sasrec = SASRec(features.num_items, hidden_size=features.sequence.shape[1], num_heads=2, max_length=6).eval()
    history = torch.tensor([[-1, 3, 4, 5], [0, 1, 2, 6]])
    vectors = {}
    for residual in (False, True):
        settings = tiny_settings(features, sequence_skip=True, sequence_user=True, readout_skip=True, readout="both",
                                 residual_readout=residual)
        torch.manual_seed(0)
        model = build_model("tiny-llama", settings, sequence_encoder=sasrec).eval()
        with torch.no_grad():
            table = model.item_tokens(features, ALL)
            untrained, _, _ = model.user_vectors(history, table, ALL)
            model.head.proj.weight.normal_(0.0, 1.0)  # a learnt part much larger than SASRec's unit part
            u, hidden, batch = model.user_vectors(history, table, ALL)
            seq = model.head.sequence_skip(model.sequence_states(history, ALL)[:, -1])
            llm = model.head.proj(hidden[:, -1].float())  # the only learnt part not at zero here
        vectors[residual] = untrained
        if residual:  # SASRec's part stays a unit vector beside the learnt part, whose norm is capped at 1
            capped = llm / llm.norm(dim=-1, keepdim=True).clamp(min=1.0)
            assert float(llm.norm(dim=-1).min()) > 1.0  # the cap is what this checks
            torch.testing.assert_close(u, torch.nn.functional.normalize(seq, dim=-1) + capped, rtol=1e-4, atol=1e-4)
        else:  # both normalised together: the large learnt part drowns SASRec's
            torch.testing.assert_close(u, torch.nn.functional.normalize(seq + llm, dim=-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vectors[True], vectors[False])  # untrained, the two are the same model


def test_history_taste_adds_w_times_the_mean_history_token_from_zero(features) -> None:
    model = build_model("tiny-llama", tiny_settings(features, history_taste=True, readout="both", readout_skip=True,
                                                    dense_weight=1.0))
    model.eval()
    history = torch.tensor([[-1, -1, 3, 4, 5], [0, 1, 2, 6, 7]])
    with torch.no_grad():
        table = model.item_tokens(features, ALL)
        means = model.history_means(history, table)  # (B, H, D) prefix means over the real items
        torch.testing.assert_close(means[0, 3], table[[3, 4]].mean(0))
        torch.testing.assert_close(means[1, 4], table[[0, 1, 2, 6, 7]].mean(0))
        assert means[0, 0].abs().sum() == 0  # padding only: no taste yet
        before, _, _ = model.user_vectors(history, table, ALL)
        model.head.taste.weight.zero_()
        assert torch.equal(before, model.user_vectors(history, table, ALL)[0])  # starts at zero: no change
        model.head.taste.weight.copy_(0.5 * torch.eye(table.shape[1]))
        after, _, _ = model.user_vectors(history, table, ALL)
    torch.testing.assert_close(after - before, 0.5 * means[:, -1] / model.head.item_norm, rtol=1e-5, atol=1e-6)
    # the dense loss trains it: every slot's vector reads the mean of the history up to that slot
    model.train()
    model.head.taste.weight.data.zero_()
    out = model(history, torch.tensor([8, 9]), None, features, ALL)
    out["loss"].backward()
    assert model.head.taste.weight.grad is not None and model.head.taste.weight.grad.abs().sum() > 0
    assert build_model("tiny-llama", tiny_settings(features)).head.taste is None  # off by default

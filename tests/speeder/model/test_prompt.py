"""Prompts and backbones (speeder/prompt.py, speeder/spae.py, speeder/backbone.py): one token per item, padding,
position pairs, other LLM families."""

import pytest
import torch

from speeder.model import build_model
from speeder.spae import sample_position_pairs
from testkit.model import ALL, tiny_settings


def test_prompt_costs_template_plus_one_token_per_item(tiny_model) -> None:
    builder = tiny_model.prompt
    history = torch.tensor([[-1, -1, -1, 3, 4, 5], [0, 1, 2, 3, 4, 5], [-1, -1, -1, -1, -1, 9]])
    batch = builder.build(history)
    real_tokens = batch.attention_mask.sum(dim=1)
    assert real_tokens.tolist() == [builder.template_length + n for n in (3, 6, 1)]
    assert (batch.slot_items >= 0).sum(dim=1).tolist() == [3, 6, 1]
    # Slots hold the history in order, most recent item at recency 0.
    assert batch.slot_items[0][batch.slot_items[0] >= 0].tolist() == [3, 4, 5]
    assert batch.slot_recency[0][batch.slot_items[0] >= 0].tolist() == [2, 1, 0]


def test_left_padding_does_not_change_scores(tiny_model, features) -> None:
    tiny_model.eval()
    with torch.no_grad():
        for proj in (tiny_model.head.proj, tiny_model.head.slot_proj):  # the LLM's part starts at 0: give it weight
            proj.weight.normal_(std=0.1)
        table = tiny_model.item_tokens(features, ALL)
        short = tiny_model.score_candidates(torch.tensor([[3, 4, 5]]), torch.tensor([[1, 2, 7]]), table)
        padded = tiny_model.score_candidates(torch.tensor([[-1, -1, -1, 3, 4, 5], [0, 1, 2, 3, 4, 5]]),
                                             torch.tensor([[1, 2, 7], [1, 2, 7]]), table)
    torch.testing.assert_close(short[0], padded[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(padded[0], padded[1])


def test_position_pairs_are_distinct_and_in_range() -> None:
    lengths = torch.tensor([0, 1, 2, 6, 20])
    rows, i, j = sample_position_pairs(lengths, 50, torch.Generator().manual_seed(0))
    assert set(rows.tolist()) == {2, 3, 4}
    assert bool((i != j).all())
    assert bool((i < lengths[rows]).all() and (j < lengths[rows]).all() and (i >= 0).all())
    assert len(set(zip(i[rows == 4].tolist(), j[rows == 4].tolist(), strict=True))) > 30


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-mistral"])
def test_other_backbone_families_score(name, features) -> None:
    model = build_model(name, tiny_settings(features))
    assert model._backbone.family in ("qwen2", "mistral")
    out = model(torch.tensor([[1, 2, 3]]), torch.tensor([4]), None, features, ALL)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)

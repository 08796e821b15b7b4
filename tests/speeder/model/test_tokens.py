"""Item tokens (speeder/mrc.py): masked modalities, the vision gate, the token scale, the SASRec skip and the
content mix."""

import pytest
import torch

from speeder.model import build_model
from speeder.mrc import ItemFeatures
from testkit.model import ALL, make_features, tiny_settings


def test_masked_modality_features_do_not_change_tokens(tiny_model, features) -> None:
    tiny_model.eval()
    with torch.no_grad():
        tiny_model.mrc.vision_gate.fill_(1.0)
        before = tiny_model.item_tokens(features, ALL)
        changed = make_features()
        no_image = ~changed.image_mask
        changed.image[no_image] = torch.randn(int(no_image.sum()), changed.image.shape[1]) * 100
        after = tiny_model.item_tokens(changed, ALL)
        assert torch.equal(before, after)
        # A modality the stage has not switched on has no effect at all, whatever its values.
        changed.sequence = torch.randn_like(changed.sequence)
        assert torch.equal(tiny_model.item_tokens(features, ["text"]), tiny_model.item_tokens(changed, ["text"]))
        # ...but it does change the tokens when it is active (the test could fail).
        assert not torch.equal(tiny_model.item_tokens(features, ALL), tiny_model.item_tokens(changed, ALL))


def test_vision_gate_at_zero_silences_image_features(tiny_model, features) -> None:
    tiny_model.eval()
    other = make_features()
    other.image = torch.randn_like(other.image) * 10
    with torch.no_grad():
        assert float(tiny_model.mrc.vision_gate) == 0.0
        assert torch.equal(tiny_model.item_tokens(features, ALL), tiny_model.item_tokens(other, ALL))
        tiny_model.mrc.vision_gate.fill_(0.5)
        assert not torch.equal(tiny_model.item_tokens(features, ALL), tiny_model.item_tokens(other, ALL))


def test_vision_gate_at_zero_gives_exactly_the_token_without_vision(tiny_model, features) -> None:
    tiny_model.eval()
    with torch.no_grad():
        without = tiny_model.item_tokens(features, ["text", "sequence"])
        assert torch.equal(tiny_model.item_tokens(features, ALL), without)  # g_v = 0: vision adds nothing
        tiny_model.mrc.vision_gate.fill_(0.3)
        gated = tiny_model.item_tokens(features, ALL)
    has_image = features.image_mask
    assert not torch.allclose(gated[has_image], without[has_image])  # ...and something once the gate opens
    assert torch.equal(gated[~has_image], without[~has_image])  # items without an image never change


def test_vision_gate_learns_from_zero(tiny_model, features) -> None:
    tokens = tiny_model.item_tokens(features, ALL)
    tokens.pow(2).sum().backward()
    assert tiny_model.mrc.vision_gate.grad is not None and float(tiny_model.mrc.vision_gate.grad.abs()) > 0


def test_token_scale_is_a_positive_log_parameter(tiny_model) -> None:
    mrc = tiny_model.mrc
    with torch.no_grad():
        mrc.log_gain.fill_(-50.0)  # however far a step pushes it, the scale stays positive
    assert float(mrc.output_scale.detach()) > 0
    assert "output_scale" not in dict(mrc.named_parameters())


def test_sequence_skip_preserves_sasrec_similarity(features) -> None:
    model = build_model("tiny-llama", tiny_settings(features, sequence_skip=True))
    s = features.sequence
    unit = s / s.pow(2).mean(dim=1, keepdim=True).sqrt()
    mapped = model.mrc.sequence_skip(unit).detach()  # (N, D)
    ratio = (mapped @ mapped.T) / (unit @ unit.T)
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0, 0])), rtol=1e-3, atol=1e-3)


def test_content_mix_scales_the_content_part_of_warm_tokens_only(features) -> None:
    cold = torch.arange(features.num_items) >= 30  # no SASRec embedding: new items
    catalog = ItemFeatures(**{**vars(features), "sequence_mask": ~cold})
    tokens, skips = {}, {}
    for mix in (1.0, 0.1):
        torch.manual_seed(0)  # the same weights for both mixes
        model = build_model("tiny-llama", tiny_settings(features, sequence_skip=True, content_mix=mix)).eval()
        with torch.no_grad():
            tokens[mix] = model.item_tokens(catalog, ALL)
            skips[mix] = model.mrc.sequence_skip(model.mrc.sequence_input(catalog.sequence))
    torch.testing.assert_close(skips[1.0], skips[0.1])
    content = tokens[1.0] - skips[1.0]  # warm rows: the content path at full scale
    torch.testing.assert_close(tokens[0.1][~cold], 0.1 * content[~cold] + skips[0.1][~cold], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tokens[0.1][cold], tokens[1.0][cold])  # cold items keep the content path whole
    assert float(content[~cold].norm(dim=-1).min()) > 0  # there was a content part to scale
    with pytest.raises(ValueError, match="content_mix"):
        tiny_settings(features, content_mix=0.0)

import pytest
import torch

from speeder.backbone import load_backbone
from speeder.model import build_model
from testkit.model import make_features, tiny_settings


def test_tiny_preset_is_deterministic_and_frozen() -> None:
    a = load_backbone("tiny-llama", seed=3)
    b = load_backbone("tiny-llama", seed=3)
    assert a.family == "llama" and a.hidden_size == 64
    for (na, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na
        assert not pa.requires_grad


def test_truncated_backbone_keeps_first_layers() -> None:
    full = load_backbone("tiny-llama")
    cut = load_backbone("tiny-llama", num_layers=1)
    assert cut.num_layers == 1 and len(cut.decoder().layers) == 1
    q_cut, q_full = cut.decoder().layers[0].self_attn.q_proj, full.decoder().layers[0].self_attn.q_proj
    assert torch.equal(q_cut.weight, q_full.weight)
    with pytest.raises(ValueError, match="num_layers"):
        load_backbone("tiny-llama", num_layers=5)


def test_unknown_lora_target_names_the_modules() -> None:
    features = make_features()
    with pytest.raises(ValueError, match="target_modules"):
        build_model("tiny-llama", tiny_settings(features), lora_targets=["query_key_value"])


def test_missing_local_model_folder_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="no model folder"):
        load_backbone("./no/such/model")


@pytest.mark.slow
def test_smollm2_loads_offline_and_scores_a_batch() -> None:
    features = make_features(n=25)
    model = build_model("smollm2-135m", tiny_settings(features, max_history=20))
    backbone = model._backbone
    assert backbone.family == "llama" and backbone.hidden_size == 576 and backbone.num_layers == 30
    # The real tokenizer: the template costs 14 tokens with SmolLM2's vocabulary.
    assert model.prompt.template_length == 14
    model.eval()
    with torch.no_grad():
        table = model.item_tokens(features, ["text", "vision", "sequence"])
        scores = model.score_candidates(torch.tensor([[1, 2, 3, 4, 5], [-1, -1, 6, 7, 8]]),
                                        torch.tensor([[9, 10, 11], [12, 13, 14]]), table)
    assert scores.shape == (2, 3) and torch.isfinite(scores).all()
    assert not torch.allclose(scores[0], scores[1])

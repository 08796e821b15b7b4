import numpy as np
import torch

from speeder.backbone import add_lora, load_backbone
from speeder.baselines.llara import LlaraRecommender
from speeder.baselines.popularity import Popularity
from speeder.metrics import target_rank
from speeder.prompt import PromptBuilder

TITLES = [f"Movie number {i} ({1990 + i % 10})" for i in range(30)]


def llara(behaviour: bool = True) -> LlaraRecommender:
    backbone = load_backbone("tiny-llama")
    add_lora(backbone, r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return LlaraRecommender(backbone, TITLES, torch.randn(30, 6) if behaviour else None)


def test_popularity_ranks_by_train_counts() -> None:
    pop = Popularity(5, np.array([0, 1, 1, 3, 3, 3]))
    assert pop.score_candidates(torch.tensor([[0, 3, 1]])).tolist() == [[1.0, 3.0, 2.0]]
    ranks = target_rank(pop.score_catalog(2), torch.tensor([3, 2]))
    assert ranks.tolist() == [0, 4]  # item 2 ties with item 4 at zero: ties count against it


def test_multi_token_prompt_spells_out_every_item() -> None:
    model = llara()
    history, cands = torch.tensor([[-1, 1, 2, 3]]), torch.tensor([[8, 9, 10]])
    ids, slots = model.prompt(history[0].tolist(), cands[0].tolist())
    # One behaviour slot per history item and per candidate, each right after that item's title.
    assert [item for _, item in slots] == [1, 2, 3, 8, 9, 10]
    for pos, item in slots:
        title = model.title_ids[item]
        assert ids[pos - len(title):pos] == title
    speeder_len = PromptBuilder(model._backbone.tokenizer).template_length + 3
    assert len(ids) > 4 * speeder_len


def test_answer_matching_needs_exactly_one_candidate() -> None:
    model = llara(behaviour=False)
    assert model.match(" Movie number 9 (1999)", [8, 9, 10]) == 9
    assert model.match("I would pick Movie number 9 (1999) or Movie number 8 (1998)", [8, 9, 10]) is None
    assert model.match("something else", [8, 9, 10]) is None


def test_training_lowers_the_answer_loss_and_generation_runs() -> None:
    torch.manual_seed(0)
    model = llara()
    history, cands, target = torch.tensor([[-1, 1, 2, 3], [4, 5, 6, 7]]), torch.tensor([[8, 9], [12, 13]]), \
        torch.tensor([9, 13])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = model(history, target, cands).item()
    for _ in range(25):
        loss = model(history, target, cands)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first - 0.3
    ranks = model.rank_candidates(history, cands, target)
    assert ranks.shape == (2,) and set(ranks.tolist()) <= {-1, 0, 1}

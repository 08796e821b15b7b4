"""Training (speeder/mpo.py, speeder/loop.py, SpeederModel.forward, speeder/checkpoint.py): MPO stages, losses,
negatives, checkpoints."""

import math

import numpy as np
import pytest
import torch

from speeder.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from speeder.loop import Samples, catalog_tokens, evaluate, fit, lr_factor, rank_targets, set_lr
from speeder.model import build_model
from speeder.mpo import STAGES, apply_stage, plan_stages
from speeder.mrc import ItemFeatures
from testkit.model import ALL, make_features, tiny_settings


def test_stage_one_leaves_vision_and_sequence_untouched(tiny_model, features) -> None:
    groups = apply_stage(tiny_model, STAGES[1], lr=1e-2, lora_lr=1e-2)
    assert {g["name"] for g in groups}.isdisjoint({"vision_adapter", "vision_expert", "vision_gate",
                                                   "sequence_adapter", "sequence_expert"})
    frozen = {n: p.detach().clone() for n, p in tiny_model.named_parameters()
              if any(k in n for k in ("vision", "sequence")) and n.startswith("mrc.")}
    text = {n: p.detach().clone() for n, p in tiny_model.named_parameters() if "adapters.text" in n}
    opt = torch.optim.AdamW(groups, weight_decay=0.1)
    batch = {"history": torch.tensor([[1, 2, 3], [4, 5, 6]]), "target": torch.tensor([7, 8]),
             "candidates": torch.tensor([[7, 1], [8, 2]])}
    from speeder.loop import train_step

    train_step(tiny_model, opt, batch, features, STAGES[1].modalities, step=0)
    assert frozen and all(torch.equal(p, dict(tiny_model.named_parameters())[n]) for n, p in frozen.items())
    assert any(not torch.equal(p, dict(tiny_model.named_parameters())[n]) for n, p in text.items())


def test_stage_plan_skips_vision_without_images() -> None:
    assert [s.index for s in plan_stages([1, 2, 3], {"text", "sequence"})] == [1, 3]
    assert [s.index for s in plan_stages([1, 2, 3], {"text", "vision", "sequence"})] == [1, 2, 3]
    assert [s.name for s in plan_stages([1, 2, 3], {"text"}, use_mpo=False)] == ["all"]


def test_checkpoint_round_trip_reproduces_scores(tmp_path, features) -> None:
    model = build_model("tiny-llama", tiny_settings(features), seed=1)
    with torch.no_grad():
        for p in model.trainable_state().values():
            p.add_(torch.randn_like(p) * 0.01)  # trained-looking weights, not the init
    model.eval()
    history, cands = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model.score_candidates(history, cands, model.item_tokens(features, ALL))
    save_checkpoint(tmp_path / "ckpt", model, {"stage": 3, "step": 12})
    fresh = build_model("tiny-llama", tiny_settings(features), seed=2)
    fresh.eval()
    with torch.no_grad():
        assert not torch.equal(fresh.score_candidates(history, cands, fresh.item_tokens(features, ALL)), expected)
    meta = load_checkpoint(tmp_path / "ckpt", fresh)
    assert meta["stage"] == 3 and meta["step"] == 12
    with torch.no_grad():
        assert torch.equal(fresh.score_candidates(history, cands, fresh.item_tokens(features, ALL)), expected)
    # Only trainable weights are stored: far fewer than the backbone holds.
    stored = sum(v.numel() for v in model.trainable_state().values())
    assert stored < sum(p.numel() for p in model.parameters()) / 2


def test_checkpoint_of_another_shape_is_refused(tmp_path, features) -> None:
    model = build_model("tiny-llama", tiny_settings(features))
    save_checkpoint(tmp_path / "c", model, {"stage": 1, "step": 0})
    other = build_model("tiny-llama", tiny_settings(features, mrc_hidden=64))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path / "c", other)
    (tmp_path / "c" / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete"):
        load_checkpoint(tmp_path / "c", model)


def successor_dataset(num_users: int = 50, num_items: int = 40, length: int = 8, seed: int = 0):
    """Users walk a fixed item -> successor permutation: the next item is a function of the last."""
    rng = np.random.default_rng(seed)
    successor = rng.permutation(num_items)
    histories, targets, candidates = [], [], []
    for _ in range(num_users):
        seq = [int(rng.integers(num_items))]
        for _ in range(length):
            seq.append(int(successor[seq[-1]]))
        for t in range(2, len(seq)):
            target = seq[t]
            negatives = rng.choice([i for i in range(num_items) if i != target], 19, replace=False)
            cands = rng.permutation(np.concatenate([[target], negatives]))
            histories.append(seq[max(0, t - 6):t])
            targets.append(target)
            candidates.append(cands)
    return Samples.from_rows(histories, targets, candidates, max_history=6)


def test_tiny_model_overfits_a_small_dataset() -> None:
    torch.manual_seed(0)
    features = make_features(n=40)
    train = successor_dataset()
    model = build_model("tiny-llama", tiny_settings(features, ppt_lambda=0.1), lora_dropout=0.0)
    opt = torch.optim.AdamW(apply_stage(model, STAGES[3], lr=1e-3, lora_lr=1e-3))
    fit(model, opt, train, features, ALL, epochs=12, batch_size=32, log_every=0)
    metrics = evaluate(model, train, features, ALL)
    assert metrics["cand_hr@1"] > 0.9, metrics
    ranks = rank_targets(model, train, catalog_tokens(model, features, ALL), active=ALL)
    target_pos = (train.candidates == train.target[:, None]).argmax(1)  # (S,)
    assert ((ranks["candidates"] == 0) == (ranks["first"] == target_pos)).all()  # a hit is the first choice


def test_candidate_loss_on_touched_items_matches_full_table(tiny_model, features) -> None:
    history = torch.tensor([[-1, 3, 4, 5], [0, 1, 2, 6]])
    target, cands = torch.tensor([7, 9]), torch.tensor([[7, 1, 30], [2, 9, 11]])
    out = tiny_model(history, target, cands, features, ALL)
    with torch.no_grad():
        table = tiny_model.item_tokens(features, ALL)
        scores = tiny_model.score_candidates(history, cands, table)
    expected = torch.nn.functional.cross_entropy(scores, torch.tensor([0, 1]))
    torch.testing.assert_close(out["rec_loss"], expected, rtol=1e-4, atol=1e-5)


def test_cached_negatives_match_the_full_softmax_when_fresh(tiny_model, features) -> None:
    from speeder.loop import NegativeCache

    tiny_model.eval()  # no dropout: both paths see the same tokens
    history, target = torch.tensor([[-1, 3, 4, 5], [0, 1, 2, 6]]), torch.tensor([7, 9])
    full = tiny_model(history, target, None, features, ALL)
    cache = NegativeCache(refresh_every=10)
    table = cache.get(tiny_model, features, ALL, step=0)
    cached = tiny_model(history, target, None, features, ALL, cached_table=table)
    torch.testing.assert_close(cached["rec_loss"], full["rec_loss"], rtol=1e-5, atol=1e-6)
    assert cache.get(tiny_model, features, ALL, step=9) is table  # not refreshed before 10 steps
    assert cache.get(tiny_model, features, ALL, step=10) is not table


def test_sampled_softmax_ranks_over_the_batch_items_and_the_negatives(tiny_model, features) -> None:
    from speeder.loop import loss_pool_inputs

    tiny_model.eval()  # no dropout: every path sees the same tokens
    history, target = torch.tensor([[-1, 3, 4, 5], [0, 1, 2, 6]]), torch.tensor([7, 9])
    n = features.num_items
    full = tiny_model(history, target, None, features, ALL)
    every = tiny_model(history, target, None, features, ALL, negatives=torch.arange(n))
    for key in ("rec_loss", "dense_loss"):  # every item a negative: the catalog softmax itself
        torch.testing.assert_close(every[key], full[key], rtol=1e-5, atol=1e-6)
    negatives = torch.tensor([20, 21, 9])
    sampled = tiny_model(history, target, None, features, ALL, negatives=negatives)
    pool = sorted({3, 4, 5, 0, 1, 2, 6, 7, 9, 20, 21})  # history, targets, negatives
    # a drawn item the batch does not touch (20, 21; 9 is a target) is in the pool with probability 3 / n
    offset = torch.tensor([math.log(n / 3) if i in (20, 21) else 0.0 for i in pool])
    with torch.no_grad():
        scores = tiny_model.score_catalog(history, tiny_model.item_tokens(features, ALL))[:, pool] + offset
    expected = torch.nn.functional.cross_entropy(scores, torch.tensor([pool.index(7), pool.index(9)]))
    torch.testing.assert_close(sampled["rec_loss"], expected, rtol=1e-4, atol=1e-5)
    assert float(sampled["rec_loss"]) < float(full["rec_loss"])  # fewer competitors than the catalog

    batch = {"history": history, "target": target, "candidates": torch.tensor([[7, 1], [9, 2]])}
    draw = lambda k, seed: loss_pool_inputs("sampled", batch, n, k, torch.Generator().manual_seed(seed))[1]  # noqa: E731
    assert len(set(draw(8, 0).tolist())) == 8 and draw(8, 0).tolist() == draw(8, 0).tolist()
    assert draw(8, 0).tolist() != draw(8, 1).tolist()
    assert sorted(draw(10 * n, 0).tolist()) == list(range(n))  # capped at the catalog, no repeats
    assert loss_pool_inputs("catalog", batch, n, 8, torch.Generator()) == (None, None)
    assert loss_pool_inputs("candidates", batch, n, 8, torch.Generator())[0] is batch["candidates"]
    with pytest.raises(ValueError, match="loss_pool"):
        loss_pool_inputs("softmax", batch, n, 8, torch.Generator())


def test_gate_lr_scale_speeds_up_only_the_vision_gate(tiny_model) -> None:
    lrs = {g["name"]: g["lr"] for g in apply_stage(tiny_model, STAGES[2], lr=1e-3, lora_lr=3e-4, gate_lr_scale=30)}
    assert lrs["vision_adapter"] == pytest.approx(1e-3) and lrs["vision_gate"] == pytest.approx(3e-2)
    assert lrs["text_adapter"] == pytest.approx(1e-4)  # earlier stages' groups at text_lr_scale 0.1
    lrs = {g["name"]: g["lr"] for g in apply_stage(tiny_model, STAGES[2], lr=1e-3, lora_lr=3e-4)}
    assert lrs["vision_gate"] == pytest.approx(1e-3)


def test_dense_loss_supervises_every_history_slot(features) -> None:
    # Without the readout skip the slot projection starts as the identity, so every slot's gradient shows.
    settings = tiny_settings(features, dense_weight=1.0, ppt_lambda=0.0, readout_skip=False)
    model = build_model("tiny-llama", settings, lora_dropout=0.0)
    history, target = torch.tensor([[-1, -1, 3, 4, 5], [0, 1, 2, 6, 8]]), torch.tensor([7, 9])
    table = model.item_tokens(features, ALL)
    hidden, batch = model.encode(history, table)
    hidden.retain_grad()
    logits, labels, real = model._slot_logits(hidden, batch, history, target, table, None)
    assert labels.tolist() == [4, 5, 7, 1, 2, 6, 8, 9]  # each slot's next item; the last slot's is the target
    assert logits.shape == (8, features.num_items) and real.sum() == 8
    torch.nn.functional.cross_entropy(logits, labels).backward()
    slot_grads = hidden.grad.norm(dim=-1)[batch.slot_items >= 0]  # (8,) one per real slot
    assert bool((slot_grads > 0).all())
    out = model(history, target, None, features, ALL)
    assert float(out["dense_loss"]) > 0 and torch.isclose(out["loss"], out["rec_loss"] + out["dense_loss"])


def test_distillation_pulls_towards_the_teacher(features) -> None:
    model = build_model("tiny-llama", tiny_settings(features, dense_weight=0.0, distill_weight=1.0, ppt_lambda=0.0))
    history, target = torch.tensor([[-1, 3, 4, 5]]), torch.tensor([7])
    uniform = torch.zeros(1, 4, features.num_items)
    peaked = uniform.clone()
    peaked[..., 11] = 30.0
    flat = model(history, target, None, features, ALL, teacher_logits=uniform)["distill_loss"]
    sharp = model(history, target, None, features, ALL, teacher_logits=peaked)["distill_loss"]
    assert float(sharp) > float(flat) >= 0.0  # KL(teacher || model): a peaked teacher the model ignores costs more
    with pytest.raises(ValueError, match="catalog softmax"):
        model(history, target, torch.tensor([[7, 1, 2]]), features, ALL, teacher_logits=uniform)  # 7 is there


def test_candidate_loss_refuses_a_target_outside_the_candidates(tiny_model, features) -> None:
    with pytest.raises(ValueError, match="target 7 of sample 0 is not among its candidates"):
        tiny_model(torch.tensor([[1, 2, 3]]), torch.tensor([7]), torch.tensor([[1, 2, 3]]), features, ALL)


def test_sequence_dropout_hides_seq_emb_of_items_that_keep_another_modality(features) -> None:
    model = build_model("tiny-llama", tiny_settings(features, sequence_dropout=0.5))
    only_sequence = torch.arange(features.num_items) < 5  # these items have nothing else: never hidden
    partly = ItemFeatures(**{**vars(features), "text_mask": ~only_sequence,
                             "image_mask": features.image_mask & ~only_sequence})
    dropped = model._drop_sequences(partly, ALL, torch.Generator().manual_seed(0))
    hidden = partly.sequence_mask & ~dropped.sequence_mask
    assert not bool(hidden[only_sequence].any())
    assert 0.25 < float(hidden[~only_sequence].float().mean()) < 0.75
    assert torch.equal(dropped.text, partly.text) and torch.equal(dropped.sequence, partly.sequence)
    with pytest.raises(ValueError, match="sequence_dropout"):
        tiny_settings(features, sequence_dropout=1.0)


def test_lr_schedule_warms_up_then_decays_and_is_a_function_of_the_step() -> None:
    assert [lr_factor("constant", s, 10) for s in range(12)] == [1.0] * 12
    cosine = [lr_factor("cosine", s, 20, warmup=0.1) for s in range(20)]
    assert cosine[:3] == [0.5, 1.0, 1.0]  # two warmup steps, then the cosine from 1
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:], strict=False))  # strictly falling after warmup
    assert 0.0 < cosine[-1] < 0.01  # towards 0, no step wasted at 0
    assert lr_factor("cosine", 25, 20, warmup=0.1) == cosine[-1]  # past the plan: the last value
    assert lr_factor("cosine", 0, 20) == 1.0  # no warmup
    with pytest.raises(ValueError, match="linear"):
        lr_factor("linear", 0, 10)
    with pytest.raises(ValueError, match="warmup"):
        lr_factor("cosine", 0, 10, warmup=1.0)


def test_fit_trains_at_the_scheduled_lr(features) -> None:
    model = build_model("tiny-llama", tiny_settings(features), seed=0)
    groups = apply_stage(model, STAGES[1], lr=1e-2, lora_lr=1e-2)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    rng = np.random.default_rng(0)
    targets = rng.integers(0, features.num_items, 8).tolist()
    samples = Samples.from_rows([rng.integers(0, features.num_items, 4).tolist() for _ in range(8)], targets,
                                [[t, *rng.integers(0, features.num_items, 4).tolist()] for t in targets],
                                max_history=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    seen = []
    # Factor 0 at every step: AdamW without weight decay then moves nothing.
    fit(model, opt, samples, features, STAGES[1].modalities, epochs=1, batch_size=4, loss_pool="candidates",
        log_every=0, lr_at=lambda step: seen.append(step) or 0.0)
    assert seen == [0, 1]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert [g["lr"] for g in opt.param_groups] == [0.0] * len(groups)
    assert [g["initial_lr"] for g in opt.param_groups] == [1e-2] * len(groups)  # the base survives
    fit(model, opt, samples, features, STAGES[1].modalities, epochs=1, batch_size=4, loss_pool="candidates",
        log_every=0, lr_at=lambda step: 0.5)
    assert [g["lr"] for g in opt.param_groups] == [5e-3] * len(groups)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    set_lr(opt, 1.0)
    assert [g["lr"] for g in opt.param_groups] == [1e-2] * len(groups)

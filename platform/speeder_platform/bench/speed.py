"""`speeder bench speed`: Speeder against the multi-token (LLaRA-style) baseline, same backbone, one run.

    speeder bench speed --out runs/bench/speed.json                 # SmolLM2-135M on ML-100K, history 20
    speeder bench speed --backbone tiny-llama --train-steps 2       # a quick check of the harness

Both systems use the same backbone, LoRA settings, data, batch size and machine. Each is measured in a
fresh process (so peak memory is its own): prompt tokens per sample, training samples/s (teacher
forcing for the baseline, the candidate softmax for Speeder), and inference users/s for the
20-candidate protocol and for the whole catalog (Speeder: one forward pass and a dot product with
the cached item tokens; baseline: prompt + greedy generation of a title, matched to the candidates).
Item features are random vectors with the default encoders' sizes: speed does not depend on their
values. The JSON holds `tokens_per_sample`, `train_speedup` and `infer_speedup` (Speeder / baseline)
and the raw figures, plus a profile of where Speeder's training step spends its time.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from speeder.defaults import SAMPLED_NEGATIVES

log = logging.getLogger("speeder.bench")

DEFAULT_DATASET = "runs/bench/ml100k"
FEATURE_DIMS = {"text": 384, "vision": 0, "sequence": 64}  # MiniLM, no images (MovieLens), SASRec


def _ensure_dataset(uri: str) -> None:
    from speeder_platform import storage
    from speeder_platform.config import load_config
    from speeder_platform.data.prepare import prepare_dataset

    if not storage.exists(storage.join(uri, "meta.json")):
        log.info("preparing ML-100K at %s", uri)
        prepare_dataset(load_config(None, ["prepare.source=movielens-100k"]).prepare, uri)


def _features(n: int, seed: int = 0):
    from speeder.mrc import ItemFeatures

    g = torch.Generator().manual_seed(seed)
    return ItemFeatures(
        text=torch.randn(n, FEATURE_DIMS["text"], generator=g), text_mask=torch.ones(n, dtype=torch.bool),
        image=torch.zeros(n, 0), image_mask=torch.zeros(n, dtype=torch.bool),
        sequence=torch.randn(n, FEATURE_DIMS["sequence"], generator=g), sequence_mask=torch.ones(n, dtype=torch.bool),
    )


def _timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@dataclass
class _Inputs:
    """What both systems are timed on: the backbone with LoRA, train and inference batches, the catalog."""

    backbone: Any
    items: Any  # the items table (pyarrow)
    train: Any  # Samples, the train subset
    test: Any  # Samples, the test subset
    batches: list[dict[str, torch.Tensor]]
    ibatches: list[dict[str, torch.Tensor]]


def _inputs(args: dict[str, Any]) -> _Inputs:
    from speeder.backbone import add_lora, load_backbone
    from speeder.defaults import LORA_TARGETS
    from speeder_platform import storage
    from speeder_platform.tables import load_samples

    h = args["history"]
    test = load_samples(args["dataset"], "test", h)
    train = load_samples(args["dataset"], "train", h)
    items = storage.read_table(storage.join(args["dataset"], "items.parquet"))
    backbone = load_backbone(args["backbone"], num_layers=args.get("num_layers"))
    add_lora(backbone, r=8, alpha=16, dropout=0.0, target_modules=list(LORA_TARGETS))
    rng = np.random.default_rng(0)
    bt, bi = args["train_batch"], args["infer_batch"]
    tr = train.subset(rng.choice(len(train), bt * (args["train_steps"] + 1), replace=False))
    te = test.subset(rng.choice(len(test), bi * (args["infer_batches"] + 1), replace=False))
    return _Inputs(backbone, items, tr, te, list(tr.batches(bt)), list(te.batches(bi)))


def _cycle(batches: list) -> Any:
    """A function returning the next batch, round and round."""
    it = iter(range(10**9))
    return lambda: batches[next(it) % len(batches)]


def measure(system: str, args: dict[str, Any]) -> dict[str, Any]:
    """Measure one system in this process (called in a fresh process by `run_bench_speed`)."""
    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    inputs = _inputs(args)
    out: dict[str, Any] = {"system": system, **(_measure_speeder if system == "speeder" else _measure_llara)(
        inputs, args)}
    bt, bi = args["train_batch"], args["infer_batch"]
    out["train_samples_per_s"] = bt / out["train_step_s"]
    out["train_targets_per_s"] = out["train_samples_per_s"] * out["targets_per_sample"]
    out["infer_candidates_users_per_s"] = bi / out["infer_candidates_s"]
    out["infer_catalog_users_per_s"] = bi / out["infer_catalog_s"]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _measure_speeder(inputs: _Inputs, args: dict[str, Any]) -> dict[str, Any]:
    """Speeder's train step (the trainer's model, optimizer groups and negative-cache setting), its catalog
    tokens, candidate and full-catalog inference, and where a forward pass goes."""
    from speeder.loop import NegativeCache, train_step
    from speeder.model import SpeederModel
    from speeder.mpo import STAGES
    from speeder.sasrec import SASRec
    from speeder_platform.config import load_config
    from speeder_platform.modeling import settings_from_config, stage_groups

    out: dict[str, Any] = {}
    n = inputs.items.num_rows
    active = ["text", "sequence"]
    features = _features(n)
    # The trainer's model and optimizer settings (config defaults), so the bench times what users train.
    cfg = load_config(None, [f"model.max_history={args['history']}"])
    settings = settings_from_config(cfg.model, features.dims())
    encoder = SASRec(n, hidden_size=FEATURE_DIMS["sequence"], max_length=50) if settings.sequence_user else None
    model = SpeederModel(inputs.backbone, settings, encoder)
    opt = torch.optim.AdamW(stage_groups(model, STAGES[3], cfg.trainer), weight_decay=cfg.trainer.weight_decay)
    # Supervised next-item targets per sample: the final position, and with the dense loss every history slot.
    real = (torch.from_numpy(inputs.train.history) >= 0).sum(1).float()
    out["targets_per_sample"] = float((1 + (real if settings.dense_weight else 0)).mean())
    lengths = (torch.from_numpy(inputs.test.history) >= 0).sum(1) + model.prompt.template_length
    out["tokens_per_sample"] = float(lengths.float().mean())
    # The trainer's negative cache setting (default 0: every step passes the whole catalog through MRC
    # with gradients); with a cache, its refresh cost is amortised over `refresh_every` steps.
    refresh_every = args["negative_cache_steps"]
    cache = NegativeCache(refresh_every)
    refresh = 0.0
    if refresh_every > 0:
        cache.get(model, features, active, 0)
        t0 = time.perf_counter()
        cache.get(model, features, active, refresh_every)
        refresh = (time.perf_counter() - t0) / refresh_every
    batch = _cycle(inputs.batches)
    out["train_step_s"] = refresh + _timed(
        lambda: train_step(model, opt, batch(), features, active, step=0, loss_pool=args["loss_pool"], cache=cache,
                           negatives=args["sampled_negatives"]),
        args["train_steps"])
    model.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        table = model.item_tokens(features, active)
        out["catalog_tokens_s"] = time.perf_counter() - t0  # once per checkpoint, not per user
        ibatch = _cycle(inputs.ibatches)

        def cand() -> None:
            b = ibatch()
            model.score_candidates(b["history"], b["candidates"], table)

        out["infer_candidates_s"] = _timed(cand, args["infer_batches"])
        out["infer_catalog_s"] = _timed(lambda: model.score_catalog(ibatch()["history"], table),
                                        args["infer_batches"])
        # Where a training step's forward time goes: MRC over the items vs the LLM.
        b = inputs.batches[0]
        out["profile_forward_s"] = {
            "mrc_item_tokens": _timed(lambda: model.item_tokens(features, active), 2),
            "llm_forward": _timed(lambda: model.encode(b["history"], table), 2),
        }
    return out


def _measure_llara(inputs: _Inputs, args: dict[str, Any]) -> dict[str, Any]:
    """The LLaRA-style baseline (items spelled out as titles): teacher-forced train step, candidate ranking,
    and generation + title matching over the catalog."""
    from speeder.baselines.llara import LlaraRecommender

    out: dict[str, Any] = {}
    n = inputs.items.num_rows
    te = inputs.test
    titles = inputs.items.column("title").to_pylist()
    model = LlaraRecommender(inputs.backbone, titles, torch.randn(n, FEATURE_DIMS["sequence"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4)
    lengths = [len(model.prompt(hh.tolist(), c.tolist())[0]) for hh, c in zip(te.history, te.candidates, strict=True)]
    out["tokens_per_sample"] = float(np.mean(lengths))
    out["targets_per_sample"] = 1.0  # one answer (a title) per prompt
    out["catalog_tokens_per_sample"] = float(np.mean([len(model.prompt(hh.tolist(), None)[0]) for hh in te.history]))
    batch = _cycle(inputs.batches)

    def train_once() -> None:
        b = batch()
        model.train()
        loss = model(b["history"], b["target"], b["candidates"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()

    out["train_step_s"] = _timed(train_once, args["train_steps"])
    model.eval()
    ibatch = _cycle(inputs.ibatches)

    def cand() -> None:
        b = ibatch()
        model.rank_candidates(b["history"], b["candidates"], b["target"])

    def full() -> None:
        for answer in model.generate(ibatch()["history"], None):
            model.match(answer, range(n))

    out["infer_candidates_s"] = _timed(cand, args["infer_batches"])
    out["infer_catalog_s"] = _timed(full, args["infer_batches"])
    return out


def run_bench_speed(*, backbone: str = "smollm2-135m", num_layers: int | None = None, dataset: str = DEFAULT_DATASET,
                    history: int = 20, train_batch: int = 4, train_steps: int = 3, infer_batch: int = 8,
                    infer_batches: int = 3, threads: int = 2, loss_pool: str = "catalog",
                    negative_cache_steps: int | None = None,
                    sampled_negatives: int = SAMPLED_NEGATIVES) -> dict[str, Any]:
    """Measure both systems (each in a fresh process) and compute the ratios.

    negative_cache_steps: Speeder's catalog-token cache (None: the trainer's default, see TrainerConfig).
    """
    if negative_cache_steps is None:
        from speeder_platform.config import TrainerConfig

        negative_cache_steps = TrainerConfig().negative_cache_steps
    _ensure_dataset(dataset)
    args = {"backbone": backbone, "num_layers": num_layers, "dataset": dataset, "history": history,
            "train_batch": train_batch, "train_steps": train_steps, "infer_batch": infer_batch,
            "infer_batches": infer_batches, "threads": threads, "loss_pool": loss_pool,
            "negative_cache_steps": negative_cache_steps, "sampled_negatives": sampled_negatives}
    results = {}
    for system in ("speeder", "llara"):
        log.info("measuring %s (%s)...", system, backbone)
        results[system] = _in_fresh_process(system, args, threads)
    s, b = results["speeder"], results["llara"]
    report = {
        "settings": args,
        "tokens_per_sample": {"speeder": s["tokens_per_sample"], "baseline": b["tokens_per_sample"],
                              "ratio": b["tokens_per_sample"] / s["tokens_per_sample"]},
        "train_speedup": s["train_samples_per_s"] / b["train_samples_per_s"],
        "train_targets_speedup": s["train_targets_per_s"] / b["train_targets_per_s"],
        "infer_speedup": s["infer_candidates_users_per_s"] / b["infer_candidates_users_per_s"],
        "infer_speedup_catalog": s["infer_catalog_users_per_s"] / b["infer_catalog_users_per_s"],
        "speeder": s,
        "baseline": b,
    }
    return report


def format_report(r: dict[str, Any]) -> str:
    s, b = r["speeder"], r["baseline"]
    rows = [
        ("prompt tokens / sample", f"{s['tokens_per_sample']:.1f}", f"{b['tokens_per_sample']:.1f}",
         f"{r['tokens_per_sample']['ratio']:.1f}x fewer"),
        ("train samples/s", f"{s['train_samples_per_s']:.2f}", f"{b['train_samples_per_s']:.2f}",
         f"{r['train_speedup']:.1f}x"),
        ("supervised next-item targets/s in training", f"{s['train_targets_per_s']:.1f}",
         f"{b['train_targets_per_s']:.2f}", f"{r['train_targets_speedup']:.0f}x"),
        ("infer users/s (20 candidates)", f"{s['infer_candidates_users_per_s']:.2f}",
         f"{b['infer_candidates_users_per_s']:.2f}", f"{r['infer_speedup']:.1f}x"),
        ("infer users/s (whole catalog)", f"{s['infer_catalog_users_per_s']:.2f}",
         f"{b['infer_catalog_users_per_s']:.2f}", f"{r['infer_speedup_catalog']:.1f}x"),
        ("peak RSS MB", f"{s['peak_rss_mb']:.0f}", f"{b['peak_rss_mb']:.0f}", ""),
    ]
    lines = ["| | Speeder | multi-token baseline | Speeder / baseline |", "|---|---|---|---|"]
    lines += [f"| {a} | {x} | {y} | {z} |" for a, x, y, z in rows]
    prof = s.get("profile_forward_s", {})
    if prof:
        lines.append(f"\nSpeeder forward, per training batch: MRC over the catalog {prof['mrc_item_tokens']:.3f}s, "
                     f"LLM {prof['llm_forward']:.3f}s; catalog item tokens once per checkpoint "
                     f"{s['catalog_tokens_s']:.2f}s")
    return "\n".join(lines)


def _in_fresh_process(system: str, args: dict[str, Any], threads: int) -> dict[str, Any]:
    """`measure(system, args)` in a freshly spawned interpreter (nothing loaded or cached by the other
    system, its own peak RSS), with OMP_NUM_THREADS set before torch is imported there."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the spawned child inherits the environment at start
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(measure, system, args).result()
    except Exception as err:
        raise RuntimeError(f"bench speed: measuring {system} failed: {err}") from err
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved

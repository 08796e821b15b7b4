"""`speeder bench quality`: test-split accuracy of Speeder, its ablations and the baselines, one table.

    speeder bench quality --dataset synthetic                 # a few minutes: tiny-llama, real features
    speeder bench quality --dataset ml100k                    # SmolLM2-135M (first 8 layers), well under 1 h
    speeder bench quality --dataset both --out runs/bench/quality

Per dataset (ML-100K and the synthetic multimodal catalog, DESIGN 3.3), on the same splits and the same
20 candidates for every model:
- Popularity, SASRec (featurize's, loaded), the multi-token LLaRA-style baseline (same backbone and
  LoRA as Speeder; small stated budget, evaluated on a seeded subset of test users: it generates), and
  Speeder with its ablations: no PPT, no PPL, no MPO (every modality from the start), text only,
  no vision, no sequence (text + vision). Every variant gets the full model's optimiser steps. A
  variant identical to one already trained on a catalog (no vision = Speeder and no sequence = text
  only on ML-100K: no images) is not trained twice.
- Cold start: 10% of the items held out of training entirely; HR@1 on test samples whose target is
  one of them (Speeder ranks them by content; SASRec has only an untrained id embedding).
- Missing modalities: 30% of the images (when the catalog has them) or texts masked at test time.
Speeder trains with the single-process loop (`bench_quality_models`); features come from the
project's featurize (made if missing). Writes results.md, results.json and PNG plots under --out.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from speeder.loop import Samples, catalog_tokens, rank_targets
from speeder_platform import storage
from speeder_platform.baselines_eval import (
    evaluate_baselines,
    metrics_from_ranks,
    popularity_from_sequences,
    rank_with,
    sasrec_scorer,
    train_item_counts,
)
from speeder_platform.bench_quality_data import (
    FEATURES_NAME,
    BenchData,
    bench_config,
    cold_sasrec,
    cold_start,
    load_bench_data,
    mask_modality,
    with_sequence,
)
from speeder_platform.bench_quality_models import (
    VARIANTS,
    Budget,
    TrainedSpeeder,
    build_llara,
    llara_ranks,
    model_config,
    plan_for,
    train_llara,
    train_speeder,
    valid_subset,
)

log = logging.getLogger("speeder.bench")

MAX_HISTORY = 20  # the protocol's default (DESIGN 3.2)
PARTS = ("llara", "cold-start", "missing")


@dataclass
class DatasetSetup:
    """How the bench runs on one dataset: where it lives, how it is made, the model and the budgets."""

    source: str
    uri: str
    prepare: list[str]
    backbone: str
    num_layers: int | None
    budget: Budget
    threads: int
    mrc: list[str] = field(default_factory=list)


def default_setups(args: argparse.Namespace) -> dict[str, DatasetSetup]:
    """Budgets sized for 2 CPU cores: synthetic in a few minutes, ML-100K well under an hour."""
    return {
        "synthetic": DatasetSetup(
            source="synthetic", uri=args.synthetic_data,
            prepare=[f"prepare.synthetic.num_users={args.synthetic_users}", "prepare.synthetic.image_size=32"],
            backbone=args.synthetic_backbone, num_layers=None, threads=1,  # tiny models: 1 thread is fastest
            # jobs/smoke.yaml's MRC for the tiny backbone (d=64): wider MRCs made its training spike and stall.
            mrc=["model.mrc.hidden_size=64", "model.mrc.num_layers=1"],
            # lr 3e-4: at the trainer's 1e-3 this tiny setup spiked or stalled at chance on some seeds.
            budget=Budget(steps=300, batch_size=32, lr=3e-4, valid_users=0, llara_steps=40, llara_batch_size=8,
                          llara_eval_users=300)),
        "ml100k": DatasetSetup(
            source="movielens-100k", uri=args.ml100k_data, prepare=[],
            backbone=args.backbone, num_layers=args.num_layers, threads=2,
            budget=Budget(steps=250, batch_size=16, valid_users=200, llara_steps=40, llara_batch_size=4,
                          llara_eval_users=150)),
    }


def apply_overrides(setup: DatasetSetup, args: argparse.Namespace) -> DatasetSetup:
    """Command-line budgets replace the dataset's defaults."""
    for option, name in (("steps", "steps"), ("batch_size", "batch_size"), ("valid_users", "valid_users"), ("lr", "lr"),
                         ("llara_steps", "llara_steps"), ("llara_eval_users", "llara_eval_users")):
        value = getattr(args, option)
        if value is not None:
            setattr(setup.budget, name, value)
    if args.threads is not None:
        setup.threads = args.threads
    return setup


# -- one dataset -------------------------------------------------------------------------------------
def speeder_ranks(trained: TrainedSpeeder, samples: Samples, features: Any) -> dict[str, np.ndarray]:
    """Both protocols' ranks of a trained Speeder on `samples` (catalog tokens computed once)."""
    return rank_targets(trained.model, samples, catalog_tokens(trained.model, features, trained.active),
                        active=trained.active)


def _effective(cfg: Any, data: BenchData) -> tuple:
    """What makes two variants the same model on this catalog."""
    return (tuple(s.index for s in plan_for(cfg, data.features)),
            tuple(sorted(set(cfg.modalities) & data.available)), cfg.use_ppl, cfg.ppt_lambda)


def equal_compute_steps(base: list[str], cfg: Any, features: Any, budget: Budget) -> int:
    """Steps per stage for `cfg` so it spends the full model's total (budget.steps in each of the full
    model's MPO stages) over the stages it runs: no MPO and text only put it all in one stage."""
    full_stages = len(plan_for(model_config(base, []), features))
    return math.ceil(budget.steps * full_stages / len(plan_for(cfg, features)))


def run_variants(data: BenchData, base: list[str], names: list[str], budget: Budget,
                 seed: int) -> tuple[dict[str, dict], dict[str, list], TrainedSpeeder | None]:
    """Train and test every Speeder variant; -> rows, training curves, the trained full Speeder."""
    rows, curves, speeder = {}, {}, None
    trained_as: dict[tuple, str] = {_effective(model_config(base, []), data): "Speeder"}  # effective model -> row
    for name in names:
        cfg = model_config(base, VARIANTS[name])
        effective = _effective(cfg, data)
        same = trained_as.get(effective)
        if name != "Speeder" and same is not None:
            rows[name] = {"same_as": same, "note": f"identical to {same} on this catalog (nothing to ablate)"}
            continue
        trained_as[effective] = name
        log.info("== %s on %s: %s", name, data.name, ", ".join(VARIANTS[name]) or "the full model")
        steps = equal_compute_steps(base, cfg, data.features, budget)
        trained = train_speeder(cfg, data.train, valid_subset(data.valid, budget.valid_users, seed), data.features,
                                budget, seed, steps_per_stage=steps)
        t0 = time.perf_counter()
        ranks = speeder_ranks(trained, data.test, data.features)
        rows[name] = {"metrics": metrics_from_ranks(ranks), "ranks": ranks, "test_users": len(data.test),
                      "train_seconds": round(sum(s["train_seconds"] for s in trained.stages), 1),
                      "eval_seconds": round(time.perf_counter() - t0, 1),
                      "stages": [s["stage"] for s in trained.stages], "modalities": trained.active}
        curves[name] = trained.stages
        if name == "Speeder":
            speeder = trained
    return rows, curves, speeder


def run_llara(data: BenchData, base: list[str], budget: Budget, seed: int,
              speeder: dict | None) -> tuple[dict, list]:
    """The multi-token baseline: train on its budget, evaluate on a seeded subset of test users."""
    log.info("== LLaRA-style multi-token baseline on %s: %d steps x %d", data.name, budget.llara_steps,
             budget.llara_batch_size)
    behaviour = data.features.sequence if data.features.sequence.shape[1] else None
    model = build_llara(model_config(base, []), data.titles, behaviour, seed)
    t0 = time.perf_counter()
    curve = train_llara(model, data.train, budget, seed)
    train_seconds = time.perf_counter() - t0
    index = np.arange(len(data.test))
    if budget.llara_eval_users and budget.llara_eval_users < len(data.test):
        index = np.sort(np.random.default_rng([seed, 5]).choice(len(data.test), budget.llara_eval_users,
                                                                replace=False))
    t0 = time.perf_counter()
    metrics = metrics_from_ranks({"candidates": llara_ranks(model, data.test.subset(index))})
    row = {"metrics": metrics, "test_users": len(index), "train_seconds": round(train_seconds, 1),
           "eval_seconds": round(time.perf_counter() - t0, 1)}
    if speeder is not None and len(index) < len(data.test):  # Speeder on the very same users, for a paired view
        same = metrics_from_ranks({"candidates": speeder["ranks"]["candidates"][index]})
        row["speeder_same_users"] = {k: same[k] for k in ("cand_hr@1", "cand_vhr@1")}
    return row, [{"stage": 0, "name": "teacher forcing", "curve": curve}]


def run_cold_start(data: BenchData, base: list[str], budget: Budget, seed: int, fraction: float,
                   threads: int) -> dict[str, Any]:
    """Hold `fraction` of the items out of training; HR@1 on test targets among them vs the rest.

    Two Speeders train on the warm items: the full model (held-out items then lack only seq_emb) and one
    on content tokens alone (text, and images where the catalog has them), which sees every item alike.
    """
    log.info("== cold start on %s: %.0f%% of the items held out of training", data.name, 100 * fraction)
    cold = cold_start(data, fraction, seed, MAX_HISTORY)
    sasrec, info = cold_sasrec(data, cold, num_threads=threads)
    torch.set_num_threads(threads)
    features = with_sequence(data.features, sasrec, info.pop("present"))
    warm = features.select(torch.from_numpy(cold.warm))
    content = [m for m in ("text", "vision") if m in data.available]
    speeders = {"Speeder": [], f"Speeder, content tokens only ({' + '.join(content)})":
                [f"model.modalities=[{','.join(content)}]"]}
    ranks, seconds = {}, {}
    for name, overrides in speeders.items():
        cfg = model_config(base, overrides)
        trained = train_speeder(cfg, cold.train, None, warm, budget, seed,
                                steps_per_stage=equal_compute_steps(base, cfg, warm, budget))
        ranks[name], seconds[name] = speeder_ranks(trained, data.test, features), round(trained.seconds, 1)
    sequences, num_items = train_item_counts(data.uri)
    popularity = popularity_from_sequences([s[~cold.is_held_out(s)] for s in sequences], num_items)
    ranks["SASRec"] = rank_with(sasrec_scorer(sasrec), data.test)
    ranks["Popularity"] = rank_with(lambda h: popularity.score_catalog(len(h)), data.test)
    is_cold = cold.is_held_out(data.test.target)
    models = {name: {"cold": metrics_from_ranks({k: v[is_cold] for k, v in r.items()}),
                     "warm": metrics_from_ranks({k: v[~is_cold] for k, v in r.items()})} for name, r in ranks.items()}
    return {"held_out_items": len(cold.held_out), "items": data.num_items, "train_samples": len(cold.train),
            "test_cold": int(is_cold.sum()), "test_warm": int((~is_cold).sum()), "sasrec": info,
            "speeder_train_seconds": seconds, "models": models}


def run_missing(data: BenchData, speeder: TrainedSpeeder, reference: dict[str, float], rate: float,
                seed: int) -> dict[str, Any]:
    """Mask `rate` of the images (if any) and of the texts at test time; the trained Speeder's drop."""
    out = {}
    for modality in [m for m in ("vision", "text") if m in speeder.active]:
        masked, counts = mask_modality(data.features, modality, rate, seed, speeder.active)
        metrics = metrics_from_ranks(speeder_ranks(speeder, data.test, masked))
        out[modality] = {**counts, "metrics": metrics,
                         "drop": {k: reference[k] - metrics[k] for k in ("cand_hr@1", "full_hr@10", "full_ndcg@10")}}
        log.info("missing %s (%d of %d items): HR@1 %.4f (drop %.4f)", modality, counts["masked"], counts["had"],
                 metrics["cand_hr@1"], out[modality]["drop"]["cand_hr@1"])
    return out


def run_dataset(name: str, setup: DatasetSetup, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.set_num_threads(setup.threads)
    cfg = bench_config(setup.uri, setup.source, setup.prepare, args.features_name)
    data = load_bench_data(name, cfg, MAX_HISTORY)
    base = [f"model.backbone={setup.backbone}", f"model.max_history={MAX_HISTORY}", *setup.mrc,
            *([f"model.num_layers={setup.num_layers}"] if setup.num_layers else [])]
    budget, seed = setup.budget, args.seed
    from speeder_platform.featurize import features_dir
    from speeder_platform.featurize_seq import load_sasrec, sasrec_dir

    sasrec, sasrec_meta = load_sasrec(sasrec_dir(features_dir(cfg)))
    sequences, num_items = train_item_counts(data.uri)
    rows: dict[str, dict] = {k: {"metrics": v, "test_users": len(data.test)} for k, v in evaluate_baselines(
        data.test, popularity_from_sequences(sequences, num_items), sasrec).items()}
    rows["SASRec"]["train_seconds"] = round(sum(s["seconds"] for s in sasrec_meta.get("stats", [])), 1)
    variants, curves, speeder = run_variants(data, base, args.variants, budget, seed)
    rows.update(variants)
    result: dict[str, Any] = {"source": setup.source, "uri": setup.uri, "backbone": setup.backbone,
                              "num_layers": setup.num_layers, "threads": setup.threads, "budget": budget.to_dict(),
                              "data": data_info(data), "sasrec": {"epochs": len(sasrec_meta.get("stats", [])),
                                                                  "hparams": sasrec_meta["hparams"]}}
    if "llara" not in args.skip:
        rows["LLaRA-style"], curves["LLaRA-style"] = run_llara(data, base, budget, seed, rows.get("Speeder"))
    if "missing" not in args.skip and speeder is not None:
        result["missing"] = run_missing(data, speeder, rows["Speeder"]["metrics"], args.missing_rate, seed)
    if "cold-start" not in args.skip:
        result["cold_start"] = run_cold_start(data, base, budget, seed, args.cold_fraction, setup.threads)
    checks = modality_checks(rows)
    for row in rows.values():
        row.pop("ranks", None)
    result.update(models=rows, curves=curves, checks=checks, seconds=round(time.perf_counter() - t0))
    return result


def data_info(data: BenchData) -> dict[str, Any]:
    return {"items": data.num_items, "train": len(data.train), "valid": len(data.valid), "test": len(data.test),
            "modalities": sorted(data.available), "items_with_image": int(data.features.image_mask.sum()),
            "featurize": data.info.get("featurize")}


def modality_checks(rows: dict[str, dict]) -> dict[str, Any]:
    """Does each modality add accuracy? Speeder vs no vision (vision beside text and ids), no sequence vs
    text only (vision where no item ids are known: content alone), no vision vs text only (sequence).

    The gain in HR@1 comes with a paired 95% interval: both models answer the same test users, so the
    standard error is that of the per-user difference of hits.
    """
    out = {}
    for check, with_it, without in (("vision_adds", "Speeder", "no vision"),
                                    ("vision_adds_to_text", "no sequence", "text only"),
                                    ("sequence_adds", "no vision", "text only")):
        a, b = rows.get(with_it, {}).get("ranks"), rows.get(without, {}).get("ranks")
        if a is None or b is None:
            continue
        diff = (a["candidates"] == 0).astype(float) - (b["candidates"] == 0).astype(float)  # (S,) in {-1, 0, 1}
        gain, half = float(diff.mean()), float(1.96 * diff.std(ddof=1) / np.sqrt(len(diff)))
        out[check] = {"with": with_it, "without": without, "hr@1_with": float((a["candidates"] == 0).mean()),
                      "hr@1_without": float((b["candidates"] == 0).mean()), "gain": gain, "ci95": half,
                      "holds": gain > 0, "significant": gain - half > 0}
    return out


# -- command line ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="speeder bench quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=("ml100k", "synthetic", "both"), default="both")
    p.add_argument("--out", default="runs/bench/quality", help="results.md, results.json and PNG plots")
    p.add_argument("--ml100k-data", default="runs/bench/ml100k", help="ML-100K dataset (prepared if missing)")
    p.add_argument("--synthetic-data", default="runs/bench/synthetic", help="synthetic dataset (made if missing)")
    p.add_argument("--features-name", default=FEATURES_NAME, help="features/<name> to use or make; `default` "
                   "reuses a job's features made with the same encoders")
    p.add_argument("--synthetic-users", type=int, default=1000, help="users of a newly made synthetic set")
    p.add_argument("--backbone", default="smollm2-135m", help="ML-100K backbone (Speeder and LLaRA)")
    p.add_argument("--num-layers", type=int, default=8, help="ML-100K: keep the backbone's first N layers")
    p.add_argument("--synthetic-backbone", default="tiny-llama", help="synthetic-set backbone")
    p.add_argument("--variants", default=",".join(VARIANTS), help="Speeder variants, comma-separated")
    p.add_argument("--skip", default="", help=f"parts to skip, comma-separated: {', '.join(PARTS)}")
    p.add_argument("--steps", type=int, help="Speeder optimiser steps per MPO stage (default per dataset)")
    p.add_argument("--batch-size", type=int, help="Speeder batch size (default per dataset)")
    p.add_argument("--lr", type=float, help="Speeder MRC/PPL/head learning rate (default per dataset)")
    p.add_argument("--valid-users", type=int, help="stage-end validation users (0: all; default per dataset)")
    p.add_argument("--llara-steps", type=int, help="LLaRA training steps (default per dataset)")
    p.add_argument("--llara-eval-users", type=int, help="LLaRA test users (0: all; default per dataset)")
    p.add_argument("--cold-fraction", type=float, default=0.1, help="share of items held out (cold start)")
    p.add_argument("--missing-rate", type=float, default=0.3, help="share of images/texts masked at test time")
    p.add_argument("--threads", type=int, help="torch threads (default: 1 for tiny backbones, else 2)")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv[1:] if argv[:1] == ["--"] else argv)  # `speeder bench quality -- --opt` too
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = [v for v in args.variants if v not in VARIANTS] + [s for s in args.skip if s not in PARTS]
    if unknown:
        parser.error(f"unknown variant or part: {', '.join(unknown)} (variants: {', '.join(VARIANTS)}; parts: "
                     f"{', '.join(PARTS)})")
    if "Speeder" not in args.variants and "missing" not in args.skip:
        args.skip.add("missing")  # the masks are applied to the trained full Speeder
    return args


def main(argv: list[str]) -> int:
    """Run the bench for the chosen dataset(s); write results.md / results.json / plots under --out."""
    from speeder_platform.bench_quality_report import write_results

    args = parse_args(argv)
    names = ["synthetic", "ml100k"] if args.dataset == "both" else [args.dataset]
    setups = default_setups(args)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"command": "speeder bench quality " + " ".join(argv), "seed": args.seed,
                               "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
                               "cold_fraction": args.cold_fraction, "missing_rate": args.missing_rate,
                               "datasets": {}}
    for name in names:
        results["datasets"][name] = run_dataset(name, apply_overrides(setups[name], args), args)
        results["seconds"] = round(time.perf_counter() - t0)
        write_results(results, args.out)  # after each dataset: a long run leaves its finished part behind
    sys.stdout.write(f"bench quality: {storage.join(args.out, 'results.md')} ({results['seconds']}s)\n")
    return 0

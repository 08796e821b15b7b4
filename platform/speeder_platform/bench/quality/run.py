"""`speeder bench quality`: test-split accuracy of Speeder, its ablations and the baselines, one table.

    speeder bench quality --dataset synthetic                 # jobs/synthetic.yaml's recipe, ~20 min
    speeder bench quality --dataset ml100k                    # jobs/demo.yaml's recipe, ~2 h on 2 cores
    speeder bench quality --dataset ml100k --set trainer.stage_samples=[2400,2400,9600]   # another budget
    speeder bench quality --dataset synthetic --seeds 0,1,2 --variants Speeder --skip llara,cold-start,missing

Per dataset (ML-100K and the synthetic multimodal catalog), on the same splits and the same 20
candidates for every model:
- Popularity, SASRec (featurize's, loaded), the multi-token LLaRA-style baseline (same backbone and
  LoRA as Speeder; small stated budget, evaluated on a seeded subset of test users: it generates), and
  Speeder with one row per lever turned off (`bench.quality.models.VARIANTS`: the paper's model with
  no lever, no dense loss, final-token readout, no readout skip, no item prior, no SASRec skip, ...,
  no PPT, no PPL, no MPO, text only, no vision, no sequence). Every variant trains with the recipe of
  the dataset's job spec (the trainer's own settings and code) and gets the full model's total
  optimiser steps (equal compute); every row carries the paired 95% interval of its HR@1 minus the
  full model's over the same test users. A variant identical to one already trained on a catalog (no
  vision = Speeder on ML-100K: no images) is not trained twice.
- Cold start: 10% of the items held out of training entirely; HR@1 on test samples whose target is
  one of them (Speeder ranks them by content; SASRec has only an untrained id embedding).
- Missing modalities: 30% of the images (when the catalog has them) or texts masked at test time.
Speeder trains with the single-process loop (`bench.quality.models`); features come from the
project's featurize (made if missing). Writes results.md, results.json and PNG plots under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from speeder.loop import Samples, catalog_tokens, rank_targets
from speeder.metrics import paired_difference
from speeder_platform import storage
from speeder_platform.baselines_eval import (
    baseline_ranks,
    metrics_from_ranks,
    popularity_from_sequences,
    rank_with,
    sasrec_scorer,
    train_item_counts,
)
from speeder_platform.bench.quality.data import (
    BenchData,
    cold_sasrec,
    cold_start,
    load_bench_data,
    mask_modality,
    with_sequence,
)
from speeder_platform.bench.quality.models import (
    Budget,
    TrainedSpeeder,
    build_llara,
    equal_compute_steps,
    llara_ranks,
    plan_for,
    recipe_steps,
    train_llara,
    train_speeder,
    valid_subset,
    variant_config,
)
from speeder_platform.bench.quality.truth import synthetic_by_target, synthetic_truth
from speeder_platform.bench.quality.variants import PARTS, VARIANTS
from speeder_platform.config import SpeederConfig, to_dict

log = logging.getLogger("speeder.bench")

MAX_HISTORY = 20  # the protocol's default (docs/data.md#max-history)


@dataclass
class DatasetSetup:
    """How the bench runs on one dataset: where it lives, the job spec whose recipe it trains, budgets."""

    source: str
    uri: str
    spec: str  # model + trainer (+ featurize) settings: what `speeder job SPEC` trains
    threads: int
    budget: Budget
    prepare: list[str] = field(default_factory=list)


def default_setups(args: argparse.Namespace) -> dict[str, DatasetSetup]:
    """Each dataset's recipe is a job spec; the bench adds validation and the multi-token budget."""
    return {
        "synthetic": DatasetSetup(
            source="synthetic", uri=args.synthetic_data, spec=args.synthetic_spec,
            threads=1,  # tiny models: 1 thread is fastest on 2 cores
            budget=Budget(valid_users=0, llara_steps=40, llara_batch_size=8, llara_eval_users=300),
            prepare=[] if args.synthetic_users is None else [f"prepare.synthetic.num_users={args.synthetic_users}"]),
        "ml100k": DatasetSetup(
            source="movielens-100k", uri=args.ml100k_data, spec=args.ml100k_spec, threads=2,
            budget=Budget(valid_users=200, llara_steps=40, llara_batch_size=4, llara_eval_users=150)),
    }


def apply_overrides(setup: DatasetSetup, args: argparse.Namespace) -> DatasetSetup:
    """Command-line budgets replace the dataset's defaults."""
    for option in ("valid_users", "llara_steps", "llara_eval_users"):
        value = getattr(args, option)
        if value is not None:
            setattr(setup.budget, option, value)
    if args.threads is not None:
        setup.threads = args.threads
    return setup


# -- one dataset -------------------------------------------------------------------------------------
def speeder_ranks(trained: TrainedSpeeder, samples: Samples, features: Any) -> dict[str, np.ndarray]:
    """Both protocols' ranks of a trained Speeder on `samples` (catalog tokens computed once)."""
    return rank_targets(trained.model, samples, catalog_tokens(trained.model, features, trained.active),
                        active=trained.active)


def _effective(cfg: SpeederConfig, data: BenchData) -> str:
    """What makes two variants the same model on this catalog: the stages they run, every model setting (with
    modalities the catalog lacks left out) and every trainer setting (the loss pool is one)."""
    model = {**to_dict(cfg.model), "modalities": sorted(set(cfg.model.modalities) & data.available)}
    return json.dumps({"plan": [s.index for s in plan_for(cfg.model, data.features)], "model": model,
                       "trainer": to_dict(cfg.trainer)}, sort_keys=True)


def run_variants(data: BenchData, spec: str, base: list[str], names: list[str], budget: Budget,
                 features_dir: str) -> tuple[dict[str, dict], dict[str, list], TrainedSpeeder | None]:
    """Train and test every Speeder variant; -> rows, training curves, the trained full Speeder."""
    rows, curves, speeder = {}, {}, None
    full = variant_config(spec, base, [])
    full_steps = recipe_steps(full, data.features, len(data.train))
    trained_as: dict[str, str] = {_effective(full, data): "Speeder"}  # effective model -> row
    for name in names:
        cfg = variant_config(spec, base, VARIANTS[name])
        effective = _effective(cfg, data)
        same = trained_as.get(effective)
        if name != "Speeder" and same is not None:
            rows[name] = {"same_as": same, "note": f"identical to {same} with this recipe and catalog"}
            continue
        trained_as[effective] = name
        steps = equal_compute_steps(full_steps, plan_for(cfg.model, data.features))
        log.info("== %s on %s: %s; steps per stage %s", name, data.name, ", ".join(VARIANTS[name]) or "the recipe",
                 steps)
        trained = train_speeder(cfg, data.train, valid_subset(data.valid, budget.valid_users, cfg.trainer.seed),
                                data.features, steps, budget.curve_points, features_dir)
        t0 = time.perf_counter()
        ranks = speeder_ranks(trained, data.test, data.features)
        rows[name] = {"metrics": metrics_from_ranks(ranks), "ranks": ranks, "test_users": len(data.test),
                      "train_seconds": round(sum(s["train_seconds"] for s in trained.stages), 1),
                      "eval_seconds": round(time.perf_counter() - t0, 1), "steps": steps,
                      "stages": [s["stage"] for s in trained.stages], "modalities": trained.active}
        curves[name] = trained.stages
        if name == "Speeder":
            speeder = trained
    return rows, curves, speeder


def pair_with_speeder(rows: dict[str, dict]) -> None:
    """Every row with ranks gets `vs_speeder`: its HR@1 minus the full model's, paired over the same test users
    (a row evaluated on a subset of users, LLaRA's, is paired on that subset)."""
    ref = rows.get("Speeder", {}).get("ranks")
    if ref is None:
        return
    for name, row in rows.items():
        if name == "Speeder" or row.get("ranks") is None:
            continue
        index = row.get("users_index")
        mine = ref["candidates"] if index is None else ref["candidates"][index]
        mean, half = paired_difference(row["ranks"]["candidates"], mine)
        row["vs_speeder"] = {"hr@1": mean, "ci95": half, "users": len(mine)}


def run_llara(data: BenchData, cfg: SpeederConfig, budget: Budget) -> tuple[dict, list]:
    """The multi-token baseline: train on its budget, evaluate on a seeded subset of test users."""
    seed = cfg.trainer.seed
    log.info("== LLaRA-style multi-token baseline on %s: %d steps x %d", data.name, budget.llara_steps,
             budget.llara_batch_size)
    behaviour = data.features.sequence if data.features.sequence.shape[1] else None
    model = build_llara(cfg.model, data.titles, behaviour, seed)
    t0 = time.perf_counter()
    curve = train_llara(model, data.train, budget, seed, lr=cfg.trainer.lr, lora_lr=cfg.trainer.lora_lr)
    train_seconds = time.perf_counter() - t0
    index = np.arange(len(data.test))
    if budget.llara_eval_users and budget.llara_eval_users < len(data.test):
        index = np.sort(np.random.default_rng([seed, 5]).choice(len(data.test), budget.llara_eval_users,
                                                                replace=False))
    t0 = time.perf_counter()
    ranks = {"candidates": llara_ranks(model, data.test.subset(index))}
    row = {"metrics": metrics_from_ranks(ranks), "ranks": ranks, "users_index": index, "test_users": len(index),
           "train_seconds": round(train_seconds, 1), "eval_seconds": round(time.perf_counter() - t0, 1)}
    return row, [{"stage": 0, "name": "teacher forcing", "curve": curve}]


def run_cold_start(data: BenchData, spec: str, base: list[str], budget: Budget, fraction: float,
                   threads: int) -> dict[str, Any]:
    """Hold `fraction` of the items out of training; HR@1 on test targets among them vs the rest.

    Two Speeders train on the warm items: the full model (held-out items then lack only seq_emb) and one
    on content tokens alone (text, and images where the catalog has them), which sees every item alike.
    Both train in warm ids, which featurize's SASRec does not know: the SASRec user state and the SASRec
    teacher are off here (the SASRec item embeddings, retrained without the held-out items, stay).
    """
    log.info("== cold start on %s: %.0f%% of the items held out of training", data.name, 100 * fraction)
    full = variant_config(spec, base, [])
    seed = full.trainer.seed
    cold = cold_start(data, fraction, seed, MAX_HISTORY)
    sasrec, info = cold_sasrec(data, cold, num_threads=threads)
    torch.set_num_threads(threads)
    features = with_sequence(data.features, sasrec, info.pop("present"))
    warm = features.select(torch.from_numpy(cold.warm))
    content = [m for m in ("text", "vision") if m in data.available]
    no_sasrec_model = ["model.sequence_user=false", "model.distill_weight=0"]
    speeders = {"Speeder": no_sasrec_model, f"Speeder, content tokens only ({' + '.join(content)})":
                [*no_sasrec_model, f"model.modalities=[{','.join(content)}]"]}
    full_steps = recipe_steps(variant_config(spec, base, no_sasrec_model), warm, len(cold.train))
    ranks, seconds = {}, {}
    for name, overrides in speeders.items():
        cfg = variant_config(spec, base, overrides)
        trained = train_speeder(cfg, cold.train, None, warm, equal_compute_steps(full_steps, plan_for(cfg.model, warm)),
                                budget.curve_points)
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
    from speeder_platform.featurize.pipeline import features_dir
    from speeder_platform.featurize.sequence import load_sasrec, sasrec_dir

    t0 = time.perf_counter()
    torch.set_num_threads(setup.threads)
    base = [f"data.uri={setup.uri}", f"prepare.source={setup.source}", f"featurize.name={args.features_name}",
            f"model.max_history={MAX_HISTORY}", "ray.num_cpus=2", *setup.prepare, *args.set]
    cfg = variant_config(setup.spec, base, [])
    asked = [o.split("=", 1)[0].removeprefix("prepare.synthetic.") for o in setup.prepare
             if o.startswith("prepare.synthetic.")]  # generator settings from the command line must hold
    data = load_bench_data(name, cfg, MAX_HISTORY, required=asked)
    budget = setup.budget
    sasrec, sasrec_meta = load_sasrec(sasrec_dir(features_dir(cfg)))
    sequences, num_items = train_item_counts(data.uri)
    rows: dict[str, dict] = {k: {"metrics": metrics_from_ranks(r), "ranks": r, "test_users": len(data.test)}
                             for k, r in baseline_ranks(data.test, popularity_from_sequences(sequences, num_items),
                                                        sasrec).items()}
    rows["SASRec"]["train_seconds"] = round(sum(s["seconds"] for s in sasrec_meta.get("stats", [])), 1)
    variants, curves, speeder = run_variants(data, setup.spec, base, args.variants, budget, features_dir(cfg))
    rows.update(variants)
    result: dict[str, Any] = {"source": setup.source, "uri": setup.uri, "spec": setup.spec, "overrides": args.set,
                              "backbone": cfg.model.backbone, "num_layers": cfg.model.num_layers,
                              "threads": setup.threads, "budget": budget.to_dict(),
                              "recipe": {"model": to_dict(cfg.model), "trainer": to_dict(cfg.trainer)},
                              "steps": recipe_steps(cfg, data.features, len(data.train)),
                              "data": data_info(data), "sasrec": {"epochs": len(sasrec_meta.get("stats", [])),
                                                                  "hparams": sasrec_meta["hparams"],
                                                                  "settings": sasrec_meta.get("settings")}}
    if "llara" not in args.skip:
        rows["LLaRA-style"], curves["LLaRA-style"] = run_llara(data, cfg, budget)
    if "missing" not in args.skip and speeder is not None:
        result["missing"] = run_missing(data, speeder, rows["Speeder"]["metrics"], args.missing_rate,
                                        cfg.trainer.seed)
    if "cold-start" not in args.skip:
        result["cold_start"] = run_cold_start(data, setup.spec, base, budget, args.cold_fraction, setup.threads)
    checks = modality_checks(rows)
    truth = synthetic_truth(data.uri, data.test)
    if truth is not None:  # synthetic: the ceiling, and where each model's hits come from (the rule vs the draws)
        result["by_target"] = synthetic_by_target(truth, rows)
    pair_with_speeder(rows)
    for row in rows.values():
        row.pop("ranks", None)
        row.pop("users_index", None)
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
        gain, half = paired_difference(a["candidates"], b["candidates"])
        out[check] = {"with": with_it, "without": without, "hr@1_with": float((a["candidates"] == 0).mean()),
                      "hr@1_without": float((b["candidates"] == 0).mean()), "gain": gain, "ci95": half,
                      "holds": gain > 0, "significant": gain - half > 0}
    return out


# -- the command (its options are declared in speeder_platform.cli) ---------------------------------
def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """`--variants` and `--skip` as lists, checked against VARIANTS and PARTS (ValueError names the unknown)."""
    if isinstance(args.variants, str):
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if isinstance(args.skip, str):
        args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = [v for v in args.variants if v not in VARIANTS] + [s for s in args.skip if s not in PARTS]
    if unknown:
        raise ValueError(f"unknown variant or part: {', '.join(unknown)} (variants: {', '.join(VARIANTS)}; parts: "
                         f"{', '.join(PARTS)})")
    if "Speeder" not in args.variants and "missing" not in args.skip:
        args.skip.add("missing")  # the masks are applied to the trained full Speeder
    return args


def dataset_names(args: argparse.Namespace) -> list[str]:
    """The datasets `--dataset` asks for, in the order they run."""
    return ["synthetic", "ml100k"] if args.dataset == "both" else [args.dataset]


def run_command(args: argparse.Namespace, command: str) -> int:
    """Run the bench for the chosen dataset(s); write results.md / results.json / plots under --out (with
    --seeds: once per pipeline seed under --out/seed-N, and seeds.md / seeds.json across them).
    `command`: the command line as typed, recorded in results.json."""
    from speeder_platform.bench.quality.seeds import parse_seeds, run_seeds

    args = check_args(args)
    seeds = parse_seeds(getattr(args, "seeds", None), args.set)
    if seeds:
        setups = default_setups(args)
        spec_seeds = {variant_config(setups[n].spec, args.set, []).featurize.sasrec.seed for n in dataset_names(args)}
        run_seeds(args, command, seeds, spec_seeds, run_once)
        sys.stdout.write(f"bench quality: {storage.join(args.out, 'seeds.md')}\n")
        return 0
    results = run_once(args, command)
    sys.stdout.write(f"bench quality: {storage.join(args.out, 'results.md')} ({results['seconds']}s)\n")
    return 0


def run_once(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """One bench run over the chosen dataset(s), written under args.out after each dataset; returns the results."""
    from speeder_platform.bench.quality.report import write_results

    setups = default_setups(args)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"command": command,
                               "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
                               "cold_fraction": args.cold_fraction, "missing_rate": args.missing_rate,
                               "datasets": {}}
    for name in dataset_names(args):
        results["datasets"][name] = run_dataset(name, apply_overrides(setups[name], args), args)
        results["seconds"] = round(time.perf_counter() - t0)
        write_results(results, args.out)  # after each dataset: a long run leaves its finished part behind
    return results

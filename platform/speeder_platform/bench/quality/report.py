"""`speeder bench quality`'s outputs: results.json, results.md and the PNG plots, from the results dict.

Every number comes from the run's results; the markdown states the budgets next to the tables.
"""

from __future__ import annotations

import math
from typing import Any

from speeder_platform import storage
from speeder_platform.report import plot_bars, plot_curves

TITLES = {"synthetic": "Synthetic multimodal catalog", "ml100k": "MovieLens-100K"}
COLUMNS = [("cand_hr@1", "HR@1"), ("cand_valid_ratio", "ValidRatio"), ("cand_vhr@1", "VHR@1"),
           ("full_hr@10", "HR@10 (full)"), ("full_ndcg@10", "NDCG@10 (full)")]


def _num(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _vs(row: dict[str, Any]) -> str:
    v = row.get("vs_speeder")
    return "" if v is None else f"{v['hr@1']:+.4f} +- {v['ci95']:.4f}"


def model_table(models: dict[str, dict[str, Any]]) -> str:
    """One row per model; HR@1 minus the full Speeder's with its paired 95% interval over the same users."""
    head = ("| model | " + " | ".join(label for _, label in COLUMNS)
            + " | HR@1 - Speeder (paired 95%) | test users | train s | note |")
    lines = [head, "|" + "---|" * (len(COLUMNS) + 5)]
    for name, row in models.items():
        if "same_as" in row:
            lines.append(f"| {name} | " + " | ".join("=" for _ in COLUMNS) + f" | | | | {row['note']} |")
            continue
        m = row["metrics"]
        cells = " | ".join(_num(m.get(key)) for key, _ in COLUMNS)
        lines.append(f"| {name} | {cells} | {_vs(row)} | {row['test_users']:,} | "
                     f"{_num_s(row.get('train_seconds'))} | {row.get('note', '')} |")
    return "\n".join(lines)


def _num_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.0f}"


def budget_text(ds: dict[str, Any]) -> str:
    b, t = ds["budget"], ds["recipe"]["trainer"]
    layers = f" (first {ds['num_layers']} layers)" if ds.get("num_layers") else ""
    cache = (f"cached negatives refreshed every {t['negative_cache_steps']} steps" if t.get("negative_cache_steps")
             else "fresh tokens for every item at every step")
    steps = ", ".join(f"stage {k}: {v}" for k, v in ds["steps"].items())
    overrides = f" with {' '.join(ds['overrides'])}" if ds.get("overrides") else ""
    lr_schedule = t.get("lr_schedule", "constant")  # results written before the key existed had a constant lr
    schedule = (f"cosine lr per stage after {t.get('lr_warmup', 0):.0%} warmup" if lr_schedule == "cosine"
                else f"{lr_schedule} lr")
    return (f"Recipe: `{ds['spec']}`{overrides} (its model and trainer settings, the trainer's code). Backbone "
            f"{ds['backbone']}{layers} with LoRA for Speeder and the multi-token baseline, torch threads "
            f"{ds['threads']}. Speeder: optimiser steps of batch {t['batch_size']} per MPO stage ({steps}), fresh "
            f"samples per stage; every variant gets that total, spread over the stages it runs (no MPO, text only: "
            f"all in one stage) ({t['loss_pool']} softmax, {cache}, lr {t['lr']:g}, LoRA lr {t['lora_lr']:g}, "
            f"vision gate lr x{t['gate_lr_scale']:g}, {schedule}); stage-end validation on "
            f"{b['valid_users'] or 'all'} valid users. Multi-token baseline: {b['llara_steps']} steps of batch "
            f"{b['llara_batch_size']} (teacher forcing on candidate prompts), evaluated on "
            f"{b['llara_eval_users'] or 'all'} seeded test users (generation; no full-ranking figure). SASRec: "
            f"featurize's model ({ds['sasrec']['epochs']} epochs, hidden {ds['sasrec']['hparams']['hidden_size']}, "
            f"RecBole defaults). Popularity: train interactions. Wall time {ds['seconds']} s.")


CHECK_NAMES = {"vision_adds": "vision (beside text and sequence)", "vision_adds_to_text": "vision (content only: "
               "text + vision vs text)", "sequence_adds": "sequence"}


def checks_text(checks: dict[str, Any]) -> list[str]:
    lines = []
    for name, c in checks.items():
        what = CHECK_NAMES.get(name, name)
        verdict = "yes" if c["significant"] else ("not significantly" if c["holds"] else "no")
        lines.append(f"- {what} adds accuracy: **{verdict}** ({c['with']} HR@1 {c['hr@1_with']:.4f} vs "
                     f"{c['without']} {c['hr@1_without']:.4f}: {c['gain']:+.4f} +- {c['ci95']:.4f}, paired 95% "
                     "interval over the same test users)")
    return lines


def cold_table(cold: dict[str, Any]) -> str:
    lines = [f"{cold['held_out_items']} of {cold['items']} items held out of training entirely (no train sample, "
             f"no SASRec training, no seq_emb); {cold['test_cold']} test users have one as their target, "
             f"{cold['test_warm']} do not. Each Speeder trained on the {cold['train_samples']:,} warm samples "
             f"({', '.join(f'{s:.0f}' for s in cold['speeder_train_seconds'].values())} s); SASRec retrained "
             f"without them ({cold['sasrec']['epochs']} epochs, {cold['sasrec']['seconds']:.0f} s).", "",
             "| model | HR@1 held-out targets | HR@10 (full) held-out | HR@1 other targets | HR@10 (full) other |",
             "|---|---|---|---|---|"]
    for name, m in cold["models"].items():
        lines.append(f"| {name} | {_num(m['cold']['cand_hr@1'])} | {_num(m['cold'].get('full_hr@10'))} | "
                     f"{_num(m['warm']['cand_hr@1'])} | {_num(m['warm'].get('full_hr@10'))} |")
    return "\n".join(lines)


def missing_table(missing: dict[str, Any], reference: dict[str, float], rate: float) -> str:
    lines = [f"The trained Speeder, test split, {100 * rate:.0f}% of the items' images or texts masked at test "
             "time (seeded; only items that keep another modality can lose one).", "",
             "| masked | items masked | HR@1 | drop | HR@10 (full) | drop |", "|---|---|---|---|---|---|",
             f"| nothing | 0 | {_num(reference['cand_hr@1'])} | | {_num(reference['full_hr@10'])} | |"]
    for modality, r in missing.items():
        lines.append(f"| {modality} | {r['masked']} of {r['had']} | {_num(r['metrics']['cand_hr@1'])} | "
                     f"{r['drop']['cand_hr@1']:+.4f} | {_num(r['metrics']['full_hr@10'])} | "
                     f"{r['drop']['full_hr@10']:+.4f} |")
    return "\n".join(lines)


def by_target_table(by: dict[str, Any]) -> str:
    """Each model's HR@1 on successor targets and on the others, and how often it ranks by the generator's odds,
    beside the generator's own ranking (synthetic catalog; bench/quality/truth.py)."""
    share, top = by["successor_share"], by["ceiling"]
    lines = [f"Test targets by kind (the generator's truth): {100 * share:.1f}% are the last history item's successor "
             f"(an item-level rule only sequences carry), {100 * (1 - share):.1f}% a draw from the user's related "
             "items (group, category or colour: what text and images describe). Among equally likely candidates "
             "the draw is a lottery: ranking by the generator's odds expects HR@1 "
             f"{_num(top['all'])}, the reference ceiling, and luck alone moves a model's HR@1 by +-"
             f"{top['lottery_sd']:.4f} (one standard deviation). \"Likeliest first\": of the samples whose target "
             "is among its n likeliest candidates, the share a model ranks within its first n places. \"Expected "
             "HR@1\": HR@1 without the lottery, each sample counting the chance that the model's first choice is the "
             "target given the candidates (its odds over theirs: the same expectation as HR@1, none of the draw's "
             "noise); \"other targets\" given that the target is not the successor. Its difference from Speeder's is "
             "paired over the same samples.", "",
             "| model | HR@1 successor targets | HR@1 other targets | likeliest first | likeliest first, other targets "
             "| expected HR@1 | expected HR@1, other targets | expected HR@1 - Speeder (paired 95%) |",
             "|---|---|---|---|---|---|---|---|",
             f"| the generator's odds (expected) | {_num(top['successor'])} | {_num(top['other'])} | 1.0000 | 1.0000 "
             f"| {_num(top['all'])} | {_num(top['other'])} | |"]
    for name, m in by["models"].items():
        vs = m.get("expected_vs_speeder")
        lines.append(f"| {name} | {_num(m['successor'])} | {_num(m['other'])} | {_num(m['in_top'])} | "
                     f"{_num(m['in_top_other'])} | {_num(m.get('expected'))} | {_num(m.get('expected_other'))} | "
                     + (f"{vs['mean']:+.4f} +- {vs['ci95']:.4f} |" if vs else " |"))
    lines += ["", "Where first choices fall when the target is not the successor (and the successor is not a "
              "candidate): in the user's related pool, where the target was drawn; outside it but sharing the "
              "last item's category or colour; elsewhere.", "",
              "| model | first choice in the pool | near the last item only | elsewhere |", "|---|---|---|---|"]
    for name, m in by["models"].items():
        if "first_in_pool" in m:
            lines.append(f"| {name} | {_num(m['first_in_pool'])} | {_num(m['first_near_last'])} | "
                         f"{_num(m['first_elsewhere'])} |")
    return "\n".join(lines)


def dataset_section(name: str, ds: dict[str, Any], results: dict[str, Any]) -> list[str]:
    d = ds["data"]
    lines = [f"## {TITLES.get(name, name)}", "",
             f"{d['items']:,} items, {d['train']:,} train / {d['valid']:,} valid / {d['test']:,} test samples; "
             f"modalities {', '.join(d['modalities'])}. Test split, 20 candidates (target + 19 never-seen items, "
             "the same for every model) and full ranking with history items masked.", "",
             model_table(ds["models"]), "", budget_text(ds), ""]
    lines += checks_text(ds.get("checks", {})) + ([""] if ds.get("checks") else [])
    if "by_target" in ds:
        lines += ["### HR@1 by kind of target", "", by_target_table(ds["by_target"]), ""]
    lines += [f"![accuracy](accuracy_{name}.png)", f"![training curves](curves_{name}.png)", ""]
    if "cold_start" in ds:
        lines += [f"### Cold-start items ({100 * results['cold_fraction']:.0f}% held out)", "",
                  cold_table(ds["cold_start"]), "", f"![cold start](cold_start_{name}.png)", ""]
    if "missing" in ds:
        lines += ["### Missing modalities at test time", "",
                  missing_table(ds["missing"], ds["models"]["Speeder"]["metrics"], results["missing_rate"]), ""]
    return lines


def write_plots(name: str, ds: dict[str, Any], out: str) -> None:
    rows = {k: v["metrics"] for k, v in ds["models"].items() if "metrics" in v}
    plot_bars(rows, storage.join(out, f"accuracy_{name}.png"), f"{TITLES.get(name, name)}: test split")
    speeder_curves = {k: v for k, v in ds["curves"].items() if k != "LLaRA-style"}
    if speeder_curves:
        plot_curves(speeder_curves, storage.join(out, f"curves_{name}.png"),
                    f"{TITLES.get(name, name)}: Speeder variants, training loss per MPO stage")
    if "cold_start" in ds:
        cold = {k: {"cold": v["cold"]["cand_hr@1"], "warm": v["warm"]["cand_hr@1"]}
                for k, v in ds["cold_start"]["models"].items()}
        plot_bars(cold, storage.join(out, f"cold_start_{name}.png"), f"{TITLES.get(name, name)}: cold-start items",
                  keys=[("cold", "HR@1, held-out targets"), ("warm", "HR@1, other targets")])


def write_results(results: dict[str, Any], out: str) -> None:
    """results.json, results.md and every dataset's plots under `out`."""
    storage.write_json(storage.join(out, "results.json"), results)
    lines = ["# Speeder quality bench", "", f"`{results['command']}` ({results['machine']['cpus']} CPUs, torch "
             f"{results['machine']['torch']}; {results['seconds']} s)", ""]
    for name, ds in results["datasets"].items():
        write_plots(name, ds, out)
        lines += dataset_section(name, ds, results)
    storage.write_bytes(storage.join(out, "results.md"), "\n".join(lines).encode())

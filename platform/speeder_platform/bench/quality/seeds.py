"""`speeder bench quality --seeds 0,1,2`: the whole bench once per pipeline seed, then one table across them.

A pipeline seed N sets `featurize.sasrec.seed=N` and `trainer.seed=N`: SASRec's features (its init, dropout and
batches) and Speeder's sample draws, init and dropout (and with them the bench's other seeded draws: cold-start
items, masked modalities, validation and LLaRA subsets), so a difference that holds over seeds is the models', not
one draw's. Features are made once per seed and reused (a new folder runs the whole featurize, encoders included):
the spec's own SASRec seed keeps features/<name>, any other seed N uses features/<name>-sasrecN. Seeds given with
--seeds cannot also come from --set. Each seed's full results go to `--out/seed-N/`; `--out/seeds.md` and
`seeds.json` hold, per model, HR@1 and (on the synthetic catalog) expected HR@1 per seed with their mean, and
each row's differences from the full Speeder, paired over the same test users, per seed.
"""

from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Callable
from typing import Any

from speeder_platform import storage

log = logging.getLogger("speeder.bench")


SEED_KEYS = ("featurize.sasrec.seed", "trainer.seed")  # what a pipeline seed sets


def parse_seeds(text: str | None, overrides: list[str] = ()) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (None: no --seeds, []); ValueError names a seed that is not a non-negative integer, a
    repeated one, an empty list, or a --set of a key the seeds set."""
    if text is None:
        return []
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if not (part.isascii() and part.isdigit()):
            raise ValueError(f"--seeds: {part!r} is not a non-negative integer")
        if int(part) in seeds:
            raise ValueError(f"--seeds: {part} given twice")
        seeds.append(int(part))
    if not seeds:
        raise ValueError(f"--seeds: no seed in {text!r}")
    clash = [o for o in overrides if o.split("=", 1)[0].strip() in SEED_KEYS]
    if clash:
        raise ValueError(f"--seeds sets {' and '.join(SEED_KEYS)} for each run; drop --set {', '.join(clash)}")
    return seeds


def seed_args(args: argparse.Namespace, seed: int, spec_seeds: set[int]) -> argparse.Namespace:
    """The bench's options for one pipeline seed: both seeds set, its own features and out. `spec_seeds`: the
    recipes' featurize.sasrec.seed (features/<name> holds that seed's SASRec; any other seed gets its own folder)."""
    one = copy.copy(args)
    one.set = [*args.set, *(f"{key}={seed}" for key in SEED_KEYS)]
    one.features_name = args.features_name if spec_seeds == {seed} else f"{args.features_name}-sasrec{seed}"
    one.out = storage.join(args.out, f"seed-{seed}")
    one.seeds = None
    return one


def summarize(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per dataset and model: HR@1 and expected HR@1 (where the truth is known) per seed and their means, and the
    paired differences of both from the full Speeder per seed. Models missing from a seed are left out."""
    seeds = list(per_seed)
    out: dict[str, Any] = {"seeds": seeds, "datasets": {}}
    names = list(per_seed[seeds[0]]["datasets"])
    for name in names:
        runs = [per_seed[s]["datasets"][name] for s in seeds]
        models: dict[str, Any] = {}
        for model in runs[0]["models"]:
            rows = [r["models"].get(model) for r in runs]
            if any(row is None or "same_as" in row for row in rows):
                continue
            hr1 = [row["metrics"]["cand_hr@1"] for row in rows]
            entry: dict[str, Any] = {"hr@1": hr1, "hr@1_mean": sum(hr1) / len(hr1)}
            if all("vs_speeder" in row for row in rows):
                entry["hr@1_vs_speeder"] = [{"mean": row["vs_speeder"]["hr@1"], "ci95": row["vs_speeder"]["ci95"]}
                                            for row in rows]
            by = [r.get("by_target", {}).get("models", {}).get(model) for r in runs]
            if all(b is not None and "expected" in b for b in by):
                expected = [b["expected"] for b in by]
                entry.update(expected=expected, expected_mean=sum(expected) / len(expected))
                if all("expected_vs_speeder" in b for b in by):
                    entry["expected_vs_speeder"] = [b["expected_vs_speeder"] for b in by]
            models[model] = entry
        out["datasets"][name] = {"models": models, "test_users": runs[0]["data"]["test"]}
    return out


def seeds_markdown(summary: dict[str, Any], command: str) -> str:
    """The across-seeds tables, one per dataset."""
    seeds = summary["seeds"]
    cols = " / ".join(str(s) for s in seeds)
    lines = ["# Speeder quality bench across pipeline seeds", "", f"`{command}`", "",
             f"Seeds {cols}: each sets featurize.sasrec.seed and trainer.seed; every seed's full report is in "
             "seed-N/results.md. \"Expected HR@1\" (synthetic): HR@1 without the draw's lottery "
             "(docs/benchmarks.md#by-kind-of-target); its difference from the full Speeder is paired per seed.", ""]
    for name, ds in summary["datasets"].items():
        truth = any("expected" in m for m in ds["models"].values())  # the synthetic catalog's exact odds
        head = f"| model | HR@1 (seeds {cols}) | mean HR@1 | HR@1 - Speeder (paired 95%, per seed) |"
        if truth:
            head += (f" expected HR@1 (seeds {cols}) | mean expected HR@1 | expected HR@1 - Speeder (paired 95%, "
                     "per seed) |")
        lines += [f"## {name} ({ds['test_users']:,} test users per seed)", "", head,
                  "|" + "---|" * (7 if truth else 4)]
        for model, m in ds["models"].items():
            row = (f"| {model} | {_per_seed(m['hr@1'])} | {m['hr@1_mean']:.4f} | "
                   f"{_differences(m.get('hr@1_vs_speeder', []))} |")
            if truth:
                mean = f"{m['expected_mean']:.4f}" if "expected_mean" in m else "n/a"
                row += (f" {_per_seed(m.get('expected', [])) or 'n/a'} | {mean} | "
                        f"{_differences(m.get('expected_vs_speeder', []))} |")
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def _per_seed(values: list[float]) -> str:
    return " / ".join(f"{v:.4f}" for v in values)


def _differences(values: list[dict[str, float]]) -> str:
    return "; ".join(f"{v['mean']:+.4f} +- {v['ci95']:.4f}" for v in values)


def run_seeds(args: argparse.Namespace, command: str, seeds: list[int], spec_seeds: set[int],
              run_once: Callable[[argparse.Namespace, str], dict[str, Any]]) -> dict[str, Any]:
    """Run the bench once per seed (`run_once(args, command)` writes that seed's results under its out) and write
    seeds.md / seeds.json under --out after every seed, so a long run leaves its finished seeds behind."""
    per_seed: dict[int, dict[str, Any]] = {}
    summary: dict[str, Any] = {}
    for seed in seeds:
        log.info("== pipeline seed %d (%d of %d)", seed, len(per_seed) + 1, len(seeds))
        per_seed[seed] = run_once(seed_args(args, seed, spec_seeds), command)
        summary = summarize(per_seed)
        summary["command"] = command
        storage.write_json(storage.join(args.out, "seeds.json"), summary)
        storage.write_bytes(storage.join(args.out, "seeds.md"), seeds_markdown(summary, command).encode())
    return summary

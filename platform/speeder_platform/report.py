"""`speeder report CONFIG [overrides]`: the report of a finished job, as markdown + PNG plots.

    speeder job jobs/demo.yaml && speeder report jobs/demo.yaml     # -> runs/ml100k/report/report.md

Reads only what the job wrote: `job_summary.json` (seconds per step), the train run's `stages.json`
and each stage's checkpoints (`<storage>/<run>-stage<k>/checkpoint_*/meta.json`: per-epoch train loss
and validation, plus the per-step loss curve where the trainer recorded one), `<evaluate.out>/
metrics.json`, `<evaluate.out>/baselines.json` (popularity and SASRec on the same split, computed by the
first report of a run and read by the next) and the scores partition. Writes
`<output_root>/report/report.md`, `training_curves.png`, `accuracy.png` and `time.png`; the report
ends with the command that opens the Gradio demo on the trained model.

The plotting helpers here also draw `speeder bench quality`'s figures.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from typing import Any

from speeder_platform import storage
from speeder_platform.redact import redact

log = logging.getLogger("speeder.report")

ACCURACY_KEYS = [("cand_hr@1", "HR@1 (20 cand.)"), ("full_hr@10", "HR@10 (full)"), ("full_ndcg@10", "NDCG@10 (full)")]
PLOTS = ("training_curves.png", "accuracy.png", "time.png")


# -- plots (shared with bench quality) ---------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> None:
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    _pyplot().close(fig)
    storage.write_bytes(path, buf.getvalue())


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: str, title: str) -> None:
    """Training loss per step, one line per run, stages one after the other (boundaries dotted), and
    validation HR@1 points on a second axis where stages carry them.

    runs: name -> stages [{"stage", "name", "curve": [{"step", "loss"}, ...], "valid_points" (optional):
    [{"step", "hr@1"}, ...]}], steps counted per stage.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    right = None
    for name, stages in runs.items():
        xs, ys, vx, vy, offset = [], [], [], [], 0
        for stage in stages:
            for point in stage["curve"]:
                xs.append(offset + point["step"])
                ys.append(point["loss"])
            for point in stage.get("valid_points") or []:
                vx.append(offset + point["step"])
                vy.append(point["hr@1"])
            offset += stage["curve"][-1]["step"] if stage["curve"] else 0
            if name == next(iter(runs)) and stage is not stages[-1]:
                ax.axvline(offset, color="grey", linestyle=":", linewidth=1)
        line, = ax.plot(xs, ys, marker="o", markersize=2, linewidth=1, label=f"{name}: training loss")
        if vx:
            right = right or ax.twinx()
            right.plot(vx, vy, marker="s", markersize=6, linestyle="--", color=line.get_color(),
                       label=f"{name}: valid HR@1 (20 cand.)")
    ax.set(xlabel="optimiser step (stages in order; dotted: stage boundary)", ylabel="training loss", title=title)
    handles, labels = ax.get_legend_handles_labels()
    if right is not None:
        right.set_ylabel("validation HR@1")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8)
    _save(fig, path)


def plot_bars(rows: dict[str, dict[str, float]], path: str, title: str,
              keys: Sequence[tuple[str, str]] = tuple(ACCURACY_KEYS)) -> None:
    """Grouped bars: one group per metric key, one bar per model (missing metrics left out)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(12.0, max(6.0, 0.6 * len(rows) * len(keys))), 4.5))
    width = 0.8 / max(1, len(rows))
    for i, (name, metrics) in enumerate(rows.items()):
        xs = [k + i * width for k, (key, _) in enumerate(keys) if metrics.get(key) is not None]
        ys = [metrics[key] for key, _ in keys if metrics.get(key) is not None]
        ax.bar(xs, ys, width=width, label=name)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], [label for _, label in keys])
    ax.set(ylabel="test split", title=title)
    ax.legend(fontsize=8, ncol=2)
    _save(fig, path)


def plot_time(parts: list[tuple[str, float]], path: str, title: str) -> None:
    """Horizontal bars: seconds per part."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(parts) + 1.2))
    labels = [p for p, _ in parts][::-1]
    seconds = [s for _, s in parts][::-1]
    ax.barh(labels, seconds)
    for y, s in enumerate(seconds):
        ax.text(s, y, f" {s:.0f}s", va="center", fontsize=8)
    ax.set(xlabel="seconds", title=title)
    _save(fig, path)


# -- reading a finished job ------------------------------------------------------------------------
def _read_json(uri: str) -> dict[str, Any] | None:
    return storage.read_json(uri) if storage.exists(uri) else None


def stage_curves(stage_dir: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-step loss points and validation points of one stage, from its checkpoints' meta.json.

    A checkpoint's loop state holds `loss_curve` ([{"step", "loss"}]: the mean loss of every
    trainer.log_every steps); a checkpoint without one gives one point, its epoch's mean train loss.
    Every epoch-end checkpoint gives a validation point [{"step", "hr@1"}] (mid-epoch ones have none).
    """
    if not storage.exists(stage_dir):
        return [], []
    points: dict[int, float] = {}
    valid: dict[int, float] = {}
    for name in storage.listdir(stage_dir):
        meta = _read_json(storage.join(stage_dir, name, "meta.json")) if name.startswith("checkpoint_") else None
        if meta is None:
            continue
        for point in (meta.get("train_state") or {}).get("loss_curve") or []:
            points[int(point["step"])] = float(point["loss"])
        metrics = meta.get("metrics", {})
        loss = metrics.get("train_loss")
        if loss is not None and loss == loss:  # not NaN
            points.setdefault(int(meta["step"]), float(loss))
        if metrics.get("valid_hr1", -1.0) >= 0:
            valid[int(meta["step"])] = float(metrics["valid_hr1"])
    return ([{"step": s, "loss": points[s]} for s in sorted(points)],
            [{"step": s, "hr@1": valid[s]} for s in sorted(valid)])


def collect(cfg: Any) -> dict[str, Any]:
    """Everything the report shows, read from the job's outputs (missing parts are None / empty)."""
    from speeder_platform.trained import STAGES_FILE, run_uri

    root = run_uri(cfg)
    stages = (_read_json(storage.join(root, STAGES_FILE)) or {}).get("stages", [])
    for stage in stages:
        # Each stage is its own Ray Train run; its steps count from 0.
        stage["curve"], stage["valid_points"] = stage_curves(
            storage.join(cfg.trainer.storage_path, f"{cfg.trainer.run_name}-stage{stage['stage']}"))
    return {
        "summary": _read_json(storage.join(cfg.output_root, "job_summary.json")),
        "stages": stages,
        "metrics": _read_json(storage.join(cfg.evaluate.out, "metrics.json")),
        "baselines": _read_json(storage.join(cfg.evaluate.out, "baselines.json")),
        "diagnosis": _read_json(storage.join(cfg.evaluate.out, "diagnose.json")),
    }


def time_parts(summary: dict[str, Any], stages: list[dict[str, Any]],
               order: Sequence[str] = ()) -> list[tuple[str, float, str]]:
    """(part, seconds, details) per job step, in the spec's `order` (job_summary.json sorts its keys)."""
    parts = []
    rank = {step: i for i, step in enumerate(order)}
    for step, info in sorted(summary["steps"].items(), key=lambda kv: rank.get(kv[0], len(rank))):
        result = info.get("result") or {}
        details = ""
        if step == "prepare":
            details = "reused" if result.get("skipped") else (f"{result.get('users', 0):,} users, "
                                                              f"{result.get('items', 0):,} items")
        elif step == "featurize":
            details = (f"{result.get('mode', '?')}: encoders {result.get('encode_seconds', 0):.0f}s, "
                       f"SASRec {result.get('sequence_seconds', 0):.0f}s ({result.get('sasrec', '-')})")
        elif step == "train":
            details = ", ".join(f"stage {s['stage']} ({s['name']}) {s.get('seconds', 0):.0f}s" for s in stages)
        elif step == "evaluate":
            details = f"{result.get('metrics', {}).get('cand_samples', 0):,} users, both protocols"
        elif step == "score":
            details = f"{result.get('users_scored', 0):,} users at {result.get('users_per_s', 0):.1f} users/s"
        parts.append((step, float(info["seconds"]), details))
    return parts


def time_table(parts: list[tuple[str, float, str]], summary: dict[str, Any]) -> str:
    total = float(summary["seconds"])
    lines = ["| step | seconds | share | details |", "|---|---|---|---|"]
    for step, seconds, details in parts:
        lines.append(f"| {step} | {seconds:.1f} | {100 * seconds / max(total, 1e-9):.0f}% | {details} |")
    lines.append(f"| **total** | **{total:.1f}** | 100% | {total / 60:.1f} minutes, Ray: {summary.get('ray', '?')} |")
    return "\n".join(lines)


def scores_sample(cfg: Any, score: dict[str, Any], users: int = 3, k: int = 5) -> str:
    """A few users' top-k from the committed partition, by title."""
    from speeder import schema

    table = storage.read_table(score["partition"]).sort_by(schema.USER_ID).slice(0, users).to_pylist()
    items = storage.read_table(storage.join(cfg.data.uri, schema.ITEMS_FILE), columns=[schema.ITEM_ID, schema.TITLE])
    titles = dict(zip(items.column(schema.ITEM_ID).to_pylist(), items.column(schema.TITLE).to_pylist(), strict=True))
    lines = ["| user | top recommendations (score) |", "|---|---|"]
    for row in table:
        recs = "; ".join(f"{titles.get(i, i)} ({s:.2f})" for i, s in zip(row["item_ids"][:k], row["scores"][:k],
                                                                       strict=True))
        lines.append(f"| {row[schema.USER_ID]} | {recs} |")
    return "\n".join(lines)


RESULT_MODELS = (("speeder", None), ("sasrec", "SASRec"), ("popularity", "Popularity"))


def paired_speeder_sasrec(evaluate_out: str) -> dict[str, Any] | None:
    """Speeder minus SASRec on HR@1 (20 candidates), paired over the users both ranked, with its 95% interval;
    None when either model's per-user ranks are missing."""
    import numpy as np

    from speeder.metrics import paired_difference
    from speeder_platform.baselines_eval import read_ranks

    a, b = read_ranks(evaluate_out, "speeder"), read_ranks(evaluate_out, "sasrec")
    if a is None or b is None:
        return None
    users, ia, ib = np.intersect1d(a["user_id"], b["user_id"], return_indices=True)
    mean, half = paired_difference(a["candidates"][ia], b["candidates"][ib])
    return {"hr@1": mean, "ci95": [mean - half, mean + half], "users": int(len(users))}


def results(data: dict[str, Any], evaluate_out: str) -> dict[str, Any]:
    """results.json: per model (speeder, sasrec, popularity) the headline figures, and the paired interval."""
    rows: dict[str, dict[str, float] | None] = {
        "speeder": (data["metrics"] or {}).get("metrics"),
        **{key: ((data["baselines"] or {}).get("models") or {}).get(name) for key, name in RESULT_MODELS[1:]}}
    models = {key: {"hr@1": m["cand_hr@1"], "hr@10_full": m["full_hr@10"], "ndcg@10_full": m["full_ndcg@10"],
                    "valid_ratio": m["cand_valid_ratio"], "test_users": int(m["cand_samples"])}
              for key, m in rows.items() if m}
    out: dict[str, Any] = {"split": (data["metrics"] or {}).get("split"), "models": models,
                           "speeder_minus_sasrec": paired_speeder_sasrec(evaluate_out)}
    if data["metrics"]:
        out["speeder_version"] = data["metrics"].get("model_version")
    return out


def comparison_text(res: dict[str, Any]) -> str:
    """One paragraph: Speeder against SASRec, with the paired interval."""
    m = res["models"]
    if "speeder" not in m or "sasrec" not in m:
        return ""
    s, r = m["speeder"], m["sasrec"]
    text = (f"Speeder HR@1 {s['hr@1']:.4f} vs SASRec {r['hr@1']:.4f}; NDCG@10 (full) {s['ndcg@10_full']:.4f} vs "
            f"{r['ndcg@10_full']:.4f}.")
    pair = res.get("speeder_minus_sasrec")
    if pair:
        lo, hi = pair["ci95"]
        text += (f" Paired over the same {pair['users']:,} users, Speeder minus SASRec on HR@1 is {pair['hr@1']:+.4f} "
                 f"(95% interval {lo:+.4f} to {hi:+.4f}).")
    return text


def accuracy_rows(data: dict[str, Any]) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    if data["metrics"]:
        rows[f"Speeder ({data['metrics']['model_version']})"] = data["metrics"]["metrics"]
    if data["baselines"]:
        rows.update(data["baselines"]["models"])
    return rows


def render(cfg: Any, data: dict[str, Any], command: list[str], out: str) -> str:
    """report.md; draws the plots into `out` as a side effect."""
    from speeder_platform.evaluate import metrics_table
    from speeder_platform.train.driver import TrainSummary

    m = cfg.model
    layers = f", first {m.num_layers} decoder layers" if m.num_layers else ""
    spec = shlex.join(command[2:])
    lines = [f"# Speeder run report: {spec}", "",
             f"The job `speeder job {spec}`, reported by `{shlex.join(command)}`. Backbone {m.backbone}{layers}, "
             f"LoRA r={m.lora.r} alpha={m.lora.alpha}; modalities {', '.join(m.modalities)}; dataset "
             f"{cfg.data.uri}; outputs under {cfg.output_root}.", ""]
    summary, stages = data["summary"], data["stages"]
    if summary:
        parts = time_parts(summary, stages, cfg.steps)
        plot_time([(p, s) for p, s, _ in parts], storage.join(out, "time.png"), "Where the time went")
        lines += ["## Where the time went", "", time_table(parts, summary), "", "![time](time.png)", ""]
    if stages:
        runs = {"Speeder": [s for s in stages if s.get("curve")]}
        if runs["Speeder"]:
            plot_curves(runs, storage.join(out, "training_curves.png"), "Training loss per MPO stage")
        lines += ["## Training (MPO stages)", "", TrainSummary(checkpoint=stages[-1]["checkpoint"],
                                                               stages=stages).table(), ""]
        lines += ["![training curves](training_curves.png)", ""] if runs["Speeder"] else []
    rows = accuracy_rows(data)
    if rows:
        plot_bars(rows, storage.join(out, "accuracy.png"), f"{cfg.evaluate.split} split: Speeder vs baselines")
        users = next(iter(rows.values())).get("cand_samples", 0)
        lines += [f"## Accuracy, {cfg.evaluate.split} split ({users:,} users, same candidates for every model)", "",
                  metrics_table(rows), "", "![accuracy](accuracy.png)", ""]
    res = data.get("results")
    if res and comparison_text(res):
        lines += [comparison_text(res), "", "Machine-readable: `results.json` beside this report.", ""]
    if data.get("diagnosis"):
        from speeder_platform.diagnose import diagnose_table

        lines += ["## Diagnosis of the trained model (`speeder diagnose`)", "", diagnose_table(data["diagnosis"]), ""]
    score = ((summary or {}).get("steps", {}).get("score") or {}).get("result")
    if score and storage.exists(score["partition"]):
        lines += ["## Batch scoring", "", f"{score['users_scored']:,} users scored (top-{score['k']}) by "
                  f"{score['model_version']} in {score['seconds']:.1f}s -> `{score['partition']}`", "",
                  scores_sample(cfg, score), ""]
    ui = shlex.join(["speeder", "ui", *command[2:]])
    lines += ["## Try it", "", "Open the Gradio demo on this model (http://127.0.0.1:7860):", "", "```",
              ui, "```", ""]
    return "\n".join(lines)


def write_report(config: str, overrides: list[str], out: str | None = None, baselines: bool = True,
                 diagnose: bool = True) -> str:
    """Collect a finished job's outputs and write report.md, results.json and plots; returns the report's URI.

    Baselines (popularity, SASRec) and the diagnosis are computed when the job did not write them."""
    from speeder_platform.config import load_config

    cfg = load_config(config, overrides)
    out = out or storage.join(cfg.output_root, "report")
    data = collect(cfg)
    if data["summary"] is None and not data["stages"]:
        raise FileNotFoundError(f"no finished job under {cfg.output_root}: run `speeder job {config}` first")
    if data["baselines"] is None and baselines:
        from speeder_platform.baselines_eval import run_baselines

        data["baselines"] = run_baselines(cfg)
    if data["diagnosis"] is None and diagnose and data["metrics"]:
        from speeder_platform.diagnose import run_diagnose

        data["diagnosis"] = run_diagnose(cfg, data["metrics"].get("checkpoint"))
    data["results"] = results(data, cfg.evaluate.out)
    storage.write_json(storage.join(out, "results.json"), data["results"])
    uri = storage.join(out, "report.md")
    # A secret passed as an override (runtime_env.env_vars.X=...) must not reach the report's command lines.
    command = redact(["speeder", "report", config, *overrides])
    storage.write_bytes(uri, render(cfg, data, command, out).encode())
    return uri

"""HTML of the demo's panels: a history, a model's top-K (the held-out item marked), errors, model cards."""

from __future__ import annotations

import html
from typing import Any

SHOWN_METRICS = ("cand_hr@1", "full_hr@10", "full_ndcg@10", "valid_hr1", "valid_hr10")  # eval, else train
CSS = """
.speeder-recs ol, .speeder-history ol { list-style: none; padding: 0; margin: 0; }
.speeder-recs li, .speeder-history li { display: flex; align-items: center; gap: 8px; padding: 4px 6px;
  border-bottom: 1px solid #eee; }
.speeder-recs li.hit { background: #e6f7e6; font-weight: 600; }
.speeder-recs img, .speeder-history img { width: 40px; height: 40px; object-fit: cover; border-radius: 4px; }
.speeder-recs .noimg, .speeder-history .noimg { width: 40px; height: 40px; background: #ddd; border-radius: 4px; }
.speeder-recs .rank { width: 2em; color: #888; } .speeder-recs .score { margin-left: auto; color: #555; }
.speeder-recs .badge { color: #1a7f37; margin-left: 6px; } .speeder-error { color: #b00020; }
"""


def _thumb(item: dict[str, Any]) -> str:
    if item.get("image_url"):
        return f'<img src="/items/{int(item["item_id"])}/image" alt="">'
    return '<span class="noimg"></span>'


def history_html(items: list[dict[str, Any]]) -> str:
    if not items:
        return '<div class="speeder-history"><i>Empty history: load a test user or add items by title.</i></div>'
    rows = "".join(f'<li class="history-item" data-item-id="{int(it["item_id"])}">{_thumb(it)}'
                   f'<span class="title">{html.escape(it["title"])}</span></li>' for it in items)
    return f'<div class="speeder-history"><b>History ({len(items)}, oldest first)</b><ol>{rows}</ol></div>'


def recs_html(label: str, version: str, recs: list[dict[str, Any]], target: dict[str, Any] | None) -> str:
    """The top-K of one model; with a held-out target, whether (and where) it was hit."""
    summary = ""
    if target is not None:
        rank = next((r["rank"] for r in recs if r["item_id"] == target["item_id"]), None)
        verdict = (f'<span class="hit-verdict">hit at rank {rank}</span>' if rank
                   else f'<span class="hit-verdict">not in the top-{len(recs)}</span>')
        summary = f'<div class="summary">Held-out next item: <b>{html.escape(target["title"])}</b>: {verdict}</div>'
    rows = "".join(
        f'<li class="rec-item{" hit" if target and r["item_id"] == target["item_id"] else ""}" '
        f'data-item-id="{int(r["item_id"])}" data-rank="{int(r["rank"])}" data-score="{r["score"]:.4f}">'
        f'<span class="rank">{int(r["rank"])}</span>{_thumb(r)}<span class="title">{html.escape(r["title"])}</span>'
        f'{"<span class=badge>HIT</span>" if target and r["item_id"] == target["item_id"] else ""}'
        f'<span class="score">{r["score"]:.3f}</span></li>' for r in recs)
    return (f'<div class="speeder-recs" data-model="{html.escape(label)}"><b>{html.escape(label)}: '
            f'{html.escape(version)}</b>{summary}<ol>{rows}</ol></div>')


def error_html(label: str, err: Exception) -> str:
    return f'<div class="speeder-recs speeder-error" data-model="{html.escape(label)}">{html.escape(str(err))}</div>'


def model_markdown(label: str, meta: dict[str, Any]) -> str:
    metrics = meta.get("eval_metrics") or meta.get("train_metrics") or {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k in SHOWN_METRICS)
    return (f"**{label}**: `{meta.get('model_version')}`, stage {meta.get('stage')}, "
            f"modalities {', '.join(meta.get('modalities', []))}, {meta.get('num_items')} items"
            + (f"; {shown}" if shown else ""))


# -- the app ----------------------------------------------------------------------------------------

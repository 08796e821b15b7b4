"""The Gradio demo: pick a test user or build a history by title search, see the top-K, compare checkpoints.

    speeder ui jobs/smoke.yaml                                   # in-process: the run's final checkpoint
    speeder ui jobs/smoke.yaml --compare stage1                  # side by side with stage 1's best checkpoint
    speeder ui --endpoint http://127.0.0.1:8000 jobs/smoke.yaml  # through a running `speeder serve`
    speeder ui jobs/demo.yaml --no-baselines                     # Speeder alone (no SASRec / popularity lists)

Beside Speeder's list the demo shows SASRec's (featurize's, the model whose item embeddings Speeder
reads) and popularity's for the same history, so a person sees what Speeder adds. Every change to
the history (a test user loaded, an item added) re-asks every model at once: the feedback is
immediate, no retraining. The page is served on 127.0.0.1 with item images from the
dataset through the app's own `/items/{id}/image` route; no font, script or image comes from a CDN,
and Gradio's analytics and Hugging Face lookups are off.
"""

from __future__ import annotations

import html
import logging
import os
import re
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.responses import Response

from speeder_platform.offline import NO_TELEMETRY
from speeder_platform.serve.recommender import Recommender, RequestError, load_test_users

log = logging.getLogger("speeder.ui")

# Set before gradio is imported: nothing of the demo may reach the internet.
OFFLINE_ENV = {**NO_TELEMETRY, "HF_HUB_OFFLINE": "1"}  # the demo's weights come from installed packages
MAX_UI_K = 50
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


def offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


class Backend(Protocol):
    """What the demo needs from a model: the Serve API, or a recommender in this process."""

    label: str

    def recommend(self, history: list[int], k: int, exclude_history: bool) -> list[dict[str, Any]]: ...
    def search(self, q: str, limit: int) -> list[dict[str, Any]]: ...
    def item(self, item_id: int) -> dict[str, Any]: ...
    def image(self, item_id: int) -> tuple[bytes, str] | None: ...
    def metadata(self) -> dict[str, Any]: ...


class LocalBackend:
    """A checkpoint loaded in this process."""

    def __init__(self, rec: Recommender, label: str = "A") -> None:
        self.rec = rec
        self.label = label

    def recommend(self, history: list[int], k: int, exclude_history: bool) -> list[dict[str, Any]]:
        return self.rec.recommend([history], k=k, exclude_history=exclude_history)[0]

    def search(self, q: str, limit: int) -> list[dict[str, Any]]:
        return self.rec.search(q, limit)

    def item(self, item_id: int) -> dict[str, Any]:
        return self.rec.item(item_id)

    def image(self, item_id: int) -> tuple[bytes, str] | None:
        return self.rec.image(item_id)

    def metadata(self) -> dict[str, Any]:
        return self.rec.metadata()


class HttpBackend:
    """A running Serve endpoint (`speeder serve`); its 4xx answers come back as RequestError.

    It sends the API key as `Authorization: Bearer` when one is set, read as the API reads it
    (serve.api_key_file, else $SPEEDER_API_KEY); the key stays in the client's headers, never logged.
    """

    def __init__(self, endpoint: str, label: str = "A", timeout: float = 60.0,
                 api_key_file: str | None = None) -> None:
        import httpx

        from speeder_platform.serve.app import read_api_key

        self.endpoint = endpoint.rstrip("/")
        self.label = label
        key = read_api_key(api_key_file)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.endpoint, timeout=timeout, headers=headers)

    def _json(self, response: Any) -> Any:
        if response.status_code < 400:
            return response.json()
        try:
            body = response.json()
        except ValueError:
            body = {}
        field = str(body.get("field", "request"))
        detail = str(body.get("detail", f"HTTP {response.status_code}")).removeprefix(f"{field}: ")
        raise RequestError(field, detail, response.status_code)

    def recommend(self, history: list[int], k: int, exclude_history: bool) -> list[dict[str, Any]]:
        body = {"history": history, "k": k, "exclude_history": exclude_history}
        return self._json(self.http.post("/recommend", json=body))["items"]

    def search(self, q: str, limit: int) -> list[dict[str, Any]]:
        return self._json(self.http.get("/items", params={"q": q, "limit": limit}))["items"]

    def item(self, item_id: int) -> dict[str, Any]:
        return self._json(self.http.get(f"/items/{item_id}"))

    def image(self, item_id: int) -> tuple[bytes, str] | None:
        r = self.http.get(f"/items/{item_id}/image")
        return (r.content, r.headers.get("content-type", "image/png")) if r.status_code == 200 else None

    def metadata(self) -> dict[str, Any]:
        return self._json(self.http.get("/metadata"))


class BaselineBackend:
    """A baseline scorer over the same catalog (SASRec, popularity): scores every item for a history and
    takes items' titles and images from Speeder's backend, so the lists look alike."""

    def __init__(self, label: str, version: str, scorer: Any, catalog: Backend, num_items: int) -> None:
        self.label = label
        self.version = version
        self.scorer = scorer  # history (B, H) left-padded with -1 -> scores (B, N)
        self.catalog = catalog
        self.num_items = num_items

    def recommend(self, history: list[int], k: int, exclude_history: bool) -> list[dict[str, Any]]:
        import torch

        bad = [i for i in history if not 0 <= int(i) < self.num_items]
        if bad:
            raise RequestError("history", f"unknown item id {bad[0]} (the catalog has ids 0..{self.num_items - 1})")
        with torch.no_grad():
            scores = self.scorer(torch.tensor([history], dtype=torch.long))[0].float()  # (N,)
        if exclude_history:
            scores[torch.tensor(history, dtype=torch.long)] = float("-inf")
        values, index = scores.topk(min(k, self.num_items - (len(set(history)) if exclude_history else 0)))
        return [{**self.catalog.item(int(i)), "rank": r + 1, "score": float(v)}
                for r, (v, i) in enumerate(zip(values.tolist(), index.tolist(), strict=True))]

    def search(self, q: str, limit: int) -> list[dict[str, Any]]:
        return self.catalog.search(q, limit)

    def item(self, item_id: int) -> dict[str, Any]:
        return self.catalog.item(item_id)

    def image(self, item_id: int) -> tuple[bytes, str] | None:
        return self.catalog.image(item_id)

    def metadata(self) -> dict[str, Any]:
        return {"model_version": self.version, "num_items": self.num_items, "modalities": []}


def baseline_backends(cfg: Any, catalog: Backend) -> list[Backend]:
    """SASRec (featurize's, as trained for the sequence features) and popularity (train interactions) on
    the config's dataset; SASRec is left out when the features hold none."""
    from speeder_platform import storage
    from speeder_platform.baselines_eval import (
        popularity_from_sequences,
        popularity_scorer,
        sasrec_scorer,
        train_item_counts,
    )
    from speeder_platform.featurize.sequence import SASREC_META, load_sasrec, sasrec_dir
    from speeder_platform.tables import features_folder

    sequences, num_items = train_item_counts(cfg.data.uri)
    out: list[Backend] = []
    directory = sasrec_dir(features_folder(cfg.data.uri, cfg.featurize.name))
    if storage.exists(storage.join(directory, SASREC_META)):
        sasrec, meta = load_sasrec(directory)
        epochs = len(meta.get("stats") or [])
        out.append(BaselineBackend("SASRec", f"featurize's SASRec, {epochs} epochs", sasrec_scorer(sasrec), catalog,
                                   num_items))
    out.append(BaselineBackend("Popularity", "train interactions per item",
                               popularity_scorer(popularity_from_sequences(sequences, num_items)), catalog, num_items))
    return out


# -- rendering (plain HTML, escaped; images from this app's own route) ------------------------------
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
def build_demo(backends: list[Backend], test_users: dict[int, tuple[list[int], int]] | None = None) -> Any:
    """The Gradio Blocks over one or two backends (the first also answers search and item lookups)."""
    offline_env()
    import gradio as gr

    main = backends[0]
    metas = [b.metadata() for b in backends]
    test_users = test_users or {}
    max_k = min(MAX_UI_K, int(metas[0].get("limits", {}).get("max_k", MAX_UI_K)))

    def items_of(ids: list[int]) -> list[dict[str, Any]]:
        return [main.item(i) for i in ids]

    def recommend(state: dict, k: float, exclude: bool) -> list[str]:
        history, target_id = state.get("history", []), state.get("target")
        if not history:
            return ['<div class="speeder-recs"><i>Add items to the history to get recommendations.</i></div>'
                    for _ in backends]
        target = main.item(target_id) if target_id is not None else None
        out = []
        for backend, meta in zip(backends, metas, strict=True):
            try:
                recs = backend.recommend(history, int(k), bool(exclude))
                out.append(recs_html(backend.label, meta.get("model_version", "?"), recs, target))
            except RequestError as err:
                out.append(error_html(backend.label, err))
        return out

    def load_user(user: Any) -> tuple[dict, str]:
        if user is None or int(user) not in test_users:
            return {"history": [], "target": None}, history_html([])
        history, target = test_users[int(user)]
        return {"history": list(history), "target": target, "user": int(user)}, history_html(items_of(history))

    def search(q: str) -> tuple[Any, str]:
        try:
            found = main.search(q or "", 20)
        except RequestError as err:
            return gr.update(choices=[], value=None), f"**{html.escape(str(err))}**"
        choices = [(f"{it['title']} ({it['source_id']})", int(it["item_id"])) for it in found]
        return gr.update(choices=choices, value=None), f"{len(found)} match(es) for '{html.escape(q or '')}'"

    def add(item_id: Any, state: dict) -> tuple[dict, str]:
        history = list(state.get("history", []))
        if item_id is not None:
            history.append(int(item_id))
        # A loaded user's held-out item stays: watch whether the added items bring it into the top-K.
        return {**state, "history": history}, history_html(items_of(history))

    def clear() -> tuple[dict, str]:
        return {"history": [], "target": None}, history_html([])

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # system fonts: no Google Fonts
    with gr.Blocks(title="Speeder demo") as demo:
        gr.Markdown("# Speeder: multimodal sequential recommendation\n"
                    + "\n\n".join(model_markdown(b.label, m) for b, m in zip(backends, metas, strict=True)))
        state = gr.State({"history": [], "target": None})
        with gr.Row():
            with gr.Column(scale=1):
                user = gr.Dropdown(label="Test user", choices=sorted(test_users), value=None,
                                   interactive=True, visible=bool(test_users))
                load = gr.Button("Load test user", visible=bool(test_users))
                query = gr.Textbox(label="Search titles", placeholder="e.g. mug")
                search_btn = gr.Button("Search")
                search_note = gr.Markdown()
                matches = gr.Radio(label="Matches", choices=[], interactive=True)
                add_btn = gr.Button("Add to history", variant="primary")
                clear_btn = gr.Button("Clear history")
                k = gr.Slider(1, max_k, value=min(10, max_k), step=1, label="Top-K")
                exclude = gr.Checkbox(value=True, label="Exclude history items")
                rec_btn = gr.Button("Recommend", variant="primary")
            with gr.Column(scale=3):
                hist_view = gr.HTML(history_html([]), elem_id="history")
                with gr.Row():
                    panels = [gr.HTML(elem_id=f"recs-{b.label}") for b in backends]
        inputs = [state, k, exclude]
        load.click(load_user, user, [state, hist_view]).then(recommend, inputs, panels)
        search_btn.click(search, query, [matches, search_note])
        query.submit(search, query, [matches, search_note])
        add_btn.click(add, [matches, state], [state, hist_view]).then(recommend, inputs, panels)
        clear_btn.click(clear, None, [state, hist_view]).then(recommend, inputs, panels)
        rec_btn.click(recommend, inputs, panels)
    return demo, theme


def create_app(backends: list[Backend], test_users: dict[int, tuple[list[int], int]] | None = None) -> FastAPI:
    """FastAPI app: item images at /items/{id}/image, the Gradio demo at /."""
    offline_env()
    import gradio as gr

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/items/{item_id}/image")
    def image(item_id: int) -> Response:
        try:
            found = backends[0].image(item_id)
        except RequestError:
            found = None
        if found is None:
            return Response(status_code=404)
        return Response(found[0], media_type=found[1], headers={"Cache-Control": "public, max-age=3600"})

    demo, theme = build_demo(backends, test_users)
    return gr.mount_gradio_app(app, demo, path="/", theme=theme, css=CSS, ssr_mode=False, footer_links=[])


def _backend(spec: str | None, cfg: Any, label: str) -> Backend:
    """An endpoint URL, `stageN` (that stage's best checkpoint in the config's run), a checkpoint URI, or
    None (serve.checkpoint, else the run's final checkpoint), loaded in this process."""
    if spec and spec.startswith(("http://", "https://")):
        return HttpBackend(spec, label, api_key_file=cfg.serve.api_key_file)
    from speeder_platform import storage
    from speeder_platform.serve.app import serve_settings

    if spec and re.fullmatch(r"stage\d", spec):
        from speeder_platform.trained import FINAL_FILE, run_uri

        stages = storage.read_json(storage.join(run_uri(cfg), FINAL_FILE))["stages"]
        found = [s["checkpoint"] for s in stages if f"stage{s['stage']}" == spec]
        if not found:
            raise ValueError(f"--compare: the run has no {spec} (stages {[s['stage'] for s in stages]})")
        spec = found[0]
    s = serve_settings(cfg, spec)
    return LocalBackend(Recommender.from_checkpoint(s.checkpoint, s.dataset, s.features_name, limits=s.limits,
                                                    eval_metrics_uri=s.eval_metrics_uri), label)


def run_ui(config: str | None = None, overrides: list[str] | None = None, endpoint: str | None = None,
           checkpoint: str | None = None, compare: str | None = None, host: str = "127.0.0.1",
           port: int = 7860, baselines: bool = True) -> int:
    """`speeder ui`: build the backends, then serve the demo on host:port until Ctrl-C.

    baselines: SASRec's and popularity's lists beside Speeder's (needs the config's dataset)."""
    import uvicorn

    from speeder_platform.config import load_config

    offline_env()
    if endpoint is None and config is None:
        raise ValueError("speeder ui: give a CONFIG (in-process model) or --endpoint URL")
    cfg = load_config(config, overrides)
    backends = [_backend(endpoint or checkpoint, cfg, "A")]
    if compare:
        backends.append(_backend(compare, cfg, "B"))
    if baselines and config:
        try:
            backends += baseline_backends(cfg, backends[0])
        except (OSError, ValueError) as err:
            log.warning("no baseline lists (%s)", err)
    dataset = cfg.data.uri if config else backends[0].metadata().get("dataset")
    try:
        test_users = load_test_users(dataset) if dataset else {}
    except (OSError, ValueError) as err:
        log.warning("no test users (%s): search titles to build a history", err)
        test_users = {}
    log.info("demo on http://%s:%d", host, port)
    uvicorn.run(create_app(backends, test_users), host=host, port=port, log_level="warning")
    return 0

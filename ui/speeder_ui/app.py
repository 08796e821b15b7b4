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
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

from speeder_platform.offline import NO_TELEMETRY
from speeder_platform.serve.recommender import RequestError, load_test_users
from speeder_ui.backends import Backend, baseline_backends, load_backend
from speeder_ui.render import CSS, error_html, history_html, model_markdown, recs_html

log = logging.getLogger("speeder.ui")

# Set before gradio is imported: nothing of the demo may reach the internet.
OFFLINE_ENV = {**NO_TELEMETRY, "HF_HUB_OFFLINE": "1"}  # the demo's weights come from installed packages
MAX_UI_K = 50


def offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


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
    backends = [load_backend(endpoint or checkpoint, cfg, "A")]
    if compare:
        backends.append(load_backend(compare, cfg, "B"))
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

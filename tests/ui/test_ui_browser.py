"""End to end in a real browser: headless Debian Chromium (playwright) drives the Gradio demo.

The demo runs in-process on a free loopback port with two tiny checkpoints side by side (A: stage 3,
B: stage 1) and the baselines' lists (a SASRec, popularity) beside them. The test searches a title,
adds it to the history, reads the top-K from the page, adds a second item and sees the recommendations
change, loads a test user and reads the hit verdict. Every request the page makes must stay on
127.0.0.1. A screenshot is written to test-artifacts/ui-recommendations.png.
"""

from __future__ import annotations

import pathlib
import shutil
import socket
import threading
import time

import pytest

from testkit.datasets import prepare_synthetic, tiny_config, write_checkpoint, write_random_features

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "test-artifacts" / "ui-recommendations.png"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory):
    import torch
    import uvicorn

    from speeder.sasrec import SASRec
    from speeder_platform.baselines_eval import (
        popularity_from_sequences,
        popularity_scorer,
        sasrec_scorer,
        train_item_counts,
    )
    from speeder_platform.serve.recommender import Limits, Recommender, load_test_users
    from speeder_ui.app import create_app
    from speeder_ui.backends import BaselineBackend, LocalBackend

    root = tmp_path_factory.mktemp("ui")
    data = prepare_synthetic(str(root / "data"))
    write_random_features(data)
    cfg = tiny_config(str(root), f"data.uri={data}")
    stage3 = write_checkpoint(cfg, str(root / "stage3"), stage=3, seed=0)
    stage1 = write_checkpoint(cfg, str(root / "stage1"), stage=1, seed=1)
    backends = [LocalBackend(Recommender.from_checkpoint(stage3, limits=Limits(max_k=20)), "A"),
                LocalBackend(Recommender.from_checkpoint(stage1, limits=Limits(max_k=20)), "B")]
    sequences, n = train_item_counts(data)
    popularity = popularity_from_sequences(sequences, n)
    torch.manual_seed(0)
    backends += [BaselineBackend("SASRec", "tiny", sasrec_scorer(SASRec(n, hidden_size=8, max_length=10)),
                                 backends[0], n),
                 BaselineBackend("Popularity", "train counts", popularity_scorer(popularity), backends[0], n)]
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(backends, load_test_users(data)), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline, "the demo did not start"
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}", backends[0].rec, popularity
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _recs(page, model: str) -> list[dict]:
    return page.locator(f'.speeder-recs[data-model="{model}"] li.rec-item').evaluate_all(
        "els => els.map(e => ({id: +e.dataset.itemId, rank: +e.dataset.rank, score: +e.dataset.score, "
        "title: e.querySelector('.title').textContent}))")


@pytest.mark.skipif(not pathlib.Path(CHROMIUM).exists(), reason="Debian chromium is not installed (make browser)")
def test_search_recommend_compare_in_chromium(demo_url) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, rec, popularity = demo_url
    mug = next(i for i, t in enumerate(rec.titles) if t.startswith("Mug"))
    other = next(i for i, t in enumerate(rec.titles) if t.startswith("Lamp"))
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url)
            page.get_by_label("Search titles").wait_for()

            # Search a title, pick the match, add it to the history: recommendations appear at once.
            page.get_by_label("Search titles").fill(rec.titles[mug])
            page.get_by_role("button", name="Search", exact=True).click()
            page.get_by_label(f"{rec.titles[mug]} ({rec.source_ids[mug]})").check()
            page.get_by_role("button", name="Add to history").click()
            expect(page.locator("#history li.history-item")).to_have_count(1)
            expect(page.locator('.speeder-recs[data-model="A"] li.rec-item')).to_have_count(10)
            first = _recs(page, "A")
            assert [r["rank"] for r in first] == list(range(1, 11))
            assert mug not in {r["id"] for r in first}  # history items are excluded
            assert all(r["title"] == rec.titles[r["id"]] for r in first)
            scores = [r["score"] for r in first]
            assert scores == sorted(scores, reverse=True)
            expected = rec.recommend([[mug]], k=10)[0]
            assert [r["id"] for r in first] == [r["item_id"] for r in expected]
            expect(page.locator('.speeder-recs[data-model="B"] li.rec-item')).to_have_count(10)
            # The baselines' lists for the same history, beside Speeder's.
            expect(page.locator('.speeder-recs[data-model="SASRec"] li.rec-item')).to_have_count(10)
            popular = [r["id"] for r in _recs(page, "Popularity")]
            counts = popularity.counts.clone()
            counts[mug] = -1  # history items are excluded for every model
            assert popular == counts.topk(10).indices.tolist()

            # Real-time feedback: one more item in the history, new recommendations, no retraining.
            page.get_by_label("Search titles").fill(rec.titles[other])
            page.get_by_role("button", name="Search", exact=True).click()
            page.get_by_label(f"{rec.titles[other]} ({rec.source_ids[other]})").check()
            page.get_by_role("button", name="Add to history").click()
            expect(page.locator("#history li.history-item")).to_have_count(2)
            expected2 = rec.recommend([[mug, other]], k=10)[0]
            expect(page.locator('.speeder-recs[data-model="A"] li.rec-item').first).to_have_attribute(
                "data-score", f"{expected2[0]['score']:.4f}")
            second = _recs(page, "A")
            assert [r["id"] for r in second] == [r["item_id"] for r in expected2]
            assert [r["score"] for r in second] != scores

            # A test user: their history, the top-K and whether the held-out next item was hit.
            user_id = sorted(rec.test_users)[0]
            history, target = rec.test_users[user_id]
            page.get_by_label("Test user").click()
            page.get_by_role("option", name=str(user_id), exact=True).click()
            page.get_by_role("button", name="Load test user").click()
            expect(page.locator("#history li.history-item")).to_have_count(len(history))
            top = [r["item_id"] for r in rec.recommend([history], k=10)[0]]
            verdict = f"hit at rank {top.index(target) + 1}" if target in top else "not in the top-10"
            expect(page.locator('.speeder-recs[data-model="A"] .hit-verdict')).to_have_text(verdict)
            expect(page.locator('.speeder-recs[data-model="B"] .hit-verdict')).to_have_count(1)

            page.locator('.speeder-recs[data-model="A"] img').first.wait_for()
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            print(f"screenshot: {SCREENSHOT}")
            images_loaded = page.locator('.speeder-recs[data-model="A"] img').evaluate_all(
                "els => els.filter(e => e.complete && e.naturalWidth > 0).length")
            assert images_loaded > 0
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 10_000
    outside = sorted({u for u in requests if not u.startswith(("http://127.0.0.1:", "data:", "blob:"))})
    assert not outside, f"the page reached outside loopback: {outside}"
    assert any("/items/" in u and u.endswith("/image") for u in requests)

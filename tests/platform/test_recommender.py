"""The recommender core and the HTTP API over it, in-process (no Ray): fast checks of every rule."""

from __future__ import annotations

import pytest

from speeder_platform.serve.recommender import Limits, Recommender, RequestError, load_test_users
from testkit.datasets import prepare_synthetic, tiny_config, write_checkpoint, write_random_features


@pytest.fixture(scope="module")
def rec(tmp_path_factory: pytest.TempPathFactory) -> Recommender:
    root = tmp_path_factory.mktemp("rec")
    data = prepare_synthetic(str(root / "data"))
    write_random_features(data)
    cfg = tiny_config(str(root), f"data.uri={data}")
    ckpt = write_checkpoint(cfg, str(root / "ckpt"))
    return Recommender.from_checkpoint(ckpt, limits=Limits(max_history=12, max_k=20, max_batch_requests=4))


def test_recommend_excludes_history_and_ranks_descending(rec: Recommender) -> None:
    (items,) = rec.recommend([[0, 1, 2]], k=5)
    assert [r["rank"] for r in items] == [1, 2, 3, 4, 5]
    scores = [r["score"] for r in items]
    assert scores == sorted(scores, reverse=True)
    assert not {0, 1, 2} & {r["item_id"] for r in items}
    assert all(r["title"] == rec.titles[r["item_id"]] for r in items)
    (with_history,) = rec.recommend([[0, 1, 2]], k=4, candidates=[[0, 1, 2, 5]], exclude_history=False)
    assert {r["item_id"] for r in with_history} == {0, 1, 2, 5}


def test_source_ids_resolve_to_the_same_items(rec: Recommender) -> None:
    by_id = rec.recommend([[3, 4]], k=5)[0]
    by_source = rec.recommend([[rec.source_ids[3], rec.source_ids[4]]], k=5)[0]
    assert [r["item_id"] for r in by_id] == [r["item_id"] for r in by_source]
    assert by_id[0]["score"] == pytest.approx(by_source[0]["score"])


def test_batch_is_one_forward_and_matches_single_requests(rec: Recommender) -> None:
    histories = [[0, 1], [5, 6, 7], [9]]
    before = rec.stats["forwards"]
    batch = rec.recommend(histories, k=4)
    assert rec.stats["forwards"] == before + 1 and rec.stats["max_batch"] >= 3
    for history, items in zip(histories, batch, strict=True):
        single = rec.recommend([history], k=4)[0]
        assert [r["item_id"] for r in items] == [r["item_id"] for r in single]
        assert [r["score"] for r in items] == pytest.approx([r["score"] for r in single], abs=1e-4)


def test_candidates_restrict_the_pool_and_k_is_capped_by_it(rec: Recommender) -> None:
    (items,) = rec.recommend([[0, 1]], k=10, candidates=[[1, 7, 8, 7, 9]])
    assert {r["item_id"] for r in items} == {7, 8, 9}  # history item 1 excluded, duplicate 7 once


@pytest.mark.parametrize("kwargs, field", [
    ({"history": []}, "history"),
    ({"history": list(range(13))}, "history"),
    ({"history": [0, 999]}, "history[1]"),
    ({"history": [0, -1]}, "history[1]"),
    ({"history": [0, "no-such-item"]}, "history[1]"),
    ({"history": [0, 1.5]}, "history[1]"),
    ({"history": [True]}, "history[0]"),
    ({"history": "0,1"}, "history"),
    ({"history": [0], "k": 0}, "k"),
    ({"history": [0], "k": -3}, "k"),
    ({"history": [0], "k": 21}, "k"),
    ({"history": [0], "k": "5"}, "k"),
    ({"history": [0], "exclude_history": "yes"}, "exclude_history"),
    ({"history": [0], "candidates": []}, "candidates"),
    ({"history": [0], "candidates": [3, 500]}, "candidates[1]"),
])
def test_bad_queries_name_the_field(rec: Recommender, kwargs: dict, field: str) -> None:
    with pytest.raises(RequestError) as err:
        rec.query(**kwargs)
    assert err.value.field == field and err.value.status == 422
    assert str(err.value).startswith(f"{field}: ")


def test_batch_limits_name_the_field(rec: Recommender) -> None:
    with pytest.raises(RequestError, match=r"^histories: at most 4"):
        rec.queries([[0]] * 5)
    with pytest.raises(RequestError) as err:
        rec.queries([[0], [1, 999]])
    assert err.value.field == "histories[1][1]"
    with pytest.raises(RequestError) as err:
        rec.queries([[0], [1]], candidates=[[2, 3]])
    assert err.value.field == "candidates"


def test_item_search_and_images(rec: Recommender) -> None:
    assert rec.item(2)["title"] == rec.titles[2]
    with pytest.raises(RequestError) as err:
        rec.item(10_000)
    assert err.value.status == 404 and err.value.field == "id"
    word = rec.titles[5].split()[0]
    found = rec.search(word.upper(), limit=50)
    assert found and all(word.lower() in r["title"].lower() for r in found)
    assert rec.search(rec.source_ids[7])[0]["item_id"] == 7  # an exact source id comes first
    assert len(rec.search("", limit=3)) == 3
    with pytest.raises(RequestError, match="^q: "):
        rec.search("x" * 500)
    with_image = next(i for i in range(rec.num_items) if rec.images[i])
    data, media_type = rec.image(with_image)
    assert data[:4] == b"\x89PNG" and media_type == "image/png"
    assert rec.item(with_image)["image_url"] == f"/items/{with_image}/image"


def test_metadata_and_test_users(rec: Recommender) -> None:
    meta = rec.metadata()
    assert meta["stage"] == 3 and meta["num_items"] == rec.num_items and meta["model_version"].endswith("step0")
    assert meta["limits"]["max_k"] == 20 and meta["batching"]["forwards"] >= 0
    users = load_test_users(rec.dataset)
    assert users and rec.test_users == users
    history, target = next(iter(users.values()))
    assert history and 0 <= target < rec.num_items


# -- the HTTP API over it, through Starlette's in-process client ----------------------------------
@pytest.fixture(scope="module")
def client(rec: Recommender):
    from fastapi.testclient import TestClient

    from speeder_platform.serve.app import build_api

    async def direct(queries):
        return rec.recommend_queries(queries)

    return TestClient(build_api(rec, direct, max_body_bytes=64 * 1024))


def test_api_good_requests(client, rec: Recommender) -> None:
    r = client.post("/recommend", json={"history": [0, rec.source_ids[1]], "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["history"] == [0, 1] and len(body["items"]) == 3
    r = client.post("/recommend/batch", json={"histories": [[0], [1, 2]], "k": 2})
    assert r.status_code == 200 and [len(x["items"]) for x in r.json()["results"]] == [2, 2]
    assert client.get("/items/3").json()["item_id"] == 3
    assert client.get("/items", params={"q": rec.titles[4]}).json()["items"][0]["item_id"] == 4
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/metadata").json()["num_items"] == rec.num_items
    with_image = next(i for i in range(rec.num_items) if rec.images[i])
    assert client.get(f"/items/{with_image}/image").headers["content-type"] == "image/png"


@pytest.mark.parametrize("body, status, field", [
    (b"{not json", 400, "body"),
    (b"", 400, "body"),
    (b"[1, 2]", 422, "body"),
    (b'{"history": [0], "k": NaN}', 400, "body"),
    (b'{"k": 3}', 422, "history"),
    (b'{"history": [0], "kk": 3}', 422, "kk"),
    (b'{"history": [0], "k": 1e400}', 422, "k"),
    (b'{"history": [0], "k": 3.5}', 422, "k"),
    (b'{"history": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", 400, "body"),
    (b'{"history": [0], "pad": "' + b"x" * 70_000 + b'"}', 413, "body"),
])
def test_api_bad_bodies(client, body: bytes, status: int, field: str) -> None:
    r = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["field"] == field


def test_api_streamed_body_over_the_limit_is_refused(client) -> None:
    def chunks():
        for _ in range(100):
            yield b"x" * 1024

    r = client.post("/recommend", content=chunks())  # chunked: no Content-Length to check
    assert r.status_code == 413 and r.json()["field"] == "body"


def test_api_bad_paths_and_params(client) -> None:
    assert client.get("/items/100000").status_code == 404
    r = client.get("/items/abc")
    assert r.status_code == 422 and r.json()["field"] == "id"
    r = client.get("/items", params={"q": "a", "limit": "many"})
    assert r.status_code == 422 and r.json()["field"] == "limit"
    assert client.get("/docs").status_code == 404  # Swagger UI would load CDN assets



def test_metadata_reports_eval_metrics_of_this_checkpoint_only(rec: Recommender, tmp_path) -> None:
    from speeder_platform import storage

    ckpt = rec.trained.checkpoint
    ours, other = str(tmp_path / "ours.json"), str(tmp_path / "other.json")
    storage.write_json(ours, {"checkpoint": ckpt + "/", "metrics": {"cand_hr@1": 0.25}})
    storage.write_json(other, {"checkpoint": "/elsewhere/ckpt", "metrics": {"cand_hr@1": 0.5}})
    assert Recommender.from_checkpoint(ckpt, eval_metrics_uri=ours).metadata()["eval_metrics"] == {"cand_hr@1": 0.25}
    assert Recommender.from_checkpoint(ckpt, eval_metrics_uri=other).metadata()["eval_metrics"] is None

"""The recommendation API on a real Ray Serve instance on loopback: good, bad and hostile requests, the
API key, overload and the request timeout, as Serve's proxy and the replicas answer them.

One Serve instance for the whole module (deploying costs seconds), shut down at the end: the API under
test, and a second application that answers slowly (its batches wait far longer than the timeout).
The API key reaches the replicas through serve.api_key_file, as it would from a mounted secret.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from speeder_platform.serve.proxy import install_proxy_hook
from testkit.datasets import prepare_synthetic, tiny_config, write_checkpoint, write_random_features

pytestmark = pytest.mark.integration

# Serve's proxy reads its middleware hook from the environment of the Ray it runs in: set it before any
# test starts the session's Ray (collection comes first), as `speeder serve` does before it starts one.
install_proxy_hook()

KEY = secrets.token_hex(16)
TIMEOUT_S = 5.0  # serve.request_timeout_s here: far above any answer of the API under test, and short
SLOW_APP = "speeder-slow"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, s3_server: str, _ray_session: None):
    """Serve on 127.0.0.1:<free port> with a tiny untrained checkpoint and an API key; yields
    (base URL, port, items, key file, settings)."""
    from ray import serve

    from speeder_platform import storage
    from speeder_platform.serve.app import serve_settings, start

    root = tmp_path_factory.mktemp("serve")
    data = prepare_synthetic(str(root / "data"))
    write_random_features(data)
    key_file = root / "api-key"
    key_file.write_text(KEY + "\n")
    cfg = tiny_config(str(root), f"data.uri={data}", "serve.max_history=12", "serve.max_k=20",
                      "serve.max_batch_requests=8", "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.2",
                      f"serve.api_key_file={key_file}", f"serve.request_timeout_s={TIMEOUT_S}")
    ckpt = write_checkpoint(cfg, str(root / "ckpt"))
    port = _free_port()
    settings = serve_settings(cfg, ckpt)
    url = start(cfg, settings, port=port, name="speeder-test")
    items = storage.read_table(storage.join(data, "items.parquet")).to_pylist()
    try:
        yield url, port, items, str(key_file), settings
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server[0], timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def _replica_pids(app: str) -> set[int]:
    from speeder_platform.bench.faults.env import alive_actors

    return {a["pid"] for a in alive_actors(f"ServeReplica:{app}:SpeederServer")}


def test_recommend_by_item_and_source_ids(http: httpx.Client, server) -> None:
    items = server[2]
    r = http.post("/recommend", json={"history": [0, items[1]["source_id"], 2], "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["history"] == [0, 1, 2] and body["model_version"].startswith("speeder/stage3")
    recs = body["items"]
    assert len(recs) == 5 and not {0, 1, 2} & {x["item_id"] for x in recs}
    assert [x["score"] for x in recs] == sorted((x["score"] for x in recs), reverse=True)
    first = recs[0]
    assert first["title"] == items[first["item_id"]]["title"] and first["source_id"]
    if first["image_url"]:
        image = http.get(first["image_url"])
        assert image.status_code == 200 and image.content[:4] == b"\x89PNG"


def test_candidates_batch_items_search_health_metadata(http: httpx.Client, server) -> None:
    items = server[2]
    r = http.post("/recommend", json={"history": [0], "k": 3, "candidates": [4, 5, 6, 7]})
    assert r.status_code == 200 and {x["item_id"] for x in r.json()["items"]} <= {4, 5, 6, 7}
    r = http.post("/recommend/batch", json={"histories": [[0, 1], [2], [3, 4, 5]], "k": 2})
    assert r.status_code == 200, r.text
    assert [len(x["items"]) for x in r.json()["results"]] == [2, 2, 2]
    assert http.get("/items/7").json()["title"] == items[7]["title"]
    found = http.get("/items", params={"q": items[9]["title"]}).json()["items"]
    assert found[0]["item_id"] == 9
    assert http.get("/healthz").json()["status"] == "ok"
    meta = http.get("/metadata").json()
    assert meta["stage"] == 3 and meta["num_items"] == len(items) and "train_metrics" in meta
    assert meta["serve"]["max_batch_size"] == 8 and meta["limits"]["max_history"] == 12
    assert meta["serve"]["api_key_required"] is True


def test_metadata_holds_no_path_pid_host_or_key(http: httpx.Client, server) -> None:
    settings = server[4]
    text = http.get("/metadata").text
    pids = _replica_pids("speeder-test")
    assert pids
    for leak in (settings.checkpoint, settings.dataset, server[3], socket.gethostname(), KEY, *map(str, pids)):
        assert leak not in text, leak
    assert "pid" not in json.loads(text)["serve"]


def test_every_endpoint_but_healthz_needs_the_key(server) -> None:
    url = server[0]
    with_image = next(i for i, it in enumerate(server[2]) if it["image_uri"])
    routes = [("POST", "/recommend", {"history": [0]}), ("POST", "/recommend/batch", {"histories": [[0]]}),
              ("GET", "/items?q=a", None), ("GET", "/items/3", None), ("GET", f"/items/{with_image}/image", None),
              ("GET", "/metadata", None), ("GET", "/openapi.json", None)]
    wrong = ({}, {"Authorization": "Bearer " + secrets.token_hex(16)}, {"Authorization": f"Basic {KEY}"})
    with httpx.Client(base_url=url, timeout=60) as anonymous:
        for method, path, body in routes:
            for headers in wrong:
                r = anonymous.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (method, path, r.text)
                assert r.headers["www-authenticate"] == "Bearer" and r.json()["field"] == "authorization"
                assert KEY not in r.text
            r = anonymous.request(method, path, json=body, headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 200, (method, path, r.text)
        assert anonymous.get("/healthz").status_code == 200


@pytest.mark.parametrize("path, body, status, field", [
    ("/recommend", {"history": []}, 422, "history"),
    ("/recommend", {"history": list(range(13))}, 422, "history"),
    ("/recommend", {"history": [0, 10_000]}, 422, "history[1]"),
    ("/recommend", {"history": [0, "no-such-source-id"]}, 422, "history[1]"),
    ("/recommend", {"history": [0, [1]]}, 422, "history[1]"),
    ("/recommend", {"history": "0 1 2"}, 422, "history"),
    ("/recommend", {"history": [0], "k": 0}, 422, "k"),
    ("/recommend", {"history": [0], "k": 21}, 422, "k"),
    ("/recommend", {"history": [0], "k": "ten"}, 422, "k"),
    ("/recommend", {"history": [0], "exclude_history": 1}, 422, "exclude_history"),
    ("/recommend", {"history": [0], "candidates": [1, -2]}, 422, "candidates[1]"),
    ("/recommend", {"history": [0], "user": 3}, 422, "user"),
    ("/recommend", {"k": 3}, 422, "history"),
    ("/recommend", [0, 1], 422, "body"),
    ("/recommend/batch", {"histories": []}, 422, "histories"),
    ("/recommend/batch", {"histories": [[0]] * 9}, 422, "histories"),
    ("/recommend/batch", {"histories": [[0], [5, 10_000]]}, 422, "histories[1][1]"),
])
def test_bad_input_is_a_4xx_naming_the_field(http: httpx.Client, path: str, body, status: int, field: str) -> None:
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and r.json()["detail"].startswith(f"{field}: ")


def test_malformed_requests(http: httpx.Client) -> None:
    r = http.post("/recommend", content=b'{"history": [0,', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "body"
    r = http.get("/items/not-a-number")
    assert r.status_code == 422 and r.json()["field"] == "id"
    r = http.get("/items/99999")
    assert r.status_code == 404 and r.json()["field"] == "id"
    r = http.get("/items", params={"q": "x", "limit": 0})
    assert r.status_code == 422 and r.json()["field"] == "limit"
    r = http.get("/recommend")
    assert r.status_code == 405 and r.json()["field"] is None


def test_hostile_payloads_get_4xx_and_the_replica_survives(http: httpx.Client) -> None:
    pids_before = _replica_pids("speeder-test")
    ten_mb = b'{"history": [' + b"1," * (5 * 1024 * 1024) + b'1]}'
    r = http.post("/recommend", content=ten_mb, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"

    def streamed():  # chunked transfer: no Content-Length, the server has to count
        for _ in range(10):
            yield b" " * (1024 * 1024)

    r = http.post("/recommend", content=streamed(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    deep = b'{"history": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    r = http.post("/recommend", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "recursion" in r.json()["detail"]
    r = http.post("/recommend", json={"history": [0], "k": -5})
    assert r.status_code == 422 and r.json()["field"] == "k"
    r = http.post("/recommend", json={"history": list(range(50)) * 2000})  # 100,000 ids, ~390 KB
    assert r.status_code == 422 and r.json()["field"] == "history"
    r = http.post("/recommend", json={"history": [0], "k": 10**30})
    assert r.status_code == 422 and r.json()["field"] == "k"
    assert http.get("/healthz").status_code == 200
    assert _replica_pids("speeder-test") == pids_before  # the same replica process
    assert http.post("/recommend", json={"history": [0, 1], "k": 3}).status_code == 200


def test_concurrent_requests_are_batched(http: httpx.Client, server) -> None:
    before = http.get("/metadata").json()["batching"]
    n = 16

    def one(i: int) -> int:
        with httpx.Client(base_url=server[0], timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
            return c.post("/recommend", json={"history": [i % 10, (i + 3) % 10], "k": 3}).status_code

    with ThreadPoolExecutor(n) as pool:
        codes = list(pool.map(one, range(n)))
    assert codes == [200] * n
    after = http.get("/metadata").json()["batching"]
    requests = after["requests"] - before["requests"]
    forwards = after["forwards"] - before["forwards"]
    assert requests == n
    assert forwards < n and after["max_batch"] > 1, (forwards, after)


def test_http_port_listens_on_loopback_only(server) -> None:
    port = server[1]
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    local = [line.split()[3] for line in out.splitlines() if line.strip()]
    assert local, f"nothing listens on port {port}"
    assert all(addr.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]") for addr in local), local


def test_openapi_lists_the_routes(http: httpx.Client) -> None:
    paths = set(json.loads(http.get("/openapi.json").text)["paths"])
    assert {"/recommend", "/recommend/batch", "/items", "/items/{id}", "/items/{id}/image", "/healthz",
            "/metadata"} == paths


@pytest.fixture(scope="module")
def slow_url(server) -> str:
    """A second application whose batches wait 60 s for company: every request outlives the timeout.
    A replica holds 2 requests and 2 more may wait at the proxy; the rest must be refused at once."""
    from ray import serve

    from speeder_platform.serve.app import application

    settings = dataclasses.replace(server[4], max_batch_size=64, batch_wait_timeout_s=60.0, max_ongoing_requests=2,
                                   max_queued_requests=2, replica_num_cpus=0.5)
    serve.run(application(settings), name=SLOW_APP, route_prefix="/slow")
    return f"{server[0]}/slow"


def test_overload_is_a_fast_503_and_a_slow_request_a_504(slow_url: str, http: httpx.Client) -> None:
    from speeder_platform.serve.api import ErrorBody

    doc = http.get("/openapi.json").json()["paths"]["/recommend"]["post"]["responses"]
    n = 12

    def one(i: int) -> tuple[int, float, httpx.Response]:
        started = time.perf_counter()
        with httpx.Client(timeout=3 * TIMEOUT_S, headers={"Authorization": f"Bearer {KEY}"}) as c:
            r = c.post(f"{slow_url}/recommend", json={"history": [i % 10], "k": 3})
        return r.status_code, time.perf_counter() - started, r

    # Fill the replica (2 running) and its queue (2 waiting) first, then burst: Serve counts a request only
    # once it reaches the router, so a single burst of 12 on a loaded machine lets more than 4 in (7 did,
    # in a CI run). Staggered, every request of the burst finds the queue full.
    with ThreadPoolExecutor(n) as pool:
        first = [pool.submit(one, i) for i in range(4)]
        time.sleep(1.5)
        burst = [pool.submit(one, i) for i in range(4, n)]
        results = [f.result() for f in first + burst]
    refused = [(t, r) for code, t, r in results if code == 503]
    timed_out = [(t, r) for code, t, r in results if code == 504]
    assert len(refused) + len(timed_out) == n, [(code, round(t, 2), r.text[:120]) for code, t, r in results]
    burst_refused = [code for code, _, _ in results[4:] if code == 503]
    # slack of 2: a request between the queue and the replica is in neither count for a moment
    assert len(burst_refused) >= n - 4 - 2, [code for code, _, _ in results]
    for seconds, r in refused:
        assert seconds < 2.0, seconds  # at once, not after queueing
        assert r.headers["retry-after"].isdigit()
    for seconds, r in timed_out:
        assert TIMEOUT_S - 0.5 < seconds < TIMEOUT_S + 5, seconds  # the timeout, not a hang
        assert "timed out" in r.json()["detail"]
    for _, r in refused + timed_out:
        assert r.headers["content-type"] == "application/json" and str(r.status_code) in doc
        assert ErrorBody.model_validate(r.json()).field == "service"


def test_the_key_is_in_no_log_and_no_serve_state(server, slow_url: str, http: httpx.Client) -> None:
    import pathlib

    import ray
    from ray import serve
    from ray.util.state import list_actors

    assert http.get("/metadata").status_code == 200
    logs = pathlib.Path(ray._private.worker._global_node.get_logs_dir_path())  # this session's logs
    files = [f for f in logs.rglob("*") if f.is_file()]
    assert files
    leaked = [str(f) for f in files if KEY.encode() in f.read_bytes()]
    assert not leaked, leaked
    # What the dashboard shows of Serve (deployments, their config and arguments) and of the actors.
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(f"http://{ray._private.worker._global_node.webui_url}").get_serve_details()
    dashboard = json.dumps(details, default=str)
    assert SLOW_APP in dashboard
    actors = list_actors(address=ray.get_runtime_context().gcs_address, detail=True, limit=1000)
    for shown in (dashboard, str(serve.status()), json.dumps(actors, default=str)):
        assert KEY not in shown


def test_the_demo_talks_to_the_endpoint(server, monkeypatch: pytest.MonkeyPatch) -> None:
    from speeder_platform.serve.app import API_KEY_ENV
    from speeder_platform.serve.recommender import RequestError
    from speeder_ui.backends import HttpBackend

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    url, _, items, key_file, _ = server
    with pytest.raises(RequestError) as err:
        HttpBackend(url).metadata()  # no key: refused
    assert err.value.status == 401 and err.value.field == "authorization"
    backend = HttpBackend(url, api_key_file=key_file)  # the header it sends gets in
    recs = backend.recommend([0, 1], 4, True)
    assert len(recs) == 4 and not {0, 1} & {r["item_id"] for r in recs}
    assert backend.search(items[3]["title"], 5)[0]["item_id"] == 3
    assert backend.item(3)["source_id"] == items[3]["source_id"]
    assert backend.metadata()["num_items"] == len(items)
    with_image = next(i for i, it in enumerate(items) if it["image_uri"])
    assert backend.image(with_image)[1] == "image/png"
    with pytest.raises(RequestError) as err:
        backend.recommend([0, 10_000], 4, True)
    assert err.value.field == "history[1]" and err.value.status == 422
    assert str(err.value).startswith("history[1]: unknown item id 10000")


@pytest.mark.parametrize("name", ["serve.yaml", "serve-smoke.yaml"])
def test_serve_config_files(name: str) -> None:
    import pathlib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from speeder_platform.config import load_config

    root = pathlib.Path(__file__).resolve().parents[2]
    text = (root / "jobs" / name).read_text()
    assert f"serve run jobs/{name}" in text  # the header says how to run it
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    assert config.http_options.host == "127.0.0.1" and config.http_options.port == 8000
    (app,) = config.applications
    assert app.import_path == "speeder_platform.serve:build_app" and app.route_prefix == "/"
    assert set(app.args) <= {"config", "overrides", "checkpoint", "max_body_bytes"}
    cfg = load_config(str(root / app.args["config"]), app.args.get("overrides"))
    assert [d.name for d in app.deployments] == ["SpeederServer"]
    # The one setting build_app cannot apply (Serve's HTTP options): the file states the app's own value.
    assert config.http_options.request_timeout_s == cfg.serve.request_timeout_s
    assert "SPEEDER_API_KEY" not in json.dumps(app.runtime_env)  # a key there would show on the dashboard

"""The API's contract in-process (no Ray): the OpenAPI document against what the API answers, the API
key, and the pieces around them (key reading, the proxy's JSON errors, the demo's HTTP client).

Conformance: every documented operation gets valid and invalid requests, with and without the key;
each answer's status must be documented for that operation, its content type documented for that
status, its body valid against the documented schema and its documented headers present.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from urllib.parse import quote

import pytest

from speeder_platform.serve.recommender import Limits, Recommender
from testkit.datasets import prepare_synthetic, tiny_config, write_checkpoint, write_random_features

KEY = secrets.token_hex(16)
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 64 * 1024
METHODS = ("get", "post", "put", "patch", "delete")


@pytest.fixture(scope="module")
def rec(tmp_path_factory: pytest.TempPathFactory) -> Recommender:
    root = tmp_path_factory.mktemp("api")
    data = prepare_synthetic(str(root / "data"))
    write_random_features(data)
    cfg = tiny_config(str(root), f"data.uri={data}")
    ckpt = write_checkpoint(cfg, str(root / "ckpt"))
    rec = Recommender.from_checkpoint(ckpt, limits=Limits(max_history=12, max_k=20, max_batch_requests=4))
    rec.images[5] = None  # one item without an image, whatever the synthetic set drew
    return rec


def _client(rec: Recommender, api_key: str | None):
    from fastapi.testclient import TestClient

    from speeder_platform.serve.app import build_api

    async def direct(queries):
        return rec.recommend_queries(queries)

    # raise_server_exceptions=False: a 500 is an answer to check like any other, not a test crash.
    return TestClient(build_api(rec, direct, max_body_bytes=BODY_LIMIT, api_key=api_key),
                      raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(rec: Recommender):
    return _client(rec, KEY)


@pytest.fixture(scope="module")
def doc(client) -> dict:
    r = client.get("/openapi.json", headers=AUTH)
    assert r.status_code == 200
    return r.json()


class Conformance:
    """Checks answers against the document; remembers which operations it saw."""

    def __init__(self, doc: dict) -> None:
        from jsonschema import Draft202012Validator
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        self.doc = doc
        # The document is one JSON Schema resource, so "#/components/schemas/X" resolves inside it.
        self.registry = Registry().with_resource("urn:openapi", Resource(doc, specification=DRAFT202012))
        self.validator = Draft202012Validator
        self.seen: set[tuple[str, str]] = set()

    def check(self, path: str, method: str, response) -> None:
        operation = self.doc["paths"][path][method]
        self.seen.add((path, method))
        where = f"{method.upper()} {path} -> {response.status_code}"
        documented = operation["responses"].get(str(response.status_code))
        assert documented is not None, f"{where}: status not documented ({sorted(operation['responses'])})"
        media_type = response.headers.get("content-type", "").split(";")[0]
        assert media_type in documented.get("content", {}), f"{where}: {media_type} not documented"
        for header in documented.get("headers", {}):
            assert header in response.headers, f"{where}: documented header {header} missing"
        if media_type != "application/json":
            assert response.content, f"{where}: empty body"
            return
        pointer = "/".join(p.replace("~", "~0").replace("/", "~1") for p in
                           ("paths", path, method, "responses", str(response.status_code), "content", media_type,
                            "schema"))
        validator = self.validator({"$ref": f"urn:openapi#/{quote(pointer)}"}, registry=self.registry)
        errors = [e.message for e in validator.iter_errors(response.json())]
        assert not errors, f"{where}: body {response.text[:300]} does not match the document: {errors}"
        body = response.json()
        if response.status_code >= 400 and body["field"] is not None:  # ErrorBody: "<field>: <message>"
            assert body["detail"].startswith(f"{body['field']}: "), f"{where}: {body}"


def test_the_document_is_valid_openapi_and_describes_every_operation(doc: dict) -> None:
    from openapi_spec_validator import validate

    validate(doc)
    operations = {(p, m) for p, ops in doc["paths"].items() for m in ops if m in METHODS}
    assert operations == {("/recommend", "post"), ("/recommend/batch", "post"), ("/items", "get"),
                          ("/items/{id}", "get"), ("/items/{id}/image", "get"), ("/healthz", "get"),
                          ("/metadata", "get")}
    for path, method in operations:
        operation = doc["paths"][path][method]
        assert {"413", "500", "503", "504"} <= set(operation["responses"]), (path, method)
        for status, response in operation["responses"].items():
            if status != "200":
                assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
        if method == "post":  # a body schema that names its fields and forbids others
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            assert operation["requestBody"]["required"] and body["additionalProperties"] is False
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas  # FastAPI's own 422 shape is not what the API answers
    assert set(schemas["ErrorBody"]["properties"]) == {"detail", "field"}
    image = doc["paths"]["/items/{id}/image"]["get"]["responses"]["200"]["content"]
    assert set(image) == {"image/png", "image/jpeg", "image/gif", "image/webp", "application/octet-stream"}
    one = doc["paths"]["/recommend"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert one["properties"]["k"]["maximum"] == 20 and one["properties"]["history"]["maxItems"] == 12
    assert one["required"] == ["history"]


def test_the_document_states_the_key_everywhere_but_healthz(doc: dict) -> None:
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert doc["security"] == [{"bearer": []}]
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            open_path = path == "/healthz"
            assert (operation.get("security") == []) == open_path, path
            assert ("401" in operation["responses"]) != open_path, path


def test_every_answer_is_documented(client, doc: dict, rec: Recommender) -> None:
    api = Conformance(doc)
    with_image = next(i for i in range(rec.num_items) if rec.images[i])
    big = b'{"history": [' + b"1," * BODY_LIMIT + b"1]}"
    json_type = {"content-type": "application/json"}
    posts = {
        "/recommend": [
            {"history": [0, rec.source_ids[1]], "k": 3}, {"history": [0], "candidates": [4, 5, 6], "k": 2},
            {"history": [0], "exclude_history": False}, {"history": []}, {"history": list(range(13))},
            {"history": [0, 10_000]}, {"history": [0, "no-such-id"]}, {"history": [0, [1]]}, {"history": "0 1"},
            {"history": [0], "k": 0}, {"history": [0], "k": 21}, {"history": [0], "k": "ten"},
            {"history": [0], "k": 10**30}, {"history": [0], "exclude_history": 1}, {"history": [0], "user": 3},
            {"k": 3}, [0, 1], {"history": [0], "candidates": []}, {"history": [0], "candidates": [1, -2]},
        ],
        "/recommend/batch": [
            {"histories": [[0, 1], [2]], "k": 2}, {"histories": [[0], [1]], "candidates": [[3, 4], [5]], "k": 1},
            {"histories": []}, {"histories": [[0]] * 5}, {"histories": [[0], [5, 10_000]]},
            {"histories": [[0]], "candidates": [[1], [2]]}, {"histories": [[]]}, {"histories": [0]}, {"history": [0]},
        ],
    }
    for path, bodies in posts.items():
        for body in bodies:
            api.check(path, "post", client.post(path, json=body, headers=AUTH))
        for raw in (b"", b"{not json", b'{"history": [0], "k": NaN}', b'{"a": ' + b"[" * 500 + b"]" * 500 + b"}",
                    b'{"history": ["\xff"]}', big):
            api.check(path, "post", client.post(path, content=raw, headers={**AUTH, **json_type}))
        api.check(path, "post", client.post(path, content=b'{"history": [1]}', headers=AUTH))  # no content type
    gets = {
        "/items": [{"q": rec.titles[4]}, {"q": "", "limit": 3}, {"q": "zzz-nothing"}, {"limit": 0}, {"limit": "many"},
                   {"limit": 101}, {"q": "x" * 201}],
        "/items/{id}": ["3", "0", "99999", "-1", "abc", "1.5", str(10**20)],
        "/items/{id}/image": [str(with_image), "5", "99999", "abc"],
        "/healthz": [None], "/metadata": [None],
    }
    for path, cases in gets.items():
        for case in cases:
            url, params = (path.replace("{id}", case), None) if "{id}" in path else (path, case)
            api.check(path, "get", client.get(url, params=params, headers=AUTH))
            api.check(path, "get", client.get(url, params=params))  # no key
            api.check(path, "get", client.get(url, params=params, headers={"Authorization": "Bearer wrong"}))
        url = path.replace("{id}", "3")
        api.check(path, "get", client.request("GET", url, content=big, headers=AUTH))  # a body over the limit
    for path in posts:
        for headers in ({}, {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
            api.check(path, "post", client.post(path, json={"history": [0]}, headers=headers))
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops if m in METHODS}
    assert api.seen == documented


def test_the_api_key_guards_every_route_but_healthz(client) -> None:
    for method, path in [("POST", "/recommend"), ("POST", "/recommend/batch"), ("GET", "/items"), ("GET", "/items/3"),
                         ("GET", "/items/3/image"), ("GET", "/metadata"), ("GET", "/openapi.json"), ("GET", "/nope")]:
        for headers in ({}, {"Authorization": "Bearer wrong-key-of-some-length"}, {"Authorization": KEY},
                        {"Authorization": f"Bearer {KEY[:-1]}"}):
            r = client.request(method, path, json={"history": [0]}, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json() == {"detail": "authorization: missing or wrong bearer token", "field": "authorization"}
            assert KEY not in r.text
    assert client.get("/healthz").status_code == 200
    for scheme in ("Bearer", "bearer", "BEARER"):  # the scheme is case-insensitive (RFC 9110)
        assert client.get("/metadata", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    assert client.post("/recommend", json={"history": [0]}, headers=AUTH).status_code == 200
    assert client.get("/openapi.json", headers=AUTH).status_code == 200


def test_without_a_key_the_api_is_open_and_says_so(rec: Recommender) -> None:
    open_api = _client(rec, None)
    assert open_api.get("/metadata").status_code == 200
    doc = open_api.get("/openapi.json").json()
    assert "securitySchemes" not in doc.get("components", {}) and "security" not in doc
    assert all("401" not in op["responses"] for ops in doc["paths"].values() for op in ops.values())
    Conformance(doc).check("/metadata", "get", open_api.get("/metadata"))


def test_metadata_names_the_model_never_paths_or_pids(client, rec: Recommender) -> None:
    import os
    import socket

    meta = client.get("/metadata", headers=AUTH).json()
    assert meta["model_version"] == rec.trained.version and meta["num_items"] == rec.num_items
    assert meta["modalities"] == list(rec.trained.active) and meta["limits"]["max_k"] == 20
    text = json.dumps(meta)
    for secret_ish in (rec.trained.checkpoint, rec.dataset, "/tmp", os.getcwd(), socket.gethostname(), KEY):
        assert secret_ish not in text, secret_ish
    assert "pid" not in text and "checkpoint" not in meta and "dataset" not in meta


def test_errors_name_the_field(client) -> None:
    cases = [({"history": [0, [1]]}, "history[1]"), ({"histories": [[0], [1, {}]]}, "histories[1][1]"),
             ({"history": [0], "k": 3.5}, "k"), ({"history": [0], "kk": 1}, "kk")]
    for body, field in cases:
        path = "/recommend/batch" if "histories" in body else "/recommend"
        r = client.post(path, json=body, headers=AUTH)
        assert r.status_code == 422 and r.json()["field"] == field, r.text
    r = client.post("/recommend", json={"history": [0, [1]]}, headers=AUTH)
    assert "valid integer" in r.json()["detail"] and "valid string" in r.json()["detail"]  # both ways to name an item
    r = client.get("/items", params={"limit": "many"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["field"] == "limit"
    r = client.get("/items/abc", headers=AUTH)
    assert r.status_code == 422 and r.json()["field"] == "id"
    r = client.delete("/recommend", headers=AUTH)
    assert r.status_code == 405 and r.json() == {"detail": "Method Not Allowed", "field": None}


# -- the API key, as the API and the demo read it -------------------------------------------------------
def test_read_api_key(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from speeder_platform.serve.app import API_KEY_ENV, read_api_key

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert read_api_key() is None
    monkeypatch.setenv(API_KEY_ENV, f"  {KEY}\n")
    assert read_api_key() == KEY
    key_file = tmp_path / "key"
    key_file.write_text("file-" + KEY + "\n")
    assert read_api_key(str(key_file)) == "file-" + KEY  # a named file wins over the variable
    monkeypatch.setenv(API_KEY_ENV, "short")
    with pytest.raises(ValueError, match=f"^{API_KEY_ENV}: an API key needs at least 16 characters, got 5") as err:
        read_api_key()
    assert "short" not in str(err.value)
    monkeypatch.setenv(API_KEY_ENV, "")  # set but empty: refused, never an open API
    with pytest.raises(ValueError):
        read_api_key()
    with pytest.raises(ValueError, match="serve.api_key_file: cannot read .*missing"):
        read_api_key(str(tmp_path / "missing"))


def test_replicas_are_told_to_require_a_key_never_given_it(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses
    import pickle

    from speeder_platform.config import load_config
    from speeder_platform.serve.app import API_KEY_ENV, application, replica_api_key, serve_settings

    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    cfg = load_config(None, [f"serve.api_key_file={key_file}", "serve.max_queued_requests=7"])
    settings = serve_settings(cfg, checkpoint=str(tmp_path / "ckpt"))
    app = application(settings)._bound_deployment  # what `.bind` ships to the replicas (and Serve's state)
    (shipped,) = app.init_args
    assert shipped["require_api_key"] is True and shipped["api_key_file"] == str(key_file)
    assert KEY.encode() not in pickle.dumps(app.init_args) and app.max_queued_requests == 7
    assert replica_api_key(settings) == KEY
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    nowhere = dataclasses.replace(settings, api_key_file=None, require_api_key=True)
    with pytest.raises(RuntimeError, match=f"finds none: set {API_KEY_ENV} in every node's environment"):
        replica_api_key(nowhere)  # fails closed: never an open replica behind a locked deployment
    assert replica_api_key(dataclasses.replace(nowhere, require_api_key=False)) is None


def test_the_key_file_is_a_local_path_in_the_config() -> None:
    from speeder_platform.config import ConfigError, load_config

    assert load_config(None, ["serve.api_key_file=/run/secrets/speeder"]).serve.api_key_file == "/run/secrets/speeder"
    with pytest.raises(ConfigError, match="^serve.api_key_file: "):
        load_config(None, ["serve.api_key_file=s3://bucket/key"])
    for name in ("max_queued_requests", "request_timeout_s"):
        with pytest.raises(ConfigError, match=f"^serve.{name}"):
            load_config(None, [f"serve.{name}=0"])


def test_the_demo_client_sends_the_key(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from speeder_platform.serve.app import API_KEY_ENV
    from speeder_ui.backends import HttpBackend

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert "authorization" not in HttpBackend("http://127.0.0.1:9").http.headers
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert HttpBackend("http://127.0.0.1:9").http.headers["authorization"] == f"Bearer {KEY}"
    key_file = tmp_path / "key"
    key_file.write_text("file-" + KEY)
    backend = HttpBackend("http://127.0.0.1:9", api_key_file=str(key_file))
    assert backend.http.headers["authorization"] == f"Bearer file-{KEY}"


# -- Serve's own answers, as the proxy middleware rewrites them ----------------------------------------
def _through_proxy(status: int, body: bytes, headers: list | None = None) -> tuple[dict, list[dict]]:
    """One request through RetryOnReplicaDeath over a stand-in for Serve's proxy answering `status` in
    plain text; returns (the scope the proxy saw, the messages the client got)."""
    from speeder_platform.serve.proxy import RetryOnReplicaDeath

    seen: dict = {}

    async def serve_proxy(scope, receive, send) -> None:
        seen.update(scope)
        await receive()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"2")]})
        await send({"type": "http.response.body", "body": body})

    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/recommend", "headers": headers or []}
    asyncio.run(RetryOnReplicaDeath(serve_proxy, delays=())(scope, receive, send))
    return seen, sent


@pytest.mark.parametrize("serve_status, status", [(408, 504), (503, 503), (429, 429)])
def test_serve_plain_text_errors_become_json(doc: dict, serve_status: int, status: int) -> None:
    from speeder_platform.serve.api import ErrorBody

    _, sent = _through_proxy(serve_status, b"Request abc timed out after 5.0s.")
    assert sent[0]["status"] == status
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"] == b"application/json" and headers[b"retry-after"] == b"2"
    body = ErrorBody.model_validate_json(sent[1]["body"])
    assert body.field == "service" and body.detail.startswith("service: ") and "timed out" in body.detail
    if status != 429:  # what Serve would send by default is documented; 429 only if backpressure says so
        assert str(status) in doc["paths"]["/recommend"]["post"]["responses"]


def test_clients_cannot_lift_the_timeout() -> None:
    seen, sent = _through_proxy(200, b"ok", [(b"x-request-timeout-seconds", b"0"),
                                             (b"X-Request-Disconnect-Disabled", b"?1"), (b"authorization", b"x")])
    assert seen["headers"] == [(b"authorization", b"x")]
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"ok"  # a success passes untouched

"""Serving under fault: hostile payloads, a replica killed under load, a replica stalled past the request
timeout, and image_uri values that try to escape the dataset."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import pytest

from speeder import schema
from speeder_platform.bench.faults.data import set_image_uris
from speeder_platform.bench.faults.serve import (
    ESCAPING,
    serve_hostile_payloads,
    serve_replica_killed,
    serve_request_timeout,
)
from speeder_platform.serve.proxy import RetryOnReplicaDeath
from speeder_platform.serve.recommender import Recommender

pytestmark = pytest.mark.fault


def test_image_uris_escaping_the_dataset_are_never_served(ws, tmp_path) -> None:
    data = str(tmp_path / "data")
    shutil.copytree(ws.dataset, data, symlinks=True)
    os.symlink("/etc/passwd", os.path.join(data, schema.IMAGES_DIR, "link-out.png"))
    set_image_uris(data, ESCAPING)
    rec = Recommender.from_checkpoint(ws.checkpoint, data)
    for item in ESCAPING:
        assert rec.images[item] is None and rec.image(item) is None and rec.item(item)["image_url"] is None
    good = next(i for i in range(rec.num_items) if i not in ESCAPING and rec.images[i])
    assert rec.image(good)[0][:4] == b"\x89PNG"


# -- the proxy middleware, on a stand-in for Serve's proxy app (no Ray) ------------------------------
class FlakyProxy:
    """Sends no response (as Serve's proxy does when the replica died) for the first `failures` calls."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict, receive, send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.bodies.append(body)
        if len(self.bodies) <= self.failures:
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body[::-1]})


def call(app, chunks: list[bytes], headers: list | None = None) -> list[dict]:
    """Run one HTTP request through an ASGI app; the messages it sent."""
    sent: list[dict] = []
    incoming = [{"type": "http.request", "body": c, "more_body": i + 1 < len(chunks)} for i, c in enumerate(chunks)]

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/recommend", "headers": headers or []}
    asyncio.run(app(scope, receive, send))
    return sent


def test_a_request_whose_replica_died_runs_again_with_the_same_body() -> None:
    proxy = FlakyProxy(failures=2)
    sent = call(RetryOnReplicaDeath(proxy, delays=(0.0, 0.0, 0.0)), [b'{"history": ', b"[1, 2]}"])
    assert proxy.bodies == [b'{"history": [1, 2]}'] * 3
    assert sent[0]["status"] == 200 and (b"x-speeder-retries", b"2") in sent[0]["headers"]
    assert sent[1]["body"] == b'{"history": [1, 2]}'[::-1]


class DiesMidResponse(FlakyProxy):
    """The first call sends the response's start (and, with `partial`, a first body chunk), then ends: a
    replica that died between Serve's message batches. Later calls answer in full."""

    def __init__(self, partial: bool) -> None:
        super().__init__(failures=0)
        self.partial = partial

    async def __call__(self, scope: dict, receive, send) -> None:
        if self.bodies:
            await super().__call__(scope, receive, send)
            return
        self.bodies.append((await receive()).get("body", b""))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        if self.partial:
            await send({"type": "http.response.body", "body": b"half", "more_body": True})


def test_a_replica_that_dies_between_start_and_body_is_retried() -> None:
    proxy = DiesMidResponse(partial=False)
    sent = call(RetryOnReplicaDeath(proxy, delays=(0.0,)), [b"[1, 2]"])
    assert proxy.bodies == [b"[1, 2]"] * 2  # run again: the client had been sent nothing
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]  # one response, whole
    assert sent[0]["status"] == 200 and (b"x-speeder-retries", b"1") in sent[0]["headers"]
    assert sent[1]["body"] == b"[1, 2]"[::-1]
    proxy = DiesMidResponse(partial=True)  # its body had started: it went to the client, never run twice
    sent = call(RetryOnReplicaDeath(proxy, delays=(0.0,)), [b"[1, 2]"])
    assert len(proxy.bodies) == 1 and [m.get("body") for m in sent] == [None, b"half"]


def test_when_no_replica_answers_the_client_gets_a_clear_503() -> None:
    proxy = FlakyProxy(failures=10)
    sent = call(RetryOnReplicaDeath(proxy, delays=(0.0, 0.0)), [b"{}"])
    assert len(proxy.bodies) == 3 and sent[0]["status"] == 503
    assert (b"retry-after", b"2") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["field"] == "service"


def test_bodies_over_the_replay_limit_pass_through_once() -> None:
    proxy = FlakyProxy(failures=0)
    sent = call(RetryOnReplicaDeath(proxy, max_replay_bytes=4), [b"abc", b"def", b"ghi"])
    assert proxy.bodies == [b"abcdefghi"] and sent[0]["status"] == 200
    proxy = FlakyProxy(failures=1)
    sent = call(RetryOnReplicaDeath(proxy, max_replay_bytes=4), [b"abcdefghi"], [(b"content-length", b"9")])
    assert len(proxy.bodies) == 1 and sent == []  # not replayable: Serve's own answer (a 500) stands


@pytest.mark.integration
def test_a_replica_killed_under_load_loses_no_request(ws, ray_local) -> None:
    result = serve_replica_killed(ws)
    assert result["passed"] and not result["data_lost"], result["observed"]
    details = result["details"]
    assert details["results"] == {}  # every request got a 200: no 503, no 5xx, no timeout
    # Whether any request was executing on the victim at the kill is timing: Serve's router also retries
    # requests not yet started on a dead replica (a CI run saw 0 re-runs and no non-200 at all). The
    # proxy's replay itself is tested deterministically in
    # test_a_request_whose_replica_died_runs_again_with_the_same_body. What must hold is above: requests
    # kept being answered after the kill (passed) and none failed (results empty).


@pytest.mark.integration
def test_hostile_payloads_get_4xx_and_no_replica_dies(ws, ray_local) -> None:
    result = serve_hostile_payloads(ws)
    assert result["passed"] and not result["data_lost"], result["observed"]
    codes = result["details"]["codes"]
    assert codes["10 MB body"] == 413 and codes["10 MB chunked body"] == 413  # refused before parsing
    assert len(codes) == 20 and all(400 <= c < 500 for c in codes.values())


@pytest.mark.integration
def test_a_replica_stalled_past_the_timeout_gives_a_prompt_504_and_recovers(ws, ray_local) -> None:
    # Last in this module: it starts Serve again with its own short request timeout.
    result = serve_request_timeout(ws, timeout_s=2.0, stall_s=6.0)
    assert result["passed"] and not result["data_lost"], result["observed"]
    assert result["details"]["status"] == 504 and result["details"]["waited_s"] < 6.0

"""Fault scenarios for the Serve API: hostile payloads, a replica killed under load, a replica stalled past
the request timeout.

The first two use one deployment per workspace (2 replicas on 127.0.0.1, the real Serve proxy with the
RetryOnReplicaDeath middleware) over a copy of the dataset whose image_uri values try to escape it; the
timeout scenario starts Serve again with its own short serve.request_timeout_s.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from speeder import schema
from speeder_platform import storage
from speeder_platform.bench.faults.data import set_image_uris
from speeder_platform.bench.faults.env import Workspace, alive_actors, kill_pid, outcome, wait_for

APP = "speeder-faults"
REPLICA = "SpeederServer"  # the replicas' actor class is ServeReplica:<app>:SpeederServer
ESCAPING = {0: "../../etc/passwd", 1: "/etc/passwd", 2: "file:///etc/passwd", 3: "images/link-out.png",
            4: "images/../../../etc/passwd"}
CLIENTS = 8  # concurrent clients under load


def serve_url(ws: Workspace) -> str:
    """The workspace's deployment (2 replicas), started on first use and shut down by ws.close()."""
    if ws.serve_url:
        return ws.serve_url
    from ray import serve

    from speeder_platform.bench.serve import _free_port
    from speeder_platform.serve.app import serve_settings, start

    data = ws.path("serve-data")
    shutil.copytree(ws.dataset, data, symlinks=True)
    os.symlink("/etc/passwd", os.path.join(data, schema.IMAGES_DIR, "link-out.png"))
    set_image_uris(data, ESCAPING)
    cfg = ws.config(f"data.uri={data}", "serve.num_replicas=2", "serve.max_history=50", "serve.max_k=20",
                    "serve.max_batch_size=8")
    ws.on_close(serve.shutdown)
    ws.serve_url = start(cfg, serve_settings(cfg, ws.checkpoint), port=_free_port(), name=APP)
    return ws.serve_url


def replica_pids() -> set[int]:
    return {a["pid"] for a in alive_actors(REPLICA)}


def _chunks(total: int, size: int = 1 << 20) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b" " * size


def _hostile_requests(http: Any) -> dict[str, int]:
    """Each hostile request -> the status it got."""
    json_headers = {"content-type": "application/json"}
    post = lambda body, **kw: http.post("/recommend", content=body, headers=json_headers, **kw)  # noqa: E731
    codes = {
        "10 MB body": post(b'{"history": [' + b"1," * (5 << 20) + b"1]}"),
        "10 MB chunked body": post(_chunks(10 << 20)),
        "JSON nested 10,000 deep": post(b'{"history": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"),
        "JSON cut short": post(b'{"history": [0,'),
        "invalid UTF-8": post(b'{"history": ["\xff\xfe"]}'),
        "NaN literal": post(b'{"history": [0], "k": NaN}'),
        "a list, not an object": http.post("/recommend", json=[0, 1]),
        "unknown field": http.post("/recommend", json={"history": [0], "user": "x" * 10_000}),
        "negative k": http.post("/recommend", json={"history": [0], "k": -5}),
        "k = 10^30": http.post("/recommend", json={"history": [0], "k": 10**30}),
        "100,000-item history": http.post("/recommend", json={"history": list(range(50)) * 2000}),
        "unknown item id": http.post("/recommend", json={"history": [0, 10**12]}),
        "batch of 10,000": http.post("/recommend/batch", json={"histories": [[0]] * 10_000}),
        "10,000-char search": http.get("/items", params={"q": "x" * 10_000}),
        "item id 10^20": http.get(f"/items/{10**20}"),
    }
    codes = {name: r.status_code for name, r in codes.items()}
    for item, uri in ESCAPING.items():
        r = http.get(f"/items/{item}/image")
        codes[f"image {uri}"] = r.status_code if b"root:" not in r.content else 200
    return codes


def serve_hostile_payloads(ws: Workspace) -> dict[str, Any]:
    """Malformed and hostile requests at a 2-replica deployment: each must get a 4xx, no replica may die."""
    import httpx

    started = time.perf_counter()
    url = serve_url(ws)
    before = replica_pids()
    with httpx.Client(base_url=url, timeout=60) as http:
        codes = _hostile_requests(http)
        healthy = http.get("/healthz").status_code == 200 and http.post(
            "/recommend", json={"history": [5, 6], "k": 3}).status_code == 200
    after = replica_pids()
    bad = {name: code for name, code in codes.items() if not 400 <= code < 500}
    spread = Counter(codes.values())
    observed = (f"{len(codes)} requests: {', '.join(f'{c} x{n}' for c, n in sorted(spread.items()))}; "
                f"{'no 5xx' if not bad else 'NOT 4xx: ' + str(bad)}; image_uri escapes refused (404, no file "
                f"content); replicas {'unchanged (same pids)' if before == after else 'CHANGED'}; healthz and a "
                f"normal request {'OK' if healthy else 'FAILED'} afterwards")
    return outcome("serve-hostile-payloads", "10 MB bodies (sized and chunked), JSON nested 10,000 deep, cut short, "
                   "invalid UTF-8, NaN, wrong types, negative and 10^30 k, a 100,000-item history, a 10,000-history "
                   "batch, a 10,000-char search, image_uri ../../etc/passwd, /etc/passwd, file://, a symlink out",
                   observed, data_lost=bool(bad) or before != after, passed=healthy and len(before) == 2,
                   started=started, codes=codes)


class Load:
    """CLIENTS threads sending valid POST /recommend requests until stopped; counts what they got."""

    def __init__(self, url: str, num_items: int) -> None:
        self.url, self.num_items = url, num_items
        self.results: Counter[str] = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _client(self, seed: int) -> None:
        import httpx

        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self._stop.is_set():
                history = rng.choice(self.num_items, size=int(rng.integers(1, 9)), replace=False).tolist()
                try:
                    r = http.post("/recommend", json={"history": history, "k": 5})
                    ok = r.status_code == 200 and len(r.json()["items"]) == 5
                    self.results["200" if ok else str(r.status_code)] += 1
                    self.results["re-run"] += "x-speeder-retries" in r.headers
                except httpx.HTTPError as err:  # a hang (timeout) or a dropped connection
                    self.results[type(err).__name__] += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def serve_replica_killed(ws: Workspace, recovery_timeout_s: float = 180.0) -> dict[str, Any]:
    """SIGKILL one of 2 replicas while 8 clients send requests; all must keep getting answers."""
    started = time.perf_counter()
    url = serve_url(ws)
    num_items = storage.read_table(storage.join(ws.dataset, schema.ITEMS_FILE), columns=[schema.ITEM_ID]).num_rows
    before = replica_pids()
    with Load(url, num_items) as load:
        time.sleep(3)
        at_kill = sum(load.results.values())
        victim = min(before)
        kill_pid(victim)
        killed_at = time.perf_counter()
        replaced = wait_for(lambda: len(replica_pids() - {victim}) == 2, timeout_s=recovery_timeout_s)
        recovered_s = time.perf_counter() - killed_at
        time.sleep(2)
    answered, rerun = load.results.pop("200", 0), load.results.pop("re-run", 0)
    failed = {k: v for k, v in load.results.items() if k != "503"}
    replacement = "started a replacement" if replaced else "did NOT replace it"
    observed = (f"{answered + sum(load.results.values())} requests from {CLIENTS} clients ({at_kill} before the "
                f"kill): {answered} answered 200, {rerun} of them re-run on the other replica by the proxy after "
                f"theirs died, {load.results['503']} clear 503s, {sum(failed.values())} other failures"
                f"{' ' + str(failed) if failed else ''}; Serve {replacement} in {recovered_s:.0f}s")
    return outcome("serve-replica-killed", f"SIGKILL of 1 of 2 Serve replicas under load ({CLIENTS} concurrent "
                   "clients)", observed, data_lost=bool(failed), passed=bool(replaced) and answered > at_kill,
                   started=started, answered=answered, rerun=rerun, results=dict(load.results),
                   recovered_s=round(recovered_s, 1))


def serve_request_timeout(ws: Workspace, timeout_s: float = 2.0, stall_s: float = 6.0) -> dict[str, Any]:
    """Stall the only replica (SIGSTOP: a GC pause, a swapped-out or wedged process) past
    serve.request_timeout_s while a request waits on it: the client must get a JSON 504 soon after the
    timeout, not hang, and once the replica runs again (SIGCONT) requests must be answered.

    Serve's request timeout is fixed when Serve starts, so this scenario restarts Serve with its own
    short timeout (the workspace's shared deployment, if any, is shut down and rebuilt on next use).
    """
    import signal

    import httpx
    from ray import serve

    from speeder_platform.bench.serve import _free_port
    from speeder_platform.serve.app import serve_settings, start

    started = time.perf_counter()
    if ws.serve_url:
        serve.shutdown()
        ws.serve_url = None
    cfg = ws.config("serve.num_replicas=1", f"serve.request_timeout_s={timeout_s}")
    ws.on_close(serve.shutdown)
    url = start(cfg, serve_settings(cfg, ws.checkpoint), port=_free_port(), name="speeder-timeout")
    body = {"history": [1, 2, 3], "k": 5}
    with httpx.Client(base_url=url, timeout=60) as http:
        before = http.post("/recommend", json=body).status_code
        (pid,) = replica_pids()
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.perf_counter()
            try:
                stalled = http.post("/recommend", json=body, timeout=stall_s + 30)
                answer = (stalled.status_code, stalled.headers.get("content-type", ""), stalled.text[:200])
            except httpx.HTTPError as err:  # a hang or a dropped connection: no answer
                answer = (0, "", f"{type(err).__name__}: {err}")
            waited = time.perf_counter() - t0
            time.sleep(max(0.0, stall_s - waited))
        finally:
            os.kill(pid, signal.SIGCONT)
        after = wait_for(lambda: http.post("/recommend", json=body).status_code == 200, timeout_s=60, every_s=0.5)
    kept = pid in replica_pids()
    serve.shutdown()
    code, content_type, text = answer
    prompt = code == 504 and "json" in content_type and waited < timeout_s + 5
    observed = (f"replica pid {pid} stopped for {stall_s:.0f}s; the request waiting on it got {code or 'NO ANSWER'} "
                f"after {waited:.1f}s ({text!r}); after SIGCONT requests answered 200: {bool(after)}; the "
                f"replica {'was kept (same pid)' if kept else 'WAS REPLACED'}")
    return outcome("serve-request-timeout", f"the only Serve replica stopped (SIGSTOP) for {stall_s:.0f}s with "
                   f"serve.request_timeout_s={timeout_s:g} while a request waits on it", observed,
                   data_lost=code == 0 or not after, passed=before == 200 and prompt, started=started, status=code,
                   waited_s=round(waited, 1))

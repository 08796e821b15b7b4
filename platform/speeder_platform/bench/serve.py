"""`speeder bench serve CONFIG`: throughput and latency of the Serve app, with batching on and off.

    speeder bench serve jobs/smoke.yaml --requests 400 --concurrency 16 --out runs/smoke/bench-serve.json

Deploys the app on 127.0.0.1 twice: with `@serve.batch` as configured (serve.max_batch_size,
serve.batch_wait_timeout_s), then with max_batch_size=1 (every request its own forward pass). Each time
C concurrent clients (asyncio + httpx, one connection each) send N `POST /recommend` requests in
total, histories drawn from the test split; reports requests/s, p50 / p99 latency, forward passes and
the throughput ratio. Warm-up requests are not counted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from typing import Any

import numpy as np

from speeder_platform import storage
from speeder_platform.config import SpeederConfig

log = logging.getLogger("speeder.bench")

BENCH_APP = "speeder-bench"


async def _fire(url: str, histories: list[list[int]], k: int, requests: int, concurrency: int) -> dict[str, Any]:
    """N requests from C clients; latencies of the successful ones, and the error count."""
    import httpx

    latencies: list[float] = []
    errors = 0
    next_index = 0

    async def client() -> None:
        nonlocal next_index, errors
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            while next_index < requests:
                i = next_index
                next_index += 1
                t0 = time.perf_counter()
                r = await http.post("/recommend", json={"history": histories[i % len(histories)], "k": k})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    return {"requests": requests, "concurrency": concurrency, "errors": errors, "seconds": round(seconds, 3),
            "requests_per_s": round(len(latencies) / seconds, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _histories(dataset: str, max_history: int) -> list[list[int]]:
    from speeder_platform.serve.recommender import load_test_users

    return [h[-max_history:] for h, _ in load_test_users(dataset).values() if h]


def run_bench_serve(cfg: SpeederConfig, checkpoint: str | None = None, requests: int = 200, concurrency: int = 16,
                    k: int = 10, warmup: int = 8, out: str | None = None) -> dict[str, Any]:
    """Benchmark batching on vs off on loopback; returns (and optionally writes) the figures."""
    import httpx
    from ray import serve

    from speeder_platform.ray_utils import ensure_ray
    from speeder_platform.serve.app import application, serve_settings

    settings = serve_settings(cfg, checkpoint)
    histories = _histories(settings.dataset, settings.max_history)
    ensure_ray(cfg)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs = {}
    try:
        for mode, batch_size in (("batching", settings.max_batch_size), ("no_batching", 1)):
            mode_settings = dataclasses.replace(settings, max_batch_size=batch_size)
            serve.run(application(mode_settings, cfg.serve.num_replicas, access_log=False), name=BENCH_APP,
                      route_prefix="/")
            asyncio.run(_fire(url, histories, k, warmup, min(warmup, concurrency)))
            before = httpx.get(f"{url}/metadata", timeout=60).json()["batching"]
            result = asyncio.run(_fire(url, histories, k, requests, concurrency))
            after = httpx.get(f"{url}/metadata", timeout=60).json()["batching"]
            forwards = after["forwards"] - before["forwards"]
            result.update(max_batch_size=batch_size, batch_wait_timeout_s=settings.batch_wait_timeout_s,
                          forward_passes=forwards,
                          mean_batch=round((after["requests"] - before["requests"]) / max(forwards, 1), 2))
            runs[mode] = result
            log.info("%s: %s", mode, result)
            serve.delete(BENCH_APP)
    finally:
        serve.shutdown()
    on, off = runs["batching"]["requests_per_s"], runs["no_batching"]["requests_per_s"]
    report = {"checkpoint": settings.checkpoint, "num_replicas": cfg.serve.num_replicas, "k": k, **runs,
              "throughput_ratio": round(on / off, 2) if off else None}
    if out:
        storage.write_json(out, report)
    return report


def format_report(report: dict[str, Any]) -> str:
    """A markdown table of both runs and the throughput ratio."""
    lines = ["| mode | max batch | requests | clients | req/s | p50 ms | p99 ms | forwards | mean batch | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for mode in ("batching", "no_batching"):
        r = report[mode]
        lines.append(f"| {mode} | {r['max_batch_size']} | {r['requests']} | {r['concurrency']} | "
                     f"{r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['forward_passes']} | "
                     f"{r['mean_batch']} | {r['errors']} |")
    lines.append(f"\nthroughput with batching / without: {report['throughput_ratio']}x")
    return "\n".join(lines)


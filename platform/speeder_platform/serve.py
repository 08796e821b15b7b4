"""Ray Serve app: the recommendation HTTP API (FastAPI ingress, `@serve.batch` over the LLM forward).

    speeder serve jobs/smoke.yaml                      # 127.0.0.1:8000 (serve.host / serve.port)
    serve run jobs/serve-smoke.yaml                    # the same app from a Serve config file

    POST /recommend        {"history": [3, "item-00017"], "k": 10, "candidates": null, "exclude_history": true}
    POST /recommend/batch  {"histories": [[...], ...], "k": 10, "candidates": null | [[...], ...]}
    GET  /items/{id}   GET /items/{id}/image   GET /items?q=mug&limit=10   GET /healthz   GET /metadata

Each replica loads the checkpoint and builds the catalog's item tokens once. Concurrent requests are
gathered by `@serve.batch` into one forward pass (up to serve.max_batch_size histories, waiting at most
serve.batch_wait_timeout_s). Bad input is a 4xx whose JSON names the field
(`{"detail": "k: must be an integer in 1..100, got 0", "field": "k"}`); bodies over MAX_BODY_BYTES are
refused before they are parsed, and JSON nested deeper than the parser's limit is a 400, so no payload
can take a replica down.

With serve.num_replicas >= 2 a replica that dies is routed around and restarted by Serve; a request it
held when it died runs again on another replica (serve_proxy.RetryOnReplicaDeath, installed in Serve's
proxy by `start`; on a cluster set its environment variable on the nodes, see serve_proxy), or gets a
JSON 503 with Retry-After, never a hang.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from speeder_platform import storage
from speeder_platform.config import SpeederConfig
from speeder_platform.recommender import Limits, Query, Recommender, RequestError

log = logging.getLogger("speeder.serve")

APP_NAME = "speeder"
MAX_BODY_BYTES = 2 * 1024 * 1024  # a full batch request (256 x 200 source ids) is well under 1 MiB
RECOMMEND_KEYS = {"history", "k", "candidates", "exclude_history"}
BATCH_KEYS = {"histories", "k", "candidates", "exclude_history"}


@dataclass
class ServeSettings:
    """Everything a replica needs, as plain values (shipped to replicas through `.bind`)."""

    checkpoint: str
    dataset: str
    features_name: str = "default"
    eval_metrics_uri: str | None = None
    max_history: int = 200
    max_k: int = 100
    max_batch_requests: int = 256
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    max_body_bytes: int = MAX_BODY_BYTES
    replica_num_cpus: float = 1.0
    replica_num_gpus: float = 0.0
    max_ongoing_requests: int = 64

    @property
    def limits(self) -> Limits:
        return Limits(self.max_history, self.max_k, self.max_batch_requests)


def _absolute(uri: str) -> str:
    """Local paths made absolute: replicas may not share the driver's working directory."""
    return uri if storage.is_s3(uri) else storage.resolve(uri)[1]


def serve_settings(cfg: SpeederConfig, checkpoint: str | None = None) -> ServeSettings:
    """The served checkpoint (explicit, serve.checkpoint, or the run's final one) and the serve.* limits."""
    from speeder_platform.evaluate import resolve_checkpoint

    s = cfg.serve
    uri = resolve_checkpoint(cfg, checkpoint or s.checkpoint)
    return ServeSettings(checkpoint=_absolute(uri), dataset=_absolute(cfg.data.uri), features_name=cfg.featurize.name,
                         eval_metrics_uri=_absolute(storage.join(cfg.evaluate.out, "metrics.json")),
                         max_history=s.max_history, max_k=s.max_k, max_batch_requests=s.max_batch_requests,
                         max_batch_size=s.max_batch_size, batch_wait_timeout_s=s.batch_wait_timeout_s,
                         max_body_bytes=s.max_body_bytes, replica_num_cpus=s.replica_num_cpus,
                         replica_num_gpus=s.replica_num_gpus, max_ongoing_requests=s.max_ongoing_requests)


# -- the HTTP API (plain FastAPI: testable without Ray) ---------------------------------------------
def error_body(field: str, message: str) -> dict[str, str]:
    return {"detail": f"{field}: {message}", "field": field}


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with a 413 before anything parses them.

    A declared Content-Length over the limit is refused without reading; otherwise the body is read
    and counted as it streams (chunked uploads have no Content-Length) and replayed to the app.
    """

    def __init__(self, app: Callable, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = JSONResponse(error_body("body", f"request body over {self.max_bytes} bytes"), status_code=413)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await JSONResponse(error_body("content-length", "not a number"), status_code=400)(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                await too_large(scope, receive, send)
                return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await too_large(scope, receive, send)
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def parse_json_object(body: bytes, allowed: set[str], required: str) -> dict[str, Any]:
    """A JSON object with only `allowed` keys and `required` present; RequestError (4xx) otherwise.

    The parser (jiter) stops at a nesting depth of 200 with an error, so deep payloads cost nothing.
    """
    from pydantic_core import from_json

    if not body.strip():
        raise RequestError("body", "empty: expected a JSON object", status=400)
    try:
        obj = from_json(body, allow_inf_nan=False)
    except ValueError as err:
        raise RequestError("body", f"malformed JSON: {err}", status=400) from None
    if not isinstance(obj, dict):
        raise RequestError("body", f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise RequestError(unknown[0][:80], f"unknown field (expected {', '.join(sorted(allowed))})")
    if required not in obj:
        raise RequestError(required, "field required")
    return obj


def _int_param(value: str | None, field: str, default: int) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise RequestError(field, f"must be an integer, got {value[:40]!r}") from None


def build_api(rec: Recommender, recommend: Callable[[list[Query]], Awaitable[list[list[dict]]]],
              extra_metadata: Callable[[], dict[str, Any]] | None = None,
              max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app over a recommender; `recommend` runs checked queries (batched under Serve)."""
    # No /docs or /redoc: their pages load Swagger / ReDoc assets from a CDN. /openapi.json stays.
    api = FastAPI(title="Speeder", docs_url=None, redoc_url=None)
    api.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)

    @api.exception_handler(RequestError)
    async def _bad_request(_: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(error_body(err.field, err.message), status_code=err.status)

    @api.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(err).__name__}"}, status_code=500)

    @api.post("/recommend")
    async def recommend_one(request: Request) -> dict[str, Any]:
        body = parse_json_object(await request.body(), RECOMMEND_KEYS, "history")
        query = rec.query(body["history"], body.get("k", 10), body.get("candidates"), body.get("exclude_history", True))
        (items,) = await recommend([query])
        return {"model_version": rec.trained.version, "history": list(query.history), "items": items}

    @api.post("/recommend/batch")
    async def recommend_batch(request: Request) -> dict[str, Any]:
        body = parse_json_object(await request.body(), BATCH_KEYS, "histories")
        queries = rec.queries(body["histories"], body.get("k", 10), body.get("candidates"),
                              body.get("exclude_history", True))
        results = await recommend(queries)
        return {"model_version": rec.trained.version,
                "results": [{"history": list(q.history), "items": r} for q, r in zip(queries, results, strict=True)]}

    @api.get("/items")
    async def search(request: Request) -> dict[str, Any]:
        q = request.query_params.get("q", "")
        return {"items": rec.search(q, _int_param(request.query_params.get("limit"), "limit", 10))}

    @api.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, Any]:
        return rec.item(_int_param(item_id, "id", 0))

    @api.get("/items/{item_id}/image")
    async def image(item_id: str) -> Response:
        found = rec.image(_int_param(item_id, "id", 0))
        if found is None:
            raise RequestError("image", f"item {item_id} has no image", status=404)
        data, media_type = found
        return Response(data, media_type=media_type, headers={"Cache-Control": "public, max-age=3600"})

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model_version": rec.trained.version}

    @api.get("/metadata")
    async def metadata() -> dict[str, Any]:
        return {**rec.metadata(), **(extra_metadata() if extra_metadata else {})}

    return api


# -- the Serve deployment ---------------------------------------------------------------------------
def _deployment():
    """The deployment class, defined on first use so that importing this module does not import Ray."""
    from ray import serve

    @serve.deployment(name="SpeederServer", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64,
                      health_check_period_s=10)
    @serve.ingress()
    class SpeederServer:
        """One replica: the model and the catalog's item tokens, loaded once; FastAPI routes over them."""

        def __init__(self, settings: dict[str, Any]) -> None:
            import torch

            self.settings = ServeSettings(**settings)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.rec = Recommender.from_checkpoint(self.settings.checkpoint, self.settings.dataset,
                                                   self.settings.features_name, device=device,
                                                   limits=self.settings.limits,
                                                   eval_metrics_uri=self.settings.eval_metrics_uri)
            self._forward.set_max_batch_size(self.settings.max_batch_size)
            self._forward.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
            self.started = time.time()

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
        async def _forward(self, queries: list[Query]) -> list[list[dict]]:
            # In a thread: the event loop keeps accepting (and batching) requests meanwhile.
            return await asyncio.to_thread(self.rec.recommend_queries, queries)

        async def recommend(self, queries: list[Query]) -> list[list[dict]]:
            return list(await asyncio.gather(*(self._forward(q) for q in queries)))

        def serving(self) -> dict[str, Any]:
            s = self.settings
            return {"serve": {"max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s,
                              "max_body_bytes": s.max_body_bytes, "pid": os.getpid(),
                              "uptime_s": round(time.time() - self.started, 1)}}

        def __serve_build_asgi_app__(self) -> Any:
            return build_api(self.rec, self.recommend, self.serving, self.settings.max_body_bytes)

        def check_health(self) -> None:
            if self.rec.table is None:
                raise RuntimeError("catalog item tokens missing")

    return SpeederServer


def application(settings: ServeSettings, num_replicas: int = 1, access_log: bool = True) -> Any:
    """A bound Serve application for `serve.run` (access_log=False: no log line per request, for benchmarks)."""
    deployment = _deployment().options(
        num_replicas=num_replicas, max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.replica_num_cpus, "num_gpus": settings.replica_num_gpus},
        logging_config={"enable_access_log": access_log})
    return deployment.bind(dataclasses.asdict(settings))


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for `serve run` (import path `speeder_platform.serve:build_app`).

    args: config (a job spec / config YAML), overrides (dotlist list), checkpoint (optional URI),
    max_body_bytes (optional). Host and port come from the Serve config file's http_options.
    """
    from speeder_platform.config import load_config

    unknown = set(args) - {"config", "overrides", "checkpoint", "max_body_bytes"}
    if unknown:
        raise ValueError(f"build_app: unknown argument(s) {', '.join(sorted(unknown))}")
    cfg = load_config(args.get("config"), list(args.get("overrides") or []))
    settings = serve_settings(cfg, args.get("checkpoint"))
    if args.get("max_body_bytes"):
        settings.max_body_bytes = int(args["max_body_bytes"])
    return application(settings, cfg.serve.num_replicas)


def start(cfg: SpeederConfig, settings: ServeSettings, port: int | None = None, name: str = APP_NAME) -> str:
    """Start Ray (loopback when local) and Serve on serve.host:port, deploy the app; returns its URL."""
    from ray import serve

    from speeder_platform.ray_utils import ensure_ray
    from speeder_platform.serve_proxy import install_proxy_hook

    install_proxy_hook()  # before Ray starts: the proxy inherits the environment of the Ray it runs in
    ensure_ray(cfg)
    port = port or cfg.serve.port
    serve.start(http_options={"host": cfg.serve.host, "port": port})
    serve.run(application(settings, cfg.serve.num_replicas), name=name, route_prefix="/")
    return f"http://{cfg.serve.host}:{port}"


def run_serve(cfg: SpeederConfig, checkpoint: str | None = None) -> int:
    """`speeder serve CONFIG`: deploy, then block until Ctrl-C (or SIGTERM), then shut Serve down."""
    import signal

    from ray import serve

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    url = start(cfg, serve_settings(cfg, checkpoint))
    log.info("serving %s on %s (Ctrl-C stops)", APP_NAME, url)
    signal.signal(signal.SIGTERM, stop)  # a service manager's stop: the same clean shutdown
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        serve.shutdown()
    return 0

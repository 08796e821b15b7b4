"""Ray Serve app: the recommendation HTTP API (FastAPI ingress, `@serve.batch` over the LLM forward).

    speeder serve jobs/smoke.yaml                      # 127.0.0.1:8000 (serve.host / serve.port)
    serve run jobs/serve-smoke.yaml                    # the same app from a Serve config file

    POST /recommend        {"history": [3, "item-00017"], "k": 10, "candidates": null, "exclude_history": true}
    POST /recommend/batch  {"histories": [[...], ...], "k": 10, "candidates": null | [[...], ...]}
    GET  /items/{id}   GET /items/{id}/image   GET /items?q=mug&limit=10   GET /healthz   GET /metadata

Each replica loads the checkpoint and builds the catalog's item tokens once. Concurrent requests are
gathered by `@serve.batch` into one forward pass (up to serve.max_batch_size histories, waiting at most
serve.batch_wait_timeout_s). `/openapi.json` describes every body, status and error exactly (the models
in serve.api); every error is `{"detail": "k: must be ...", "field": "k"}`. Bodies over
serve.max_body_bytes are refused before they are parsed, so no payload can take a replica down.

API key: with $SPEEDER_API_KEY set, or serve.api_key_file naming a file that holds the key, every
endpoint but /healthz answers 401 unless the request carries `Authorization: Bearer <key>`. The key
travels to no replica: each replica reads it itself, from its own environment or from that file, so it
is in no Serve config, `.bind` argument, runtime_env or dashboard page, and in no file of ours. On a
cluster that means: the variable in every node's environment (KubeRay: `env` from a Secret), or better
the file on every node (a mounted Secret) with serve.api_key_file pointing at it. A replica that finds
no key while the deploying process had one refuses to start: the API never comes up open by accident.
Without a key the API is open, as on a laptop, and `application` logs a warning.

Overload and time: a replica holds serve.max_ongoing_requests; up to serve.max_queued_requests more wait
at Serve's proxy, and beyond that a request gets a JSON 503 with Retry-After at once. A request still
unanswered after serve.request_timeout_s gets a JSON 504. With serve.num_replicas >= 2 a replica that
dies is routed around; a request it held runs again on another one (serve.proxy.RetryOnReplicaDeath,
installed in Serve's proxy by `start`; on a cluster set its environment variable on the nodes).
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
from fastapi.responses import Response

from speeder_platform import storage
from speeder_platform.config import ServeConfig, SpeederConfig
from speeder_platform.serve.api import (
    IMAGE_TYPES,
    BatchRecommendResponse,
    BearerAuth,
    BodyLimitMiddleware,
    Health,
    ItemId,
    ItemRecord,
    ModelMetadata,
    RecommendResponse,
    SearchQuery,
    SearchResponse,
    add_error_handlers,
    document_bearer_auth,
    image_responses,
    parse_body,
    request_body,
    request_models,
    responses,
)
from speeder_platform.serve.recommender import Limits, Query, Recommender, RequestError

log = logging.getLogger("speeder.serve")

APP_NAME = "speeder"
API_KEY_ENV = "SPEEDER_API_KEY"
MIN_API_KEY_CHARS = 16  # a shorter key is guessable; `openssl rand -hex 32` gives 64 characters


@dataclass
class ServeSettings:
    """Everything a replica needs, as plain values (shipped to replicas through `.bind`, hence visible
    in Serve's state: a key file's path, never the key). Built by `serve_settings` from ServeConfig,
    which holds every default."""

    checkpoint: str
    dataset: str
    features_name: str
    eval_metrics_uri: str | None
    max_history: int
    max_k: int
    max_batch_requests: int
    max_batch_size: int
    batch_wait_timeout_s: float
    max_body_bytes: int
    replica_num_cpus: float
    replica_num_gpus: float
    max_ongoing_requests: int
    max_queued_requests: int
    api_key_file: str | None
    require_api_key: bool = False  # set by `application`: the deploying process found a key

    @property
    def limits(self) -> Limits:
        return Limits(self.max_history, self.max_k, self.max_batch_requests)


def _absolute(uri: str) -> str:
    """Local paths made absolute: replicas may not share the driver's working directory."""
    return uri if storage.is_s3(uri) else storage.resolve(uri)[1]


def serve_settings(cfg: SpeederConfig, checkpoint: str | None = None) -> ServeSettings:
    """The served checkpoint (explicit, serve.checkpoint, or the run's final one) and the serve.* limits."""
    from speeder_platform.trained import resolve_checkpoint

    s = cfg.serve
    uri = resolve_checkpoint(cfg, checkpoint or s.checkpoint)
    return ServeSettings(checkpoint=_absolute(uri), dataset=_absolute(cfg.data.uri), features_name=cfg.featurize.name,
                         eval_metrics_uri=_absolute(storage.join(cfg.evaluate.out, "metrics.json")),
                         max_history=s.max_history, max_k=s.max_k, max_batch_requests=s.max_batch_requests,
                         max_batch_size=s.max_batch_size, batch_wait_timeout_s=s.batch_wait_timeout_s,
                         max_body_bytes=s.max_body_bytes, replica_num_cpus=s.replica_num_cpus,
                         replica_num_gpus=s.replica_num_gpus, max_ongoing_requests=s.max_ongoing_requests,
                         max_queued_requests=s.max_queued_requests,
                         api_key_file=os.path.abspath(s.api_key_file) if s.api_key_file else None)


def read_api_key(key_file: str | None = None) -> str | None:
    """The API key: the contents of `key_file` when one is named, else $SPEEDER_API_KEY, else None (open).

    A named file that cannot be read, an empty key or one shorter than MIN_API_KEY_CHARS raises
    ValueError: a deployment meant to be locked must not start open. No message holds the key.
    """
    if key_file:
        try:
            with open(key_file, encoding="utf-8") as f:
                key = f.read().strip()
        except OSError as err:
            raise ValueError(f"serve.api_key_file: cannot read {key_file} ({err.strerror})") from None
        source = f"serve.api_key_file {key_file}"
    elif API_KEY_ENV in os.environ:
        key, source = os.environ[API_KEY_ENV].strip(), API_KEY_ENV
    else:
        return None
    if len(key) < MIN_API_KEY_CHARS:
        raise ValueError(f"{source}: an API key needs at least {MIN_API_KEY_CHARS} characters, got {len(key)} "
                         "(e.g. `openssl rand -hex 32`)")
    return key


def replica_api_key(settings: ServeSettings) -> str | None:
    """The key a replica enforces, read in the replica's own process (see the module docstring).

    A replica that finds none while the deploying process had one refuses to start (RuntimeError).
    """
    key = read_api_key(settings.api_key_file)
    if settings.require_api_key and key is None:
        raise RuntimeError(f"the deploying process has an API key but this replica finds none: set {API_KEY_ENV} "
                           "in every node's environment (not in a runtime_env: the dashboard shows those), or "
                           "serve.api_key_file to a file every node has")
    return key


# -- the HTTP API (plain FastAPI: testable without Ray) ---------------------------------------------
def build_api(rec: Recommender, recommend: Callable[[list[Query]], Awaitable[list[list[dict]]]],
              extra_metadata: Callable[[], dict[str, Any]] | None = None,
              max_body_bytes: int = ServeConfig.max_body_bytes, api_key: str | None = None) -> FastAPI:
    """The FastAPI app over a recommender; `recommend` runs checked queries (batched under Serve).

    api_key: every route but /healthz (and /openapi.json itself) requires it as a bearer token.
    """
    # No /docs or /redoc: their pages load Swagger / ReDoc assets from a CDN. /openapi.json stays.
    api = FastAPI(title="Speeder", summary="LLM-based sequential recommendation", docs_url=None, redoc_url=None)
    api.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key is not None:
        # Added last, so outermost: a request without the key is refused before its body is read.
        api.add_middleware(BearerAuth, key=api_key)
        document_bearer_auth(api)
    add_error_handlers(api)
    locked = api_key is not None
    one, batch = request_models(rec.limits)

    @api.post("/recommend", response_model=RecommendResponse, openapi_extra=request_body(one),
              responses=responses(400, 422, locked=locked))
    async def recommend_one(request: Request) -> dict[str, Any]:
        """The top-k items after one history (item ids or source ids, oldest first)."""
        body = parse_body(await request.body(), one)
        query = rec.query(body.history, body.k, body.candidates, body.exclude_history)
        (items,) = await recommend([query])
        return {"model_version": rec.trained.version, "history": list(query.history), "items": items}

    @api.post("/recommend/batch", response_model=BatchRecommendResponse, openapi_extra=request_body(batch),
              responses=responses(400, 422, locked=locked))
    async def recommend_batch(request: Request) -> dict[str, Any]:
        """The top-k items after each of many histories, in one forward pass."""
        body = parse_body(await request.body(), batch)
        queries = rec.queries(body.histories, body.k, body.candidates, body.exclude_history)
        results = await recommend(queries)
        return {"model_version": rec.trained.version,
                "results": [{"history": list(q.history), "items": r} for q, r in zip(queries, results, strict=True)]}

    @api.get("/items", response_model=SearchResponse, responses=responses(422, locked=locked))
    async def search(params: SearchQuery) -> dict[str, Any]:
        """Items whose title starts with, then contains, `q` (an exact source id first)."""
        return {"items": rec.search(params.q, params.limit)}

    @api.get("/items/{id}", response_model=ItemRecord, responses=responses(404, 422, locked=locked))
    async def item(item_id: ItemId) -> dict[str, Any]:
        """One item of the catalog."""
        return rec.item(item_id)

    @api.get("/items/{id}/image", response_class=Response, responses=image_responses(locked=locked))
    async def image(item_id: ItemId) -> Response:
        """The item's image, read from the dataset (404 when it has none)."""
        found = await asyncio.to_thread(rec.image, item_id)  # file or S3 I/O: off the event loop
        if found is None:
            raise RequestError("id", f"item {item_id} has no image", status=404)
        data, media_type = found
        # Only image types go out as such: anything else a dataset holds is served as opaque bytes.
        headers = {"Cache-Control": f"{'private' if locked else 'public'}, max-age=3600",
                   "X-Content-Type-Options": "nosniff"}
        return Response(data, media_type=media_type if media_type in IMAGE_TYPES else "application/octet-stream",
                         headers=headers)

    @api.get("/healthz", response_model=Health, responses=responses(locked=False))
    async def healthz() -> dict[str, Any]:
        """Liveness, without a key: for load balancers and probes."""
        return {"status": "ok", "model_version": rec.trained.version}

    @api.get("/metadata", response_model=ModelMetadata, responses=responses(locked=locked))
    async def metadata() -> dict[str, Any]:
        """The served model and the API's limits; never a path, host, process id or credential."""
        return {**rec.metadata(), **(extra_metadata() if extra_metadata else {})}

    return api


# -- the Serve deployment ---------------------------------------------------------------------------
def _deployment():
    """The deployment class, defined on first use so that importing this module does not import Ray."""
    from ray import serve

    # Resources, replica count and request limits are set by `application` from ServeSettings.
    @serve.deployment(name="SpeederServer", health_check_period_s=10)
    @serve.ingress()
    class SpeederServer:
        """One replica: the model and the catalog's item tokens, loaded once; FastAPI routes over them."""

        def __init__(self, settings: dict[str, Any]) -> None:
            import torch

            self.settings = ServeSettings(**settings)
            self.api_key = replica_api_key(self.settings)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.rec = Recommender.from_checkpoint(self.settings.checkpoint, self.settings.dataset,
                                                   self.settings.features_name, device=device,
                                                   limits=self.settings.limits,
                                                   eval_metrics_uri=self.settings.eval_metrics_uri)
            self._forward.set_max_batch_size(self.settings.max_batch_size)
            self._forward.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
            self.started = time.time()

        @serve.batch  # sized from the settings in __init__
        async def _forward(self, queries: list[Query]) -> list[list[dict]]:
            # In a thread: the event loop keeps accepting (and batching) requests meanwhile.
            return await asyncio.to_thread(self.rec.recommend_queries, queries)

        async def recommend(self, queries: list[Query]) -> list[list[dict]]:
            return list(await asyncio.gather(*(self._forward(q) for q in queries)))

        def serving(self) -> dict[str, Any]:
            s = self.settings
            return {"serve": {"max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s,
                              "max_body_bytes": s.max_body_bytes, "api_key_required": self.api_key is not None,
                              "uptime_s": round(time.time() - self.started, 1)}}

        def __serve_build_asgi_app__(self) -> Any:
            return build_api(self.rec, self.recommend, self.serving, self.settings.max_body_bytes, self.api_key)

        def check_health(self) -> None:
            if self.rec.table is None:
                raise RuntimeError("catalog item tokens missing")

    return SpeederServer


def application(settings: ServeSettings, num_replicas: int = 1, access_log: bool = True) -> Any:
    """A bound Serve application for `serve.run` (access_log=False: no log line per request, for benchmarks).

    Reads the API key once here too, so that a missing key file fails before anything deploys, and tells
    the replicas (by a flag, not the key) that they must find one.
    """
    from ray.serve.config import BackpressureConfig

    from speeder_platform.serve.proxy import RETRY_AFTER_S

    locked = read_api_key(settings.api_key_file) is not None
    if not locked:
        log.warning("no API key (%s or serve.api_key_file): every endpoint is open to whoever reaches the port",
                    API_KEY_ENV)
    deployment = _deployment().options(
        num_replicas=num_replicas, max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        backpressure_config=BackpressureConfig(retry_after_s=RETRY_AFTER_S),  # 503 + Retry-After when full
        ray_actor_options={"num_cpus": settings.replica_num_cpus, "num_gpus": settings.replica_num_gpus},
        logging_config={"enable_access_log": access_log})
    return deployment.bind(dataclasses.asdict(dataclasses.replace(settings, require_api_key=locked)))


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for `serve run` (import path `speeder_platform.serve:build_app`).

    args: config (a job spec / config YAML), overrides (dotlist list), checkpoint (optional URI),
    max_body_bytes (optional). Host, port and request_timeout_s come from the Serve config file's
    http_options.
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
    from speeder_platform.serve.proxy import install_proxy_hook

    install_proxy_hook()  # before Ray starts: the proxy inherits the environment of the Ray it runs in
    ensure_ray(cfg)
    port = port or cfg.serve.port
    serve.start(http_options={"host": cfg.serve.host, "port": port, "request_timeout_s": cfg.serve.request_timeout_s})
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

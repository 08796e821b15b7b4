"""The HTTP contract of the Serve API: its pydantic models, error body, key check and body limit.

serve.build_api wires these into FastAPI routes; `/openapi.json` is generated from them, so the
document and the API cannot drift apart. Every error, whoever raises it (a route, FastAPI's parameter
validation, the middlewares here, Serve's proxy through serve.proxy), has one body:

    {"detail": "history[2]: unknown item id 999 (the catalog has ids 0..79)", "field": "history[2]"}

`field` names the input at fault (`body`, `k`, `history[2]`, `id`, `limit`, `authorization`), or
`service` when the server is (5xx), or is null (no such route or method). Request bodies are parsed
here rather than by FastAPI: any content type is accepted (`curl -d` sends form-urlencoded), NaN and
nesting deeper than 200 are a 400, and an empty body is a 400 too; their schema still goes into the
document through `request_body`.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, create_model
from starlette.exceptions import HTTPException

from speeder_platform.serve.recommender import MAX_QUERY_CHARS, MAX_SEARCH_LIMIT, Limits, RequestError

log = logging.getLogger("speeder.serve")

OPEN_PATHS = frozenset({"/healthz"})  # no key needed: load balancers and probes carry none
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")  # other files go out as octet-stream
DEFAULT_K = 10
_LOCATIONS = {"body", "path", "query", "header", "cookie"}  # the request part FastAPI puts first in a loc

Model = TypeVar("Model", bound=BaseModel)


# -- response bodies ---------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    """Every error response: `detail` reads "<field>: <what is wrong>"."""

    detail: str
    field: str | None = Field(description="the input at fault (`k`, `history[2]`, `id`), or `service` for a 5xx")


class ItemRecord(BaseModel):
    """One catalog item."""

    item_id: int
    source_id: str
    title: str
    image_url: str | None = Field(description="this API's /items/{id}/image, or null when the item has none")


class RankedItem(ItemRecord):
    """A recommended item, best first."""

    rank: int = Field(ge=1)
    score: float


class RecommendResponse(BaseModel):
    model_version: str
    history: list[int] = Field(description="the history as item ids")
    items: list[RankedItem]


class BatchResult(BaseModel):
    history: list[int]
    items: list[RankedItem]


class BatchRecommendResponse(BaseModel):
    model_version: str
    results: list[BatchResult] = Field(description="one per history, in request order")


class SearchResponse(BaseModel):
    items: list[ItemRecord]


class Health(BaseModel):
    status: Literal["ok"]
    model_version: str


class LimitsInfo(BaseModel):
    max_history: int
    max_k: int
    max_batch_requests: int


class Batching(BaseModel):
    forwards: int
    requests: int
    max_batch: int


class ServingInfo(BaseModel):
    max_batch_size: int
    batch_wait_timeout_s: float
    max_body_bytes: int
    api_key_required: bool
    uptime_s: float


class ModelMetadata(BaseModel):
    """GET /metadata. Only these fields go out: a key the recommender might add later (a path, say)
    is dropped by FastAPI's response filtering, not published."""

    model_version: str
    stage: int | None
    step: int | None
    modalities: list[str]
    num_items: int = Field(description="catalog size")
    model_max_history: int
    train_metrics: dict[str, float | None]
    eval_metrics: dict[str, float | None] | None
    limits: LimitsInfo
    batching: Batching
    serve: ServingInfo | None = None


# -- request bodies and parameters ------------------------------------------------------------------
ItemRef = Annotated[StrictInt | StrictStr, Field(description="an item id (integer) or a source id (string)")]


def request_models(limits: Limits) -> tuple[type[BaseModel], type[BaseModel]]:
    """The bodies of POST /recommend and POST /recommend/batch under `limits`.

    Built per API because the limits are served values (serve.*): the document states them exactly.
    These check shape and bounds; the recommender then checks that ids exist.
    """
    forbid = ConfigDict(extra="forbid")
    history = Annotated[list[ItemRef], Field(min_length=1, max_length=limits.max_history,
                                             description="item ids or source ids, oldest first")]
    candidates = Annotated[list[ItemRef], Field(min_length=1, description="rank only these items")]
    k = Annotated[StrictInt, Field(ge=1, le=limits.max_k, description="how many items to return")]
    exclude = Annotated[StrictBool, Field(description="never recommend an item of the history")]
    one = create_model("RecommendRequest", __config__=forbid, history=(history, ...),
                       k=(k, min(DEFAULT_K, limits.max_k)), candidates=(candidates | None, None),
                       exclude_history=(exclude, True))
    batch = create_model(
        "BatchRecommendRequest", __config__=forbid,
        histories=(Annotated[list[history], Field(min_length=1, max_length=limits.max_batch_requests)], ...),
        k=(k, min(DEFAULT_K, limits.max_k)),
        candidates=(Annotated[list[candidates] | None, Field(description="one list per history")], None),
        exclude_history=(exclude, True))
    return one, batch


class SearchParams(BaseModel):
    q: str = Field("", max_length=MAX_QUERY_CHARS, description="a title prefix or substring, or a source id")
    limit: int = Field(10, ge=1, le=MAX_SEARCH_LIMIT)


SearchQuery = Annotated[SearchParams, Query()]
ItemId = Annotated[int, Path(alias="id", description="an item id")]


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` declaring `model` as an operation's (required) JSON body."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def parse_body(body: bytes, model: type[Model]) -> Model:
    """The body as `model`: RequestError 400 when it is not JSON, 422 naming the first bad field.

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
    try:
        return model.model_validate(obj)
    except ValidationError as err:
        raise validation_error(err.errors(include_url=False)) from None


def field_name(loc: Sequence[str | int]) -> str:
    """pydantic's error location as a field name: ("histories", 1, 0, "int") -> "histories[1][0]".

    The request part FastAPI puts first ("query", "path") is dropped, and so is any name after the
    first: the request models hold no nested objects, so such a name is a union member ("int", "str").
    """
    parts = list(loc[1:] if loc and loc[0] in _LOCATIONS else loc)
    if not parts:
        return "body"
    return str(parts[0]) + "".join(f"[{p}]" for p in parts[1:] if isinstance(p, int))


def validation_error(errors: Sequence[Mapping[str, Any]]) -> RequestError:
    """The first of pydantic's errors as a 422 naming its field."""
    field = field_name(errors[0]["loc"])
    # A value that fits no member of a union (int | str) gets one error per member: say each.
    messages = dict.fromkeys(e["msg"] for e in errors if field_name(e["loc"]) == field)
    return RequestError(field, "; ".join(messages))


# -- statuses, as documented ------------------------------------------------------------------------
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before a retry", "schema": {"type": "integer"}}}
ERRORS: dict[int, dict[str, Any]] = {
    400: {"description": "The body is not JSON: empty, malformed, NaN, or nested deeper than 200."},
    401: {"description": "No `Authorization: Bearer <key>`, or a wrong key.",
          "headers": {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}}},
    404: {"description": "No item with this id, or the item has no image."},
    413: {"description": "The request body is over serve.max_body_bytes (refused before parsing)."},
    422: {"description": "A field is invalid: `field` names it, `detail` says why."},
    500: {"description": "An internal error (the replica logs it)."},
    503: {"description": "Overloaded (serve.max_queued_requests are waiting) or no replica answered.",
          "headers": _RETRY_AFTER},
    504: {"description": "No answer within serve.request_timeout_s."},
}
# Any request can meet these: a body over the limit, a failure, overload, the timeout.
_ALWAYS = (413, 500, 503, 504)


def responses(*codes: int, locked: bool) -> dict[int | str, dict[str, Any]]:
    """An operation's error statuses (its own `codes`, those any request can meet, 401 when `locked`)."""
    every = {*codes, *_ALWAYS, *((401,) if locked else ())}
    return {code: {**ERRORS[code], "model": ErrorBody} for code in sorted(every)}


def image_responses(locked: bool) -> dict[int | str, dict[str, Any]]:
    """GET /items/{id}/image: the image's bytes under its media type, or an error."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    types = (*IMAGE_TYPES, "application/octet-stream")
    return {200: {"description": "The image.", "content": dict.fromkeys(types, binary)},
            **responses(404, 422, locked=locked)}


def error_body(field: str | None, message: str) -> dict[str, str | None]:
    return {"detail": f"{field}: {message}" if field else message, "field": field}


def add_error_handlers(api: FastAPI) -> None:
    """Every error the app raises answers ErrorBody, FastAPI's own included."""

    @api.exception_handler(RequestError)
    async def _bad_request(_: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(error_body(err.field, err.message), status_code=err.status)

    @api.exception_handler(RequestValidationError)  # path and query parameters
    async def _bad_parameter(_: Request, err: RequestValidationError) -> JSONResponse:
        bad = validation_error(err.errors())
        return JSONResponse(error_body(bad.field, bad.message), status_code=422)

    @api.exception_handler(HTTPException)  # no such route (404), wrong method (405)
    async def _http(_: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(None, str(err.detail)), status_code=err.status_code, headers=err.headers)

    @api.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body("service", f"internal error ({type(err).__name__})"), status_code=500)


def document_bearer_auth(api: FastAPI) -> None:
    """Declare the bearer key in /openapi.json: required everywhere but OPEN_PATHS (BearerAuth enforces it)."""
    generate = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            doc = generate()  # also caches it as api.openapi_schema, which the edits below change in place
            doc.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            doc["security"] = [{"bearer": []}]
            for path in OPEN_PATHS & set(doc["paths"]):
                for operation in doc["paths"][path].values():
                    operation["security"] = []
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]


# -- ASGI middlewares -------------------------------------------------------------------------------
class BearerAuth:
    """401 for any request but OPEN_PATHS without `Authorization: Bearer <key>`, before its body is read.

    The token is compared in constant time (hmac.compare_digest): the time a refusal takes says nothing
    about how much of a guess was right. Neither the key nor what the client sent goes into the answer.
    """

    def __init__(self, app: Callable, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", "")) or "/"
        if scope["type"] != "http" or path in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        refusal = JSONResponse(error_body("authorization", "missing or wrong bearer token"), status_code=401,
                               headers={"WWW-Authenticate": "Bearer"})
        await refusal(scope, receive, send)

    def _authorized(self, scope: dict) -> bool:
        value = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


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

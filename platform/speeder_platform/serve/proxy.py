"""Ray Serve proxy middleware: a request whose replica dies runs again on another one, or gets a clear 503.

When a replica dies while it holds a request (killed, out of memory, node lost), Ray Serve's proxy
receives a RayActorError and sends no response at all; uvicorn then answers a bare text/plain
`500 Internal Server Error`. Every route of the Speeder API is a read, so such a request can run again:
by then the router has marked the dead replica and picks a live one. `RetryOnReplicaDeath` buffers the
request body (up to MAX_REPLAY_BYTES), runs the request, and when the proxy returned without starting
a response, runs it again after a short pause (RETRY_DELAYS_S); when no attempt answers, the client
gets `503 {"detail": "service: ...", "field": "service"}` with `Retry-After`, never a hang and never
a bare 500. A replica that dies after its response's start but before its body is retried the same way (the
start is held until the body comes; Serve would drop the connection). A response whose body has started
is never retried; a client that went away is not retried.
A response that needed more than one attempt carries `x-speeder-retries: N`.

Serve's proxy also answers some requests itself, in plain text: 503 when more than the deployment's
max_queued_requests wait (`Request dropped due to backpressure ...`) and 408 when serve.request_timeout_s
passes. Those become the API's JSON error body (`"field": "service"`); the timeout becomes a 504 (the
client was not slow, the server was). And a client cannot lift the timeout: Serve honours per-request
`x-request-timeout-seconds` (0 disables it) and `x-request-disconnect-disabled` headers, meant for its
own HAProxy ingress; they are dropped from every request here.

Serve installs proxy middlewares through its hook, an environment variable of the proxy's process:

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=speeder_platform.serve.proxy:proxy_middlewares

`speeder serve` sets it before it starts a local Ray (the proxy inherits it); on a cluster, set it in
the nodes' environment. It runs inside the proxy process, so it imports nothing heavy (config: no torch).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from speeder_platform.config import ServeConfig

log = logging.getLogger("speeder.serve")

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "speeder_platform.serve.proxy:proxy_middlewares"
MAX_REPLAY_BYTES = ServeConfig.max_body_bytes  # the replicas refuse larger bodies by default anyway
RETRY_DELAYS_S = (0.2, 1.0, 2.0)  # pauses before each new attempt: the router learns of the death meanwhile
RETRY_AFTER_S = 2
RETRIES_HEADER = b"x-speeder-retries"
# Per-request overrides of Serve's own policies (timeout, disconnect handling): not a client's to set.
DROPPED_HEADERS = frozenset({b"x-request-timeout-seconds", b"x-request-disconnect-disabled"})
# Serve's own plain-text errors -> (status, what the JSON body says).
SERVE_ERRORS = {
    408: (504, "no answer within the request timeout (serve.request_timeout_s)"),
    429: (429, "overloaded: too many requests are waiting; retry after the Retry-After delay"),
    503: (503, "overloaded or unavailable: too many requests are waiting, or no replica is up; retry after "
               "the Retry-After delay"),
}

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def install_proxy_hook() -> None:
    """Ask Serve proxies started from now on (by a Ray this process starts) to load the middleware."""
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)


def proxy_middlewares() -> list:
    """Serve's proxy callback: the Starlette middlewares the proxy wraps its ASGI app with."""
    from starlette.middleware import Middleware

    return [Middleware(RetryOnReplicaDeath)]


class RetryOnReplicaDeath:
    """ASGI middleware for the Serve proxy (see the module docstring)."""

    def __init__(self, app: Callable, delays: tuple[float, ...] = RETRY_DELAYS_S,
                 max_replay_bytes: int = MAX_REPLAY_BYTES) -> None:
        self.app = app
        self.delays = delays
        self.max_replay_bytes = max_replay_bytes

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope = {**scope, "headers": _without(scope.get("headers") or [], DROPPED_HEADERS)}
        send = _json_errors(send)
        chunks, complete = await self._buffer(scope, receive)
        if chunks is None:  # the client left before its body arrived: nobody to answer
            return
        if not complete:  # too large to replay (the replica refuses it): one attempt, streamed through
            await self.app(scope, _replay(chunks, receive, more=True, state={}), send)
            return
        state: dict[str, bool] = {}
        for attempt, delay in enumerate((0.0, *self.delays)):
            if delay:
                await asyncio.sleep(delay)
            started = await self._attempt(scope, chunks, receive, send, state, attempt)
            if started or state.get("disconnected"):
                return
            log.warning("%s %s: the replica failed before answering (attempt %d of %d)", scope.get("method"),
                        scope.get("path"), attempt + 1, len(self.delays) + 1)
        await _unavailable(send)

    async def _buffer(self, scope: dict, receive: Receive) -> tuple[list[bytes] | None, bool]:
        """The request body's chunks (None: the client left), and whether it is whole (False: over the
        replay limit; the rest is still with the client)."""
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_replay_bytes:
            return [], False
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect
                return None, False
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if more and size > self.max_replay_bytes:
                return chunks, False
        return chunks, True

    async def _attempt(self, scope: dict, chunks: list[bytes], receive: Receive, send: Send,
                       state: dict[str, bool], retries: int) -> bool:
        """Run the request once; True when a response started (it then went to the client as is).

        The response's start is held until its first body message: Serve's proxy forwards the replica's
        messages in batches, and a replica that dies between the two leaves a start with no body, which
        Serve ends by dropping the connection. Such an attempt has sent the client nothing yet, so it is
        retried like one that sent no start at all.
        """
        started = False
        held: Message | None = None

        async def watch(message: Message) -> None:
            nonlocal started, held
            if message["type"] == "http.response.start":
                if retries:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (RETRIES_HEADER, str(retries).encode())]}
                held = message
                return
            if held is not None:
                started = True
                await send(held)
                held = None
            await send(message)

        await self.app(dict(scope), _replay(chunks, receive, more=False, state=state), watch)
        return started


def _replay(chunks: list[bytes], receive: Receive, more: bool, state: dict[str, bool]) -> Receive:
    """A receive callable that hands out the buffered body first, then the client's own messages.

    more=False: the buffered chunks are the whole body. state["disconnected"] records a client that left.
    """
    pending = list(chunks) or [b""]

    async def replayed() -> Message:
        if pending:
            body = pending.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(pending) or more}
        message = await receive()
        if message["type"] == "http.disconnect":
            state["disconnected"] = True
        return message

    return replayed


def _without(headers: list, names: set[bytes] | frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.lower() not in names]


def _json_errors(send: Send) -> Send:
    """A send callable that turns Serve's plain-text error responses into the API's JSON error body.

    The app's own errors are JSON already and pass through, as does every success (images included).
    """
    held: Message | None = None
    text = b""

    async def sending(message: Message) -> None:
        nonlocal held, text
        if message["type"] == "http.response.start":
            headers = message.get("headers") or []
            content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
            if message["status"] >= 400 and not content_type.startswith(b"application/json"):
                held = message
                return
        elif held is not None and message["type"] == "http.response.body":
            text += message.get("body", b"")
            if message.get("more_body", False):
                return
            status, what = SERVE_ERRORS.get(held["status"], (held["status"], "error"))
            served = text.decode("utf-8", "replace").strip()[:200]
            kept = _without(held.get("headers") or [], {b"content-type", b"content-length"})  # Retry-After stays
            await _send_error(send, status, f"{what} ({served})" if served else what, kept)
            return
        await send(message)

    return sending


async def _unavailable(send: Send) -> None:
    await _send_error(send, 503, "the replica serving this request failed and no other replica answered; "
                                 "retry shortly", [(b"retry-after", str(RETRY_AFTER_S).encode())])


async def _send_error(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
    """The API's error body (serve.api.ErrorBody) for a failure of the service, not of the request."""
    body = json.dumps({"detail": f"service: {message}", "field": "service"}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})

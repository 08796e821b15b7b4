"""Ray Serve proxy middleware: a request whose replica dies runs again on another one, or gets a clear 503.

When a replica dies while it holds a request (killed, out of memory, node lost), Ray Serve's proxy
receives a RayActorError and sends no response at all; uvicorn then answers a bare text/plain
`500 Internal Server Error`. Every route of the Speeder API is a read, so such a request can run again:
by then the router has marked the dead replica and picks a live one. `RetryOnReplicaDeath` buffers the
request body (up to MAX_REPLAY_BYTES), runs the request, and when the proxy returned without starting
a response, runs it again after a short pause (RETRY_DELAYS_S); when no attempt answers, the client
gets `503 {"detail": "service: ...", "field": "service"}` with `Retry-After`, never a hang and never
a bare 500. A response that has started is never retried; a client that went away is not retried.
A response that needed more than one attempt carries `x-speeder-retries: N`.

Serve installs proxy middlewares through its hook, an environment variable of the proxy's process:

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=speeder_platform.serve_proxy:proxy_middlewares

`speeder serve` sets it before it starts a local Ray (the proxy inherits it); on a cluster, set it in
the nodes' environment. This module imports nothing heavy: it runs inside the proxy process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("speeder.serve")

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "speeder_platform.serve_proxy:proxy_middlewares"
MAX_REPLAY_BYTES = 2 * 1024 * 1024  # the replicas refuse larger bodies (serve.max_body_bytes) anyway
RETRY_DELAYS_S = (0.2, 1.0, 2.0)  # pauses before each new attempt: the router learns of the death meanwhile
RETRY_AFTER_S = 2
RETRIES_HEADER = b"x-speeder-retries"

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
        """Run the request once; True when a response started (it then went to the client as is)."""
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if retries:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (RETRIES_HEADER, str(retries).encode())]}
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


async def _unavailable(send: Send) -> None:
    body = json.dumps({"detail": "service: the replica serving this request failed and no other replica "
                                 "answered; retry shortly", "field": "service"}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(RETRY_AFTER_S).encode())]})
    await send({"type": "http.response.body", "body": body})

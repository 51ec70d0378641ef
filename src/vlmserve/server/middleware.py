"""ASGI middleware around the routes: request ids, CORS, the API key and the request body limit.

Outermost first (`install_middleware`): RequestIdMiddleware (a request context for the logs, the
X-Request-Id response header), CORS (Starlette's, only when origins are configured), ApiKeyMiddleware
(401 before the body is read), BodyLimitMiddleware (413 from Content-Length, or while counting a
chunked body, before anything parses it). Errors use the contract's body (server/errors.py).
"""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlmserve.config import ServerConfig
from vlmserve.logs import close_request_context, open_request_context
from vlmserve.server.errors import error_body

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"


class RequestIdMiddleware:
    """Opens the request context (the client's sane X-Request-Id, or our own id, renamed to the chat
    id by the chat layer) and returns the id in X-Request-Id on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context, token = open_request_context(Headers(scope=scope).get(REQUEST_ID_HEADER))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = context.request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            close_request_context(token)


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <api_key>` on every path but the exempt ones (and CORS
    preflights, which carry no credentials); compares in constant time."""

    def __init__(self, app: ASGIApp, *, api_key: str, exempt_paths: tuple[str, ...]) -> None:
        self.app = app
        self._expected = api_key.encode()
        self._exempt = frozenset(exempt_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._exempt or self._is_preflight(scope):
            await self.app(scope, receive, send)
            return
        scheme, _, token = (Headers(scope=scope).get("authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._expected):
            await self.app(scope, receive, send)
            return
        message = (
            "invalid API key" if token else "missing API key: send the header Authorization: Bearer <key>"
        )
        response = JSONResponse(
            error_body(401, message, "AuthenticationError"),
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="vlmserve"'},
        )
        await response(scope, receive, send)

    @staticmethod
    def _is_preflight(scope: Scope) -> bool:
        headers = Headers(scope=scope)
        is_cors = "origin" in headers and "access-control-request-method" in headers
        return scope["method"] == "OPTIONS" and is_cors


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: at once from Content-Length, or while counting the chunks of a
    body without one. The body is read here (at most `max_bytes`) and replayed to the app, so nothing
    downstream ever sees an oversized body; later receives (disconnects) pass through."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, f"{declared} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                replay = [message]
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, f"more than {self.max_bytes} bytes")
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break
        chunks.clear()

        async def replaying_receive() -> Message:
            return replay.pop(0) if replay else await receive()

        await self.app(scope, replaying_receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        logger.warning("request body of %s refused: the limit is %d bytes", size, self.max_bytes)
        message = (
            f"the request body is {size}; the limit is {self.max_bytes} bytes "
            "(--max-request-body-bytes). Send fewer or smaller images, or image URLs instead of data URLs."
        )
        response = JSONResponse(
            error_body(413, message, "PayloadTooLargeError"), status_code=413, headers={"Connection": "close"}
        )
        await response(scope, receive, send)


def install_middleware(app: FastAPI, config: ServerConfig) -> None:
    """Adds the stack above to `app` (Starlette wraps the last added outermost, so add inner first)."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_body_bytes)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key, exempt_paths=config.api_key_exempt_paths)
    if config.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_allow_origins),
            allow_credentials=config.cors_allow_credentials,
            allow_methods=list(config.cors_allow_methods),
            allow_headers=list(config.cors_allow_headers),
            expose_headers=[REQUEST_ID_HEADER],
        )
    app.add_middleware(RequestIdMiddleware)

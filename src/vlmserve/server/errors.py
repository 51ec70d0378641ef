"""The one place that turns exceptions into HTTP errors: status + `{"error": {message, type, param, code}}`.

Typed `VLMServeError`s carry their status; pydantic's RequestValidationError becomes 422 with a message
naming the field path and the rule; unknown paths get 404 in the same shape; anything else is a bug:
500 with a generic message, logged with its traceback, and the server goes on. Streaming responses
use `error_payload()` for their SSE error event, so both paths say the same thing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlmserve.errors import ServerBusyError, VLMServeError
from vlmserve.protocol.openai import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "internal server error; the server logged the details"
_HTTP_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "PayloadTooLargeError",
    415: "UnsupportedMediaTypeError",
    422: "UnprocessableEntityError",
    503: "ServiceUnavailableError",
}
# labels pydantic puts in an error location for union members; they name no field
_UNION_LABELS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def error_body(status: int, message: str, error_type: str, param: str | None = None) -> dict[str, Any]:
    return ErrorResponse(
        error=ErrorInfo(message=message, type=error_type, param=param, code=status)
    ).model_dump()


def error_payload(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, body) for any exception; unexpected ones are logged with their traceback."""
    if isinstance(exc, VLMServeError):
        return exc.status, error_body(exc.status, exc.message, exc.error_type, exc.param)
    logger.error("unexpected error while serving a request", exc_info=exc)
    return 500, error_body(500, INTERNAL_ERROR_MESSAGE, "InternalServerError")


def error_response(exc: BaseException) -> JSONResponse:
    status, body = error_payload(exc)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, ServerBusyError) else None
    return JSONResponse(body, status_code=status, headers=headers)


def format_validation_errors(errors: Sequence[Any]) -> tuple[str, str | None]:
    """One message naming each failing field path and rule, and the first path as `param`."""
    parts: list[str] = []
    params: list[str] = []
    for error in errors:
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "")
            parts.append(f"the request body is not valid JSON: {reason} (at character {error['loc'][-1]})")
            params.append("")
            continue
        path = ".".join(str(item) for item in error.get("loc", ()) if _is_field_location(item))
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        # validators over a whole list name the exact element themselves ("messages.1.role: ...")
        named, _, _rest = message.partition(": ")
        if _is_path(named) and named.startswith(path):
            path = named
        elif path:
            message = f"{path}: {message}"
        if message not in parts:
            parts.append(message)
            params.append(path)
    param = params[0] if params and params[0] else None
    return "; ".join(parts) or "invalid request", param


def _is_field_location(item: Any) -> bool:
    if isinstance(item, int):
        return True
    text = str(item)
    return text != "body" and text.isidentifier() and text not in _UNION_LABELS


def _is_path(text: str) -> bool:
    return bool(text) and all(piece.isidentifier() or piece.isdigit() for piece in text.split("."))


async def _vlmserve_error_handler(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, VLMServeError) and exc.status >= 500 and not isinstance(exc, ServerBusyError):
        logger.warning("%s %s: %s", request.method, request.url.path, exc.message)
    return error_response(exc)


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = format_validation_errors(exc.errors())
    return JSONResponse(error_body(422, message, _HTTP_ERROR_TYPES[422], param), status_code=422)


async def _http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"no route for {request.method} {request.url.path}"
    else:
        message = str(exc.detail)
    error_type = _HTTP_ERROR_TYPES.get(exc.status_code, "HTTPError")
    return JSONResponse(
        error_body(exc.status_code, message, error_type), status_code=exc.status_code, headers=exc.headers
    )


class CatchAllMiddleware:
    """Turns an exception no handler took into a 500 error body, logged once with its traceback.

    Starlette's own catch-all answers 500 too but re-raises, so the server logs the error twice and
    test transports raise it; this sits inside it and ends the story here.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response_started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if response_started:
                logger.error("unexpected error after the response started", exc_info=exc)
                return
            await error_response(exc)(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Register every mapping above on `app`."""
    app.add_exception_handler(VLMServeError, _vlmserve_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_middleware(CatchAllMiddleware)

"""Logging setup and the request id: text or JSON lines, and the current request's id on every line.

The HTTP layer opens a `RequestContext` per request (`open_request_context`, a contextvar), so every
line logged while serving it, in tasks it starts too, carries `request_id`; lines outside a request
carry "-". Nothing here knows about HTTP.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass

# what a client may send as X-Request-Id and have used as is (anything else gets our own id)
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
NO_REQUEST_ID = "-"


@dataclass(slots=True)
class RequestContext:
    """The id of the request being served. Mutable: the chat layer may name it after the chat id,
    and tasks started by the request share this object, so they see the new name too."""

    request_id: str
    # the client chose the id (X-Request-Id): it is never renamed
    from_client: bool = False


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "vlmserve_request_context", default=None
)


def open_request_context(client_request_id: str | None) -> tuple[RequestContext, contextvars.Token]:
    """A context for a new request: the client's id if it is sane, else a fresh one.
    Reset it with `close_request_context(token)`."""
    if client_request_id is not None and _SANE_REQUEST_ID.fullmatch(client_request_id):
        context = RequestContext(client_request_id, from_client=True)
    else:
        context = RequestContext(f"req-{uuid.uuid4().hex}")
    return context, _current.set(context)


def close_request_context(token: contextvars.Token) -> None:
    _current.reset(token)


def current_request_id() -> str:
    context = _current.get()
    return context.request_id if context is not None else NO_REQUEST_ID


def name_request(request_id: str) -> None:
    """Names the current request after `request_id` (the chat id) unless the client named it."""
    context = _current.get()
    if context is not None and not context.from_client:
        context.request_id = request_id


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` to the current request's id ("-" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id()
        return True


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC), level, logger, request_id, message[, exc_info]."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", NO_REQUEST_ID),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def configure_logging(level: str, *, jsonl: bool) -> None:
    """Root logging for the server: one stderr handler, text or JSON lines, request ids on every line.
    uvicorn's loggers propagate here (it runs with log_config=None)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonLinesFormatter() if jsonl else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    if level != "DEBUG":
        # httpx logs each image fetch with its URL at INFO: image URLs are request content (often signed)
        logging.getLogger("httpx").setLevel(logging.WARNING)

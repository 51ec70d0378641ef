"""Server-sent events and client disconnects: `data: {json}\\n\\n` framing, the final `data: [DONE]`,
the error event, a streaming response that always closes its generator, and a helper that cancels a
non-streaming handler when its client goes away. Nothing here knows about chat or the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")
logger = logging.getLogger(__name__)

DONE_EVENT = "data: [DONE]\n\n"


def format_event(payload: BaseModel | dict[str, Any]) -> str:
    """One SSE event: `data: <compact JSON>` and a blank line."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json()
    else:
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def error_event(body: dict[str, Any]) -> str:
    """The event that reports an error once the 200 has gone out; `body` is the error JSON."""
    return format_event(body)


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response that closes its async generator however the response ends.

    Starlette leaves a generator suspended at `yield` when the client disconnects (with ASGI spec 2.4
    the send raises; before that the sending task is cancelled), so its `finally` would wait for the
    garbage collector. Closing it here runs the generator's cleanup (engine abort) at once.
    """

    def __init__(self, content: AsyncGenerator[str, None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._generator = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            logger.debug("the client of an event stream disconnected")
        finally:
            await self._generator.aclose()


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client has gone away (call only after the request body was read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(awaitable: Awaitable[T], request: Request) -> T | None:
    """Await `awaitable`, cancelling it if the client disconnects first; then return None.

    Cancellation runs the awaited code's `finally` blocks, which is where engine requests are aborted.
    """
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # our own caller was cancelled: take the handler down with us
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None

"""server/sse.py: event framing and the cancel-on-disconnect helper."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from vlmserve.protocol.openai import ChatCompletionChunk, ChatCompletionStreamChoice, DeltaMessage
from vlmserve.server.sse import DONE_EVENT, cancel_on_disconnect, error_event, format_event


def test_done_event() -> None:
    assert DONE_EVENT == "data: [DONE]\n\n"


def test_model_event_is_one_compact_json_line() -> None:
    chunk = ChatCompletionChunk(
        id="chat-1",
        created=1,
        model="m",
        choices=[ChatCompletionStreamChoice(index=0, delta=DeltaMessage(content="é\n"))],
    )
    event = format_event(chunk)
    assert event.startswith("data: {") and event.endswith("}\n\n")
    assert event.count("\n") == 2  # a newline in the content is escaped, never framing
    assert json.loads(event.removeprefix("data: "))["choices"][0]["delta"] == {"content": "é\n"}


def test_error_event_carries_the_error_body() -> None:
    body = {"error": {"message": "boom", "type": "InternalServerError", "param": None, "code": 500}}
    event = error_event(body)
    assert (
        event == 'data: {"error":{"message":"boom","type":"InternalServerError","param":null,"code":500}}\n\n'
    )


class FakeRequest:
    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def test_cancel_on_disconnect_returns_the_result() -> None:
    async def work() -> int:
        return 42

    assert await cancel_on_disconnect(work(), FakeRequest()) == 42  # type: ignore[arg-type]


async def test_cancel_on_disconnect_cancels_the_work() -> None:
    request = FakeRequest()
    cleaned_up = asyncio.Event()

    async def work() -> int:
        try:
            await asyncio.sleep(10)
        finally:
            cleaned_up.set()
        return 1

    task = asyncio.create_task(cancel_on_disconnect(work(), request))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    request.gone.set()
    assert await asyncio.wait_for(task, 1) is None
    assert cleaned_up.is_set()


async def test_cancel_on_disconnect_propagates_errors() -> None:
    async def work() -> int:
        raise ValueError("x")

    try:
        await cancel_on_disconnect(work(), FakeRequest())  # type: ignore[arg-type]
    except ValueError:
        pass
    else:
        raise AssertionError("the error was swallowed")

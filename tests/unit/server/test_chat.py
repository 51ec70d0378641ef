"""POST /v1/chat/completions against the scripted engine: response shapes, streaming, n, errors, aborts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any

import httpx
import pytest

from tests.unit.server.helpers import (
    FIRST_TOKEN_ID,
    IMAGE_TOKENS,
    MODEL,
    FakeEngine,
    FakeModelServer,
    assert_error,
    chat_body,
    parse_sse,
)
from vlmserve.errors import EngineDeadError, RequestFailedError, ServerBusyError

URL = "/v1/chat/completions"


async def test_response_has_every_field(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await client.post(URL, json=chat_body(temperature=0))
    assert response.status_code == 200
    body = response.json()
    assert re.fullmatch(r"chat-[0-9a-f]{32}", body["id"])
    assert isinstance(body["created"], int)
    assert body == {
        "id": body["id"],
        "object": "chat.completion",
        "created": body["created"],
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello, world!"},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 2, "total_tokens": 6, "completion_tokens": 4},
        "prompt_logprobs": None,
    }
    [request] = engine.requests
    assert request.request_id == body["id"]
    assert request.sampling_params.temperature == 0
    assert request.sampling_params.max_tokens == 1024


async def test_max_tokens_gives_length(client: httpx.AsyncClient) -> None:
    body = (await client.post(URL, json=chat_body(max_tokens=2))).json()
    assert body["choices"][0]["message"]["content"] == "Hello,"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


async def test_stop_reason_is_reported(client: httpx.AsyncClient) -> None:
    body = (await client.post(URL, json=chat_body(stop=["!"]))).json()
    assert body["choices"][0]["message"]["content"] == "Hello, world"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["stop_reason"] == "!"


async def test_prompt_tokens_count_image_tokens(
    client: httpx.AsyncClient, model_server: FakeModelServer
) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    content = [image, {"type": "text", "text": "what is this"}]
    body = (await client.post(URL, json=chat_body(messages=[{"role": "user", "content": content}]))).json()
    assert body["usage"]["prompt_tokens"] == IMAGE_TOKENS + 3


async def test_completion_mode_passes_the_flag_and_returns_only_the_continuation(
    client: httpx.AsyncClient, model_server: FakeModelServer
) -> None:
    messages = [{"role": "user", "content": "Greet me"}, {"role": "assistant", "content": "Sure:"}]
    body = (await client.post(URL, json=chat_body(messages=messages))).json()
    assert body["choices"][0]["message"]["content"] == "Hello, world!"
    [(chat_messages, completion_mode)] = model_server.preprocessor.calls
    assert completion_mode is True
    assert [m.role for m in chat_messages] == ["user", "assistant"]
    normal = [{"role": "user", "content": "Greet me"}]
    await client.post(URL, json=chat_body(messages=normal))
    assert model_server.preprocessor.calls[1][1] is False


async def test_default_max_tokens_shrinks_to_fit_the_context(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    # 4096 context, 4000 prompt tokens: 96 left, fewer than the default 1024
    response = await client.post(URL, json=chat_body(messages=[{"role": "user", "content": "w " * 4000}]))
    assert response.status_code == 200
    assert engine.requests[0].sampling_params.max_tokens == 96


async def test_logprobs(client: httpx.AsyncClient) -> None:
    body = (await client.post(URL, json=chat_body(logprobs=True, top_logprobs=2, max_tokens=1))).json()
    assert body["choices"][0]["logprobs"] == {
        "content": [
            {
                "token": f"t{FIRST_TOKEN_ID}",
                "logprob": -0.5,
                "bytes": list(f"t{FIRST_TOKEN_ID}".encode()),
                "top_logprobs": [
                    {
                        "token": f"t{FIRST_TOKEN_ID}",
                        "logprob": -0.5,
                        "bytes": list(f"t{FIRST_TOKEN_ID}".encode()),
                    },
                    {"token": f"t{FIRST_TOKEN_ID + 1}", "logprob": -1.5, "bytes": list(b"t101")},
                ],
            }
        ]
    }


async def test_n_runs_concurrent_engine_requests_with_distinct_seeds(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.delay = 0.01
    body = (await client.post(URL, json=chat_body(n=3, seed=7))).json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2]
    assert all(choice["message"]["content"] == "Hello, world!" for choice in body["choices"])
    assert body["usage"] == {"prompt_tokens": 2, "total_tokens": 14, "completion_tokens": 12}
    ids = [request.request_id for request in engine.requests]
    assert ids == [f"{body['id']}-{i}" for i in range(3)]
    assert [request.sampling_params.seed for request in engine.requests] == [7, 8, 9]


async def test_n_with_max_seed_wraps_in_int64(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await client.post(URL, json=chat_body(n=2, seed=2**63 - 1))
    assert [request.sampling_params.seed for request in engine.requests] == [2**63 - 1, -(2**63)]


async def test_stream_events(client: httpx.AsyncClient) -> None:
    response = await client.post(URL, json=chat_body(stream=True, stream_options={"include_usage": True}))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert re.fullmatch(r"chat-[0-9a-f]{32}", chunks[0]["id"])
    assert all(chunk["object"] == "chat.completion.chunk" and chunk["model"] == MODEL for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [chunk["choices"][0]["delta"]["content"] for chunk in chunks[1:5]]
    assert contents == ["Hello", ",", " world", "!"]
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:5])
    assert chunks[5]["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop", "stop_reason": None}
    ]
    assert chunks[6]["choices"] == []
    assert chunks[6]["usage"] == {"prompt_tokens": 2, "total_tokens": 6, "completion_tokens": 4}
    assert all("usage" not in chunk for chunk in chunks[:6])
    assert len(chunks) == 7


async def test_stream_without_include_usage_has_no_usage_chunk(client: httpx.AsyncClient) -> None:
    events = parse_sse((await client.post(URL, json=chat_body(stream=True))).text)
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in event for event in events[:-1])


async def test_streamed_text_equals_non_streamed_text(client: httpx.AsyncClient) -> None:
    body = chat_body(temperature=0, max_tokens=3)
    whole = (await client.post(URL, json=body)).json()["choices"][0]
    events = parse_sse((await client.post(URL, json={**body, "stream": True})).text)[:-1]
    streamed = "".join(
        event["choices"][0]["delta"].get("content", "") for event in events if event["choices"]
    )
    assert streamed == whole["message"]["content"] == "Hello, world"
    assert events[-1]["choices"][0]["finish_reason"] == whole["finish_reason"] == "length"


async def test_stream_with_n_tags_chunks_by_index(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.delay = 0.005
    events = parse_sse((await client.post(URL, json=chat_body(n=2, stream=True))).text)[:-1]
    texts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, str] = {}
    for event in events:
        [choice] = event["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {0: "Hello, world!", 1: "Hello, world!"}
    assert finishes == {0: "stop", 1: "stop"}
    assert [event["choices"][0]["delta"] for event in events[:2]] == [
        {"role": "assistant", "content": ""}
    ] * 2


async def test_stream_logprobs_per_chunk(client: httpx.AsyncClient) -> None:
    events = parse_sse(
        (await client.post(URL, json=chat_body(stream=True, logprobs=True, max_tokens=2))).text
    )
    content_chunks = [e for e in events[1:-1] if e["choices"][0]["delta"].get("content")]
    assert [c["choices"][0]["logprobs"]["content"][0]["token"] for c in content_chunks] == ["t100", "t101"]


@pytest.mark.parametrize("stream", [False, True])
async def test_busy_engine_is_503_with_retry_after(
    client: httpx.AsyncClient, engine: FakeEngine, stream: bool
) -> None:
    engine.fail_at_start = ServerBusyError("the queue is full", retry_after=3)
    response = await client.post(URL, json=chat_body(stream=stream))
    assert_error(response, 503, "queue is full")
    assert response.headers["retry-after"] == "3"


@pytest.mark.parametrize("stream", [False, True])
async def test_dead_engine_is_503(client: httpx.AsyncClient, engine: FakeEngine, stream: bool) -> None:
    engine.running = False
    assert_error(await client.post(URL, json=chat_body(stream=stream)), 503, "engine has stopped")
    assert engine.requests == []
    engine.running = True
    engine.fail_at_start = EngineDeadError("engine died")
    assert_error(await client.post(URL, json=chat_body(stream=stream)), 503, "engine died")


async def test_request_failure_before_output_is_500(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.fail_at_start = RequestFailedError("request failed in the engine")
    assert_error(await client.post(URL, json=chat_body()), 500, "request failed in the engine")


@pytest.mark.parametrize(
    ("failure", "status", "needle"),
    [
        (RequestFailedError("boom in the engine"), 500, "boom in the engine"),
        (EngineDeadError("the engine died"), 503, "the engine died"),
        (RuntimeError("secret detail"), 500, "internal server error"),
        (None, 500, "scripted failure"),
    ],
)
async def test_error_after_the_stream_started_is_one_error_event_then_done(
    client: httpx.AsyncClient, engine: FakeEngine, failure: Exception | None, status: int, needle: str
) -> None:
    engine.fail_after, engine.fail_mid_stream = 2, failure
    response = await client.post(URL, json=chat_body(stream=True))
    assert response.status_code == 200
    events = parse_sse(response.text)
    assert [e["choices"][0]["delta"].get("content") for e in events[1:3]] == ["Hello", ","]
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == status and needle in error["message"]
    assert "secret" not in response.text
    assert len(events) == 5


async def test_error_mid_request_non_streaming(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.fail_after, engine.fail_mid_stream = 1, RuntimeError("secret detail")
    response = await client.post(URL, json=chat_body())
    assert_error(response, 500, "internal server error")
    assert "secret" not in response.text


async def test_one_failing_choice_aborts_the_others(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.delay = 0.01
    original = engine._outputs

    async def outputs(request: Any) -> Any:
        if request.request_id.endswith("-1"):
            raise RequestFailedError("choice 1 failed")
        async for output in original(request):
            yield output

    engine._outputs = outputs  # type: ignore[method-assign]
    engine.endless = True
    response = await client.post(URL, json=chat_body(n=2))
    assert_error(response, 500, "choice 1 failed")
    assert engine.aborted == [f"{engine.requests[0].request_id}"]


# ---------------------------------------------------------------------------------------------------
# Client disconnects: the ASGI app driven by hand, so the disconnect lands mid-stream.
# ---------------------------------------------------------------------------------------------------


async def _call_and_disconnect(
    app: Any,
    body: dict[str, Any],
    *,
    spec_version: str,
    disconnect_after_events: int | None = None,
    gone: asyncio.Event | None = None,
) -> list[bytes]:
    """POST `body`; the client leaves when `gone` is set or the response sent that many body messages."""
    sent: list[bytes] = []
    gone = gone or asyncio.Event()
    request_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if gone.is_set() and spec_version == "2.4":
            raise OSError("connection reset")
        if message["type"] == "http.response.body":
            sent.append(message.get("body", b""))
            if disconnect_after_events is not None and len(sent) >= disconnect_after_events:
                gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": URL,
        "raw_path": URL.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
        "state": {},
    }
    with contextlib.suppress(OSError):
        await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return sent


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_stream_disconnect_aborts_the_engine_request(
    client: httpx.AsyncClient, engine: FakeEngine, spec_version: str
) -> None:
    engine.endless, engine.delay = True, 0.01
    sent = await _call_and_disconnect(
        client.app,  # type: ignore[attr-defined]
        chat_body(stream=True),
        spec_version=spec_version,
        disconnect_after_events=3,
    )
    assert b"[DONE]" not in b"".join(sent)
    [request] = engine.requests
    assert engine.aborted == [request.request_id]
    assert engine.closed_early == [request.request_id]


async def test_stream_disconnect_with_n_aborts_every_choice(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.endless, engine.delay = True, 0.01
    await _call_and_disconnect(
        client.app,  # type: ignore[attr-defined]
        chat_body(stream=True, n=3),
        spec_version="2.3",
        disconnect_after_events=4,
    )
    assert sorted(engine.aborted) == sorted(request.request_id for request in engine.requests)
    assert len(engine.aborted) == 3


async def test_non_streaming_disconnect_aborts_the_engine_request(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.endless, engine.delay = True, 0.01
    gone = asyncio.Event()
    app = client.app  # type: ignore[attr-defined]
    task = asyncio.create_task(_call_and_disconnect(app, chat_body(), spec_version="2.3", gone=gone))
    while not engine.requests:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert not task.done()
    gone.set()
    sent = await asyncio.wait_for(task, timeout=5)
    [request] = engine.requests
    assert engine.aborted == [request.request_id]
    assert engine.closed_early == [request.request_id]
    assert b"chat.completion" not in b"".join(sent)


async def test_completed_request_is_not_aborted(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await client.post(URL, json=chat_body())
    await client.post(URL, json=chat_body(stream=True))
    await client.post(URL, json=chat_body(n=2))
    assert engine.aborted == []
    assert engine.closed_early == []

"""Chat completions through a real server and the official SDK: greedy stream == non-stream, the stream's
shape, seeded sampling, completion mode, max_tokens."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.e2e.conftest import RunningServer
from tests.e2e.helpers import (
    CHAT_ID,
    MODEL,
    data_url,
    parse_sse,
    png_bytes,
    user_text,
    user_with_images,
)

MAX_TOKENS = 8


def _messages(kind: str) -> list[dict]:
    if kind == "text":
        return user_text()
    return user_with_images(data_url(png_bytes(128, 64)))


@pytest.mark.parametrize("kind", ["text", "image"])
def test_greedy_stream_equals_non_stream(sdk: openai.OpenAI, kind: str) -> None:
    messages = _messages(kind)
    response = sdk.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    choice = response.choices[0]
    assert CHAT_ID.match(response.id)
    assert response.object == "chat.completion"
    assert response.model == MODEL
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= response.usage.completion_tokens <= MAX_TOKENS
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    if choice.finish_reason == "length":
        assert response.usage.completion_tokens == MAX_TOKENS

    chunks = list(
        sdk.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    # contract shape: one id, role first, content deltas, a finish chunk, the usage chunk last
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    assert CHAT_ID.match(chunks[0].id) and chunks[0].id != response.id
    assert all(chunk.object == "chat.completion.chunk" and chunk.model == MODEL for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.choices[0].delta.role is None for chunk in chunks[1:] if chunk.choices)
    *choice_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage == response.usage
    assert all(chunk.usage is None for chunk in choice_chunks)
    finish_chunks = [chunk for chunk in choice_chunks if chunk.choices[0].finish_reason is not None]
    assert finish_chunks == [choice_chunks[-1]]
    assert choice_chunks[-1].choices[0].finish_reason == choice.finish_reason
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in choice_chunks)
    assert streamed == choice.message.content


def test_stream_wire_format(server: RunningServer) -> None:
    """The raw bytes: text/event-stream, `data: {json}\\n\\n` events, `data: [DONE]` last."""
    body = {
        "model": MODEL,
        "messages": user_text(),
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    assert {chunk["id"] for chunk in chunks} == {chunks[0]["id"]}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 4
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)


def test_stream_without_include_usage_has_no_usage_chunk(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model=MODEL, messages=user_text(), max_tokens=3, temperature=0, stream=True
        )
    )
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_max_tokens_and_its_new_name(sdk: openai.OpenAI) -> None:
    """ignore_eos makes the random model run to max_tokens exactly; max_completion_tokens is the same."""
    for limit in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        response = sdk.chat.completions.create(
            model=MODEL,
            messages=user_text(),
            temperature=0,
            extra_body={"nvext": {"ignore_eos": True}},
            **limit,
        )
        assert response.usage.completion_tokens == 3, limit
        assert response.choices[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible(sdk: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        response = sdk.chat.completions.create(
            model=MODEL,
            messages=user_text(),
            max_tokens=MAX_TOKENS,
            temperature=1,
            top_p=1,
            seed=seed,
            extra_body={"nvext": {"ignore_eos": True}},
        )
        return response.choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    # a random model at temperature 1 over ~49k tokens: another seed gives another text
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_completion_mode_returns_only_the_continuation(sdk: openai.OpenAI) -> None:
    """A final assistant message is the start of the answer: the greedy answer split after two
    streamed deltas, continued from the first part, gives back exactly the second part."""
    chunks = list(
        sdk.chat.completions.create(
            model=MODEL,
            messages=user_text(),
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"nvext": {"ignore_eos": True}},
            stream=True,
        )
    )
    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices[0].delta.content]
    full = "".join(pieces)
    prefix = "".join(pieces[:2])
    assert len(pieces) >= 3 and prefix

    response = sdk.chat.completions.create(
        model=MODEL,
        messages=[*user_text(), {"role": "assistant", "content": prefix}],
        max_tokens=MAX_TOKENS - 2,
        temperature=0,
        extra_body={"nvext": {"ignore_eos": True}},
    )
    assert response.choices[0].message.content == full[len(prefix) :]
    assert response.choices[0].message.role == "assistant"

    # an empty final assistant message continues from nothing: the plain answer
    empty = sdk.chat.completions.create(
        model=MODEL,
        messages=[*user_text(), {"role": "assistant", "content": ""}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"nvext": {"ignore_eos": True}},
    )
    assert empty.choices[0].message.content == full


def test_system_message_and_multi_turn(sdk: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        *user_with_images(data_url(png_bytes(64, 64))),
    ]
    response = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 20


async def test_async_sdk_streams(server: RunningServer, sdk: openai.OpenAI) -> None:
    expected = sdk.chat.completions.create(model=MODEL, messages=user_text(), max_tokens=4, temperature=0)
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        started = time.monotonic()
        stream = await client.chat.completions.create(
            model=MODEL, messages=user_text(), max_tokens=4, temperature=0, stream=True
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
        assert time.monotonic() - started < 30
    finally:
        await client.close()
    assert text == expected.choices[0].message.content

"""The official openai SDK (sync, async, streaming, errors) against the app on a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn

from tests.unit.server.helpers import MODEL, FakeEngine, FakeModelServer, LoadFailures
from vlmserve.config import ServerConfig
from vlmserve.server.app import create_app


@pytest.fixture
def base_url(model_server: FakeModelServer, load_failures: LoadFailures) -> Iterator[str]:
    app = create_app(ServerConfig(), lambda config: model_server, on_load_failure=load_failures)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            if httpx.get(f"{url}/v1/health/ready").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "uvicorn did not come up"
        time.sleep(0.02)
    yield f"{url}/v1"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def sdk(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=10) as client:
        yield client


def test_chat(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], temperature=0, max_tokens=16
    )
    assert completion.id.startswith("chat-")
    assert completion.choices[0].message.content == "Hello, world!"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 4


def test_image_part_and_extra_body(sdk: openai.OpenAI, engine: FakeEngine) -> None:
    completion = sdk.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,AA==", "detail": "low"},
                    },
                    {"type": "text", "text": "What is in this image?"},
                ],
            }
        ],
        max_completion_tokens=2,
        seed=5,
        extra_body={"nvext": {"top_k": 4, "repetition_penalty": 1.1}},
    )
    assert completion.choices[0].finish_reason == "length"
    params = engine.requests[0].sampling_params
    assert (params.top_k, params.repetition_penalty, params.seed, params.max_tokens) == (4, 1.1, 5, 2)


def test_stream_matches_non_stream(sdk: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    whole = sdk.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(
        sdk.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert len({chunk.id for chunk in chunks}) == 1


def test_models_list(sdk: openai.OpenAI) -> None:
    [model] = list(sdk.models.list())
    assert model.id == MODEL and model.owned_by == "system"


def test_errors_surface_as_sdk_exceptions(sdk: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as not_found:
        sdk.chat.completions.create(model="nope", messages=messages)  # type: ignore[arg-type]
    assert "nope" in not_found.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert "tool calling is not offered" in bad.value.message
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        sdk.chat.completions.create(model=MODEL, messages=messages, temperature=1.5)  # type: ignore[arg-type]
    assert "temperature" in invalid.value.message


def test_error_mid_stream_raises_in_the_sdk(sdk: openai.OpenAI, engine: FakeEngine) -> None:
    engine.fail_after = 2
    stream = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    assert "scripted failure" in str(caught.value)


def test_async_client_streams(base_url: str) -> None:
    async def run() -> str:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True, n=2
            )
            texts = {0: "", 1: ""}
            async for chunk in stream:
                for choice in chunk.choices:
                    texts[choice.index] += choice.delta.content or ""
            assert texts[0] == texts[1]
            return texts[0]

    assert asyncio.run(run()) == "Hello, world!"


def test_real_disconnect_aborts(base_url: str, engine: FakeEngine) -> None:
    engine.endless, engine.delay = True, 0.01
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", f"{base_url}/chat/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 5
    while not engine.aborted:
        assert time.monotonic() < deadline, "the engine request was not aborted"
        time.sleep(0.02)
    assert engine.aborted == [engine.requests[0].request_id]

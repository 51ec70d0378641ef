"""Operations in the HTTP layer (in-process, fake engine): API key, body limit, request ids, CORS,
draining, the engine watchdog, and what request logging may write."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from tests.unit.server.helpers import FakeModelServer, LoadFailures, assert_error, chat_body
from vlmserve.config import ServerConfig
from vlmserve.logs import JsonLinesFormatter, RequestIdFilter
from vlmserve.server import app as app_module
from vlmserve.server.serving_chat import MAX_LOGGED_PROMPT_CHARS, loggable_prompt

KEY = "s3cret-key"


def _client(make_client: Callable[..., Any], model_server: FakeModelServer, **settings: Any) -> Any:
    return make_client(lambda config: model_server, config=ServerConfig(**settings))


# ------------------------------------------------------------------------------------------- API key


async def test_api_key_required_on_chat(
    make_client: Callable[..., Any], model_server: FakeModelServer
) -> None:
    async with _client(make_client, model_server, api_key=KEY) as client:
        missing = await client.post("/v1/chat/completions", json=chat_body())
        assert_error(missing, 401, "missing API key")
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = await client.post(
            "/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer nope"}
        )
        assert_error(wrong, 401, "invalid API key")
        assert (await client.get("/v1/models", headers={"Authorization": KEY})).status_code == 401
        ok = await client.post(
            "/v1/chat/completions", json=chat_body(), headers={"Authorization": f"Bearer {KEY}"}
        )
        assert ok.status_code == 200, ok.text
    # the refused requests never reached the engine
    assert len(model_server.engine.requests) == 1


async def test_health_and_metrics_stay_open(
    make_client: Callable[..., Any], model_server: FakeModelServer
) -> None:
    async with _client(make_client, model_server, api_key=KEY) as client:
        assert (await client.get("/v1/health/live")).status_code == 200
        assert (await client.get("/v1/health/ready")).status_code == 200
        assert (await client.get("/v1/metrics")).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 401


async def test_exempt_paths_are_configurable(
    make_client: Callable[..., Any], model_server: FakeModelServer
) -> None:
    async with _client(
        make_client, model_server, api_key=KEY, api_key_exempt_paths=("/v1/health/ready",)
    ) as client:
        assert (await client.get("/v1/health/ready")).status_code == 200
        assert (await client.get("/v1/health/live")).status_code == 401
        assert (await client.get("/v1/metrics")).status_code == 401


async def test_openapi_documents_the_key_and_the_body_limit(
    make_client: Callable[..., Any], model_server: FakeModelServer
) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    async with _client(make_client, model_server, api_key=KEY) as client:
        schema = (await client.get("/openapi.json", headers=auth)).json()
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert {"401", "413"} <= set(chat["responses"])
    assert chat["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    assert chat["security"] == [{"bearerAuth": []}]
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    models = schema["paths"]["/v1/models"]["get"]
    assert "401" in models["responses"] and "413" not in models["responses"]  # no body to refuse
    live = schema["paths"]["/v1/health/live"]["get"]  # exempt: open, no 401
    assert "401" not in live["responses"] and "security" not in live
    # without a key: no 401 and no security scheme, the body limit is still there
    async with _client(make_client, model_server) as client:
        open_schema = (await client.get("/openapi.json")).json()
    open_chat = open_schema["paths"]["/v1/chat/completions"]["post"]
    assert "413" in open_chat["responses"] and "401" not in open_chat["responses"]
    assert "securitySchemes" not in open_schema.get("components", {})


# ---------------------------------------------------------------------------------------- body limit


async def test_body_over_the_limit_by_content_length_is_413(
    make_client: Callable[..., Any], model_server: FakeModelServer
) -> None:
    async with _client(make_client, model_server, max_request_body_bytes=4096) as client:
        body = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * 5000}]))
        response = await client.post(
            "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
        assert_error(response, 413, "limit is 4096 bytes")
        small = await client.post("/v1/chat/completions", json=chat_body())
        assert small.status_code == 200
    assert len(model_server.engine.requests) == 1


async def test_chunked_body_over_the_limit_is_413_while_reading(
    make_client: Callable[..., Any], model_server: FakeModelServer
) -> None:
    sent: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            sent.append(1)
            yield b" " * 1024

    async with _client(make_client, model_server, max_request_body_bytes=4096) as client:
        response = await client.post(
            "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert_error(response, 413, "more than 4096 bytes")
    assert "content-length" not in response.request.headers
    assert len(sent) < 10  # refused after the fifth chunk, not after reading all of it
    assert model_server.engine.requests == []


async def test_chunked_body_under_the_limit_is_served(
    make_client: Callable[..., Any], model_server: FakeModelServer
) -> None:
    payload = json.dumps(chat_body()).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 7):
            yield payload[start : start + 7]

    async with _client(make_client, model_server, max_request_body_bytes=4096) as client:
        response = await client.post(
            "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 200, response.text


# ---------------------------------------------------------------------------------------- request ids


async def test_request_id_header_is_the_chat_id(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=chat_body())
    assert response.headers["x-request-id"] == response.json()["id"]
    streamed = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    first = json.loads(streamed.text.split("\n\n")[0].removeprefix("data: "))
    assert streamed.headers["x-request-id"] == first["id"]


async def test_request_id_on_every_response(client: httpx.AsyncClient) -> None:
    for response in (
        await client.get("/v1/health/live"),
        await client.get("/nope"),
        await client.post("/v1/chat/completions", json={"messages": []}),
    ):
        assert response.headers["x-request-id"].startswith("req-")


@pytest.mark.parametrize(
    ("sent", "kept"), [("trace-42_a.b:c", True), ("bad id with spaces", False), ("x" * 200, False)]
)
async def test_client_request_id_used_when_sane(client: httpx.AsyncClient, sent: str, kept: bool) -> None:
    response = await client.post("/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": sent})
    assert response.status_code == 200
    assert (response.headers["x-request-id"] == sent) is kept
    if not kept:
        assert response.headers["x-request-id"] == response.json()["id"]


async def test_log_lines_of_a_request_carry_its_id(client: httpx.AsyncClient) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.addFilter(RequestIdFilter())
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("vlmserve.server.serving_chat")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        response = await client.post(
            "/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": "abc"}
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert response.status_code == 200
    assert records and all(record.request_id == "abc" for record in records)  # type: ignore[attr-defined]
    line = json.loads(JsonLinesFormatter().format(records[0]))
    assert line["request_id"] == "abc" and line["level"] == "INFO" and "prompt tokens" in line["message"]


def test_lines_outside_a_request_carry_a_dash() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    RequestIdFilter().filter(record)
    assert record.request_id == "-"  # type: ignore[attr-defined]
    assert json.loads(JsonLinesFormatter().format(record))["message"] == "hello there"


# ------------------------------------------------------------------------------------------- logging


def test_loggable_prompt_keeps_text_and_drops_images() -> None:
    prompt = "<|user|>look <|vlmserve-image-0123456789abcdef|>\nand data:image/png;base64,iVBORw0KGgoAAAA="
    logged = loggable_prompt(prompt)
    assert "look <image>" in logged
    assert "iVBOR" not in logged and "data:image/png;base64,<data>" in logged
    long = loggable_prompt("y" * 10_000)
    assert len(long) < MAX_LOGGED_PROMPT_CHARS + 50 and "10000 characters" in long


@pytest.mark.parametrize("disable", [True, False])
async def test_prompts_logged_only_when_asked(
    make_client: Callable[..., Any],
    model_server: FakeModelServer,
    caplog: pytest.LogCaptureFixture,
    disable: bool,
) -> None:
    caplog.set_level(logging.INFO)
    async with _client(make_client, model_server, disable_log_requests=disable) as client:
        await client.post(
            "/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": "tell a secret"}])
        )
    # the fake preprocessor's prompt text is empty: the log line's presence is what is checked
    assert any("prompt: " in r.getMessage() for r in caplog.records) is (not disable)


# ------------------------------------------------------------------------------------------------ CORS


async def test_cors_off_by_default(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/health/live", headers={"Origin": "https://ui.example"})
    assert "access-control-allow-origin" not in response.headers


async def test_cors_preflight_and_simple_request(
    make_client: Callable[..., Any], model_server: FakeModelServer
) -> None:
    async with _client(
        make_client, model_server, cors_allow_origins=("https://ui.example",), api_key=KEY
    ) as client:
        preflight = await client.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://ui.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == "https://ui.example"
        response = await client.post(
            "/v1/chat/completions",
            json=chat_body(),
            headers={"Origin": "https://ui.example", "Authorization": f"Bearer {KEY}"},
        )
        assert response.headers["access-control-allow-origin"] == "https://ui.example"
        assert "x-request-id" in response.headers["access-control-expose-headers"].lower()
        other = await client.get("/v1/health/live", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# ---------------------------------------------------------------------------------- drain and watchdog


async def test_draining_turns_ready_and_new_chats_503(client: httpx.AsyncClient) -> None:
    client.app.state.vlmserve.is_draining = True  # type: ignore[attr-defined]
    ready = await client.get("/v1/health/ready")
    assert_error(ready, 503, "shutting down")
    chat = await client.post("/v1/chat/completions", json=chat_body())
    assert_error(chat, 503, "shutting down")
    assert int(chat.headers["retry-after"]) > 0
    assert (await client.get("/v1/health/live")).status_code == 200


async def test_in_flight_stream_finishes_while_draining(
    client: httpx.AsyncClient, model_server: FakeModelServer
) -> None:
    model_server.engine.delay = 0.02
    async with client.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as response:
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("data: ")
        client.app.state.vlmserve.is_draining = True  # type: ignore[attr-defined]
        rest = [line async for line in lines]
    assert "data: [DONE]" in rest
    assert any('"finish_reason":"stop"' in line for line in rest)


async def test_watchdog_reports_a_dead_engine(
    make_client: Callable[..., Any],
    model_server: FakeModelServer,
    load_failures: LoadFailures,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(app_module, "WATCHDOG_INTERVAL_S", 0.01)
    async with make_client(lambda config: model_server) as client:
        assert load_failures.errors == []
        model_server.engine.running = False
        for _ in range(200):
            if load_failures.errors:
                break
            await asyncio.sleep(0.01)
        assert len(load_failures.errors) == 1
        assert client.app.state.vlmserve.engine_died  # type: ignore[attr-defined]
        assert (await client.get("/v1/health/ready")).status_code == 503

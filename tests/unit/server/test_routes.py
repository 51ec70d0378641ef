"""The other endpoints and the app's life: models, health transitions, version, metadata, docs, 404s."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from typing import Any

import httpx

import vlmserve
from tests.unit.server.helpers import (
    MODEL,
    FakeModelServer,
    LoadFailures,
    assert_error,
    chat_body,
    wait_until_ready,
)
from vlmserve.config import ServerConfig


async def test_models_body_has_every_nim_field(
    client: httpx.AsyncClient, model_server: FakeModelServer
) -> None:
    body = (await client.get("/v1/models")).json()
    [card] = body["data"]
    [permission] = card["permission"]
    assert re.fullmatch(r"modelperm-[0-9a-f]{32}", permission["id"])
    assert body == {
        "object": "list",
        "data": [
            {
                "id": MODEL,
                "object": "model",
                "created": model_server.created,
                "owned_by": "system",
                "root": MODEL,
                "parent": None,
                "max_model_len": 4096,
                "permission": [
                    {
                        "id": permission["id"],
                        "object": "model_permission",
                        "created": model_server.created,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
        ],
    }
    # the field order of the seed
    assert list(card) == [
        "id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"
    ]  # fmt: skip


async def test_health_while_loading_then_ready(
    make_client: Callable[..., Any], model_server: FakeModelServer
) -> None:
    release = threading.Event()

    def slow_load(config: ServerConfig) -> FakeModelServer:
        assert release.wait(timeout=5)
        return model_server

    async with make_client(slow_load, wait_ready=False) as client:
        live = await client.get("/v1/health/live")
        assert live.status_code == 200
        assert live.json() == {"object": "readyhealth.response", "message": "Service is live."}
        ready = await client.get("/v1/health/ready")
        assert_error(ready, 503, "loading")
        assert ready.headers["retry-after"] == "5"
        chat = await client.post("/v1/chat/completions", json=chat_body())
        assert_error(chat, 503, "loading")
        assert "retry-after" in chat.headers
        assert_error(await client.get("/v1/models"), 503, "loading")
        assert (await client.get("/v1/version")).status_code == 200
        release.set()
        await wait_until_ready(client)
        ready = await client.get("/v1/health/ready")
        assert ready.json() == {"object": "health.response", "message": "Service is ready."}
        assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 200
    assert model_server.closed


async def test_ready_is_503_once_the_engine_died(
    client: httpx.AsyncClient, model_server: FakeModelServer
) -> None:
    model_server.engine.running = False
    assert_error(await client.get("/v1/health/ready"), 503, "engine has stopped")
    assert (await client.get("/v1/health/live")).status_code == 200


async def test_failed_load_is_reported_and_stops_the_server(
    make_client: Callable[..., Any], load_failures: LoadFailures
) -> None:
    def failing_load(config: ServerConfig) -> FakeModelServer:
        raise FileNotFoundError("no config.json in /models/x")

    async with make_client(failing_load, wait_ready=False) as client:
        for _ in range(200):
            if load_failures.errors:
                break
            await asyncio.sleep(0.01)
        [error] = load_failures.errors
        assert isinstance(error, FileNotFoundError)
        assert_error(await client.get("/v1/health/ready"), 503, "failed to load")
        assert_error(await client.post("/v1/chat/completions", json=chat_body()), 503, "failed to load")


async def test_version(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/version")).json() == {
        "release": vlmserve.__version__,
        "api": vlmserve.API_VERSION,
    }


async def test_metadata(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/metadata")).json()
    assert body["served_model_name"] == MODEL
    assert body["max_model_len"] == 4096
    assert body["architecture"] == "FakeVLM"
    assert body["dtype"] == "float32"
    assert body["device"] == "cpu"
    limits = body["limits"]
    assert limits["max_images_per_prompt"] == ServerConfig().max_images_per_prompt
    assert limits["max_tokens"] == 2048
    assert limits["max_messages"] == 1024
    assert body["release"] == vlmserve.__version__


async def test_metadata_stringifies_odd_values(
    make_client: Callable[..., Any], model_server: FakeModelServer
) -> None:
    from pathlib import Path

    model_server.metadata["model_path"] = Path("/models/x")
    model_server.metadata["dtype"] = object()
    model_server.metadata["max_tiles"] = 1
    async with make_client(lambda config: model_server) as client:
        body = (await client.get("/v1/metadata")).json()
    assert body["model_path"] == "/models/x"
    assert body["dtype"].startswith("<object")
    # the tile budget the model server resolved, not the setting's 0 ("the checkpoint's own")
    assert body["limits"]["max_tiles"] == 1


async def test_docs_and_openapi(client: httpx.AsyncClient) -> None:
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    schema = (await client.get("/openapi.json")).json()
    for path in ("/v1/chat/completions", "/v1/models", "/v1/health/ready", "/v1/health/live", "/v1/version"):
        assert path in schema["paths"], path
    request_schema = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert list(request_schema["properties"])[:3] == ["messages", "model", "frequency_penalty"]
    assert list(request_schema["properties"])[-1] == "nvext"


async def test_unknown_path_is_404_in_error_shape(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/nope"), 404, "/v1/nope")
    assert_error(await client.post("/v1/completions/x", json={}), 404)


async def test_wrong_method_is_405_in_error_shape(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/chat/completions"), 405)

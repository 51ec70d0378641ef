"""The other endpoints through a real server, the seed's curl example, readiness while loading, client
disconnects, and requests that must not hurt the server."""

from __future__ import annotations

import json
import re
import socket
import time
from typing import Any

import httpx
import openai
import pytest

import vlmserve
from tests.e2e.conftest import ImageHost, RunningServer
from tests.e2e.helpers import CHAT_ID, MODEL, check_error_body, user_text

# --------------------------------------------------------------------------------- models and health


def test_models_body_is_exactly_the_contract(server: RunningServer) -> None:
    before = int(time.time())
    response = httpx.get(server.base_url + "/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["object", "data"] and body["object"] == "list" and len(body["data"]) == 1
    (card,) = body["data"]
    assert list(card) == [
        "id",
        "object",
        "created",
        "owned_by",
        "root",
        "parent",
        "max_model_len",
        "permission",
    ]
    assert card["id"] == card["root"] == MODEL
    assert card["object"] == "model" and card["owned_by"] == "system" and card["parent"] is None
    assert card["max_model_len"] == 4096
    assert isinstance(card["created"], int) and card["created"] <= before
    (permission,) = card["permission"]
    assert re.fullmatch(r"modelperm-[0-9a-f]{32}", permission.pop("id"))
    assert isinstance(permission.pop("created"), int)
    assert permission == {
        "object": "model_permission",
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


def test_models_through_the_sdk(sdk: openai.OpenAI) -> None:
    models = sdk.models.list()
    assert [model.id for model in models.data] == [MODEL]
    assert models.data[0].owned_by == "system"


def test_health(server: RunningServer) -> None:
    live = httpx.get(server.base_url + "/v1/health/live")
    ready = httpx.get(server.base_url + "/v1/health/ready")
    assert (live.status_code, live.json()) == (
        200,
        {"object": "readyhealth.response", "message": "Service is live."},
    )
    assert (ready.status_code, ready.json()) == (
        200,
        {"object": "health.response", "message": "Service is ready."},
    )


def test_ready_was_503_while_the_model_loaded(server: RunningServer) -> None:
    """The fixture polled readiness from the first moment HTTP answered: 503 (JSON, Retry-After)
    until the model was loaded, then 200."""
    statuses = server.ready_statuses
    assert statuses[-1] == 200 and 503 in statuses, statuses
    assert statuses.index(200) == len(statuses) - 1
    assert server.loading_response is not None
    status, headers, body = server.loading_response
    assert status == 503 and "retry-after" in headers
    assert body["error"]["code"] == 503 and "loading" in body["error"]["message"]


def test_version_and_metadata(server: RunningServer) -> None:
    version = httpx.get(server.base_url + "/v1/version").json()
    assert version == {"release": vlmserve.__version__, "api": vlmserve.API_VERSION}
    metadata = httpx.get(server.base_url + "/v1/metadata").json()
    assert metadata["served_model_name"] == MODEL
    assert metadata["max_model_len"] == 4096
    assert metadata["architecture"] == "Llama_Nemotron_Nano_VL"
    assert metadata["dtype"] == "float32"
    assert metadata["tokens_per_tile"] == 4 and metadata["tile_size"] == 64
    assert metadata["limits"]["max_images_per_prompt"] == 4
    assert metadata["limits"]["image_max_pixels"] == 4_000_000
    assert metadata["limits"]["image_fetch_timeout"] == 1.5
    assert metadata["release"] == vlmserve.__version__


def test_docs_and_openapi(server: RunningServer) -> None:
    docs = httpx.get(server.base_url + "/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    spec = httpx.get(server.base_url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/models", "/v1/health/ready", "/v1/health/live"):
        assert path in spec["paths"], path


def test_unknown_path_is_404_in_error_shape(server: RunningServer) -> None:
    response = httpx.get(server.base_url + "/v1/nope")
    error = check_error_body(response, 404)
    assert error == {
        "message": "no route for GET /v1/nope",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }


# --------------------------------------------------------------------------------- the seed's example


def test_seed_curl_example_round_trips(server: RunningServer, image_host: ImageHost) -> None:
    """The seed's request, its image URL swapped for a loopback one and max_tokens lowered to keep the
    suite fast, with the seed's headers; the response has the seed's keys in the seed's order."""
    seed_body = json.loads(
        """{
           "model": "nvidia/llama-3.1-nemotron-nano-vl-8b-v1",
           "messages": [
               {
                   "role":"user",
                   "content": [
                       {"type": "image_url", "image_url": {"url": "IMAGE_URL"}},
                       {"type": "text", "text": "What is in this image?"}
                   ]
               }
           ],
           "max_tokens": 256,
           "temperature": 0
        }"""
    )
    seed_body["messages"][0]["content"][0]["image_url"]["url"] = image_host.url("/photo.jpg")
    seed_body["max_tokens"] = 8
    before = int(time.time())
    response = httpx.post(
        server.base_url + "/v1/chat/completions",
        content=json.dumps(seed_body),
        headers={"accept": "application/json", "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["id", "object", "created", "model", "choices", "usage", "prompt_logprobs"]
    assert CHAT_ID.match(body["id"])
    assert body["object"] == "chat.completion"
    assert before <= body["created"] <= time.time() + 1
    assert body["model"] == MODEL
    (choice,) = body["choices"]
    assert list(choice) == ["index", "message", "logprobs", "finish_reason", "stop_reason"]
    assert choice["index"] == 0
    assert list(choice["message"]) == ["role", "content"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["logprobs"] is None and choice["stop_reason"] is None
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert list(usage) == ["prompt_tokens", "total_tokens", "completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 8
    assert body["prompt_logprobs"] is None
    assert image_host.requested("/photo.jpg")


# --------------------------------------------------------------------------------- disconnects


def _long_request(stream: bool) -> dict[str, Any]:
    """Runs ~2000 tokens (seconds on the tiny model) unless aborted."""
    return {
        "model": MODEL,
        "messages": user_text("Tell me a long story."),
        "max_tokens": 2000,
        "temperature": 0,
        "stream": stream,
        "nvext": {"ignore_eos": True},
    }


def _quick_request_succeeds(server: RunningServer) -> float:
    started = time.monotonic()
    response = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={"model": MODEL, "messages": user_text(), "max_tokens": 2, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def test_client_disconnect_mid_stream_aborts_the_generation(server: RunningServer) -> None:
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", server.base_url + "/v1/chat/completions", json=_long_request(True)) as response,
    ):
        assert response.status_code == 200
        events = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
            if len(events) == 3:
                break
    request_id = events[0]["id"]
    # the stream's connection is closed: the server aborts the engine request
    assert server.wait_for_log(f"{request_id}: aborting"), server.log()[-3000:]
    # and serves the next request at once, not after 2000 tokens
    assert _quick_request_succeeds(server) < 10
    assert server.process.poll() is None


def test_client_disconnect_before_a_non_streamed_answer_aborts_it(server: RunningServer) -> None:
    mark = len(server.log())
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/chat/completions", json=_long_request(False), timeout=0.5)
    assert server.wait_for_log(": aborting"), server.log()[mark:]
    new_lines = server.log()[mark:]
    (request_id,) = re.findall(r"(chat-[0-9a-f]{32}): \d+ prompt tokens", new_lines)
    assert server.wait_for_log(f"{request_id}: aborting")
    assert _quick_request_succeeds(server) < 10


# --------------------------------------------------------------------------------- robustness

GARBAGE: dict[str, tuple[bytes, str]] = {
    "truncated JSON": (b'{"model": ', "application/json"),
    "not JSON": (b"hello", "application/json"),
    "invalid UTF-8": (b"\xff\xfe\xfa", "application/json"),
    "JSON null": (b"null", "application/json"),
    "JSON list": (b"[]", "application/json"),
    "deeply nested list": (b"[" * 100_000 + b"]" * 100_000, "application/json"),
    "deeply nested object": (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "application/json"),
    "nested junk field": (
        json.dumps(
            {"model": MODEL, "messages": user_text(), "max_tokens": 1, "x": json.loads("[" * 500 + "]" * 500)}
        ).encode(),
        "application/json",
    ),
    "nested content": (
        json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [[[[[]]]]]}]}).encode(),
        "application/json",
    ),
    "text/plain body": (b"hello", "text/plain"),
    "empty body": (b"", "application/json"),
    "huge string": (
        json.dumps(
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "\u00e9" * 200_000}],
                "max_tokens": 2048,
            }
        ).encode(),
        "application/json",
    ),
}


def test_bad_requests_never_take_the_server_down(server: RunningServer) -> None:
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for name, (content, content_type) in GARBAGE.items():
            response = client.post(
                "/v1/chat/completions", content=content, headers={"content-type": content_type}
            )
            assert response.status_code in (200, 400, 413, 422), (name, response.status_code, response.text)
            if response.status_code != 200:
                check_error_body(response, response.status_code)
            assert server.process.poll() is None, name
        for method in ("GET", "PUT", "DELETE"):
            response = client.request(method, "/v1/chat/completions")
            assert response.status_code == 405, (method, response.text)
            assert set(response.json()) == {"error"}
        # an abandoned stream and a half-sent body
        with client.stream("POST", "/v1/chat/completions", json=_long_request(True)) as response:
            next(response.iter_lines())
    _send_half_a_body(server)
    assert _quick_request_succeeds(server) < 10
    assert httpx.get(server.base_url + "/v1/health/ready").status_code == 200
    assert server.process.poll() is None
    assert "Traceback" not in server.log()


def _send_half_a_body(server: RunningServer) -> None:
    """A request whose body stops long before its Content-Length, then a closed connection."""
    url = httpx.URL(server.base_url)
    with socket.create_connection((url.host, url.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n" + b'{"model": "'
        )
        time.sleep(0.2)
